"""What ``run`` would send and spend, per model, without sending anything or touching
OUTPUT (``pipeline estimate``): the rows still to do (OUTPUT's checkpoint says which are
done), their prompts' tokens, the cache and ``--dedup``, priced online or as a batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .batch_input_file import batch_file_job
from .cache import ResponseCache
from .checkpoint import Checkpoint
from .client import build_body
from .config import RunConfig
from .estimate import Estimate, Estimator
from .index_join import WindowedPlaces
from .opening import open_job
from .planning import read_keys
from .pricing import BATCH_PRICE_FACTOR, PriceTable
from .records import COST_BATCH_TABLE
from .remote_output import shown_output
from .result_index import found_in
from .row_bits import RowMask
from .samples import SampleRequest, plan_requests
from .todo import PLAN_ROWS
from .unit_keys import UnitKeys


def estimate_job(
    data: Any,
    output: str | Path | None,
    config: RunConfig,
    *,
    typical_completion: int | None = None,
) -> tuple[Estimate, ...]:
    """What ``run`` would send and spend, one estimate per model, without sending anything
    or touching OUTPUT.

    Rows that OUTPUT's checkpoint already has for a model are left out of that model's
    estimate; duplicates (``dedup``) and responses in ``cache`` are counted apart.
    """
    if config.input_format == "openai-batch":  # the file says model, messages and fields
        data, config = batch_file_job(data, config)
    source, builder = open_job(data, config)
    checkpoint = Checkpoint(Path(output)) if output is not None else None
    row_keys = read_keys(source, builder, config, checkpoint)
    models = config.all_models
    done = _done_per_model(checkpoint, UnitKeys(row_keys.keys, models, config.n), config.n)
    requests = plan_requests(
        range(config.n),
        n=config.n,
        native=config.n_mode != "seeds",
        base_seed=config.base_seed,
    )
    cache = ResponseCache(config.cache) if config.cache else None
    estimators = [
        Estimator(
            model=model,
            dedup=config.dedup,
            cached=_cached_for(cache, config, model, requests),
            samples=config.n,
            native=config.n_mode != "seeds",
        )
        for model in models
    ]
    offset = 0
    for batch in source.iter_batches(columns=builder.columns):
        n = batch.num_rows
        for estimator, model_done in zip(estimators, done, strict=True):
            where = np.nonzero(~model_done[offset : offset + n])[0]
            keys = row_keys.keys[offset : offset + n][where]
            rows = builder.build(batch.take(where), keys, offset + where)
            # a row that repeats an earlier row's prompt follows it or copies its stored
            # answer, as a run does (the key pass found them: no set of prompts is held)
            repeated = _among(row_keys.duplicates, offset + where).tolist()
            estimator.add((row.messages for row in rows), repeated if config.dedup else None)
        offset += n
    prices = PriceTable.load(config.prices)
    results = []
    for estimator, model_done in zip(estimators, done, strict=True):
        result = estimator.result(
            max_tokens=config.max_tokens, prices=prices, typical_completion=typical_completion
        )
        notes = list(result.notes)
        if config.n > 1 and config.n_mode == "auto":
            notes.append(
                f"--n {config.n} with --n-mode auto: counted as one request a row (the API's "
                f"n); a server that ignores n gets {config.n} requests a row, each with the "
                "prompt"
            )
        already = model_done.count()
        if already:
            done_in = shown_output(Path(str(output)))
            notes.append(f"{already} rows already done in {done_in} not counted")
        if config.batch:
            result = _at_batch_price(result, notes, prices.batch_share(config.base_url))
        results.append(dataclasses.replace(result, notes=tuple(notes)))
    return tuple(results)


def _among(sorted_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` are in ``sorted_rows``."""
    among = np.zeros(len(rows), dtype=bool)
    among[found_in(sorted_rows, rows)[1]] = True
    return among


def _done_per_model(checkpoint: Checkpoint | None, units: UnitKeys, samples: int) -> list[RowMask]:
    """For each model, which rows the checkpoint already has (every sample of them), as
    bits, looked up a window of rows at a time (the index read once a model)."""
    rows, models = len(units.keys), len(units) // samples
    done = [RowMask(rows) for _ in range(models)]
    if checkpoint is None or not checkpoint.exists():
        return done
    index = checkpoint.load_index()
    for model in range(models):
        mine = [units[unit] for unit in range(model * samples, (model + 1) * samples)]
        found = WindowedPlaces(index, mine, PLAN_ROWS)
        for start in found.starts():
            places = found.at(start)
            missing = np.zeros(len(places.at[0]), dtype=bool)
            for sample in range(samples):
                missing |= places.missing(sample)
            done[model].put(start, ~missing)
        found.close()
    index.close()
    return done


def _cached_for(
    cache: ResponseCache | None, config: RunConfig, model: str, requests: list[SampleRequest]
) -> Callable[[Any], bool] | None:
    """Whether every request of a row to ``model`` is in the cache (None: no cache)."""
    if cache is None:
        return None
    params = config.body_params()

    def cached(messages: Any) -> bool:
        for request in requests:
            body = build_body(model, list(messages), {**params, **request.params})
            if not cache.contains(cache.key(config.base_url, body)):
                return False
        return True

    return cached


def _at_batch_price(result: Estimate, notes: list[str], share: float | None) -> Estimate:
    """``result`` priced as batch mode bills it: the entry's batch prices, else the
    provider's share, else ``BATCH_PRICE_FACTOR`` of its online price (``Price.batch``)."""
    if result.price is None:
        return result
    batch, source = result.price.batch(share)
    notes.append(
        "--batch: costs at the price table's batch prices"
        + ("" if share is None else f" (the provider's: {share:.0%} of the online price)")
        if source == COST_BATCH_TABLE
        else f"--batch: costs at {BATCH_PRICE_FACTOR:.0%} of the price table (the Batch "
        "APIs' usual discount; add batch_input/batch_output to the model's price entry "
        "for its own)"
    )
    high = result.completion_tokens_high
    return dataclasses.replace(
        result,
        cost_low=batch.cost(result.prompt_tokens, 0),
        cost_high=None if high is None else batch.cost(result.prompt_tokens, high),
        cost_typical=batch.cost(result.prompt_tokens, result.completion_tokens_typical),
    )
