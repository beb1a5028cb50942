"""``complete(dataset, **options)``: the job as a lazy Ray Data transformation.

For users composing their own Ray Data pipelines: ``map_batches`` over a pool of 1 to
``actors`` actors, each running our async engine on one batch at a time (``concurrency``
requests in flight per actor, retries, per-row errors), and returning the batch's rows with
the result columns that OUTPUT has (``completion``, ``status``, ``error_type``, tokens, ...).
A row that exhausts its retries is an ``error`` row; an error that no row can survive (a
wrong API key, exit 3) fails the Ray job, as Ray Data fails it for any exception of a UDF.
There is no OUTPUT checkpoint here: a batch whose actor died is sent again by Ray Data,
whole; for resume and exactly-once across runs use ``pipeline run --engine ray``.
``rpm``/``tpm`` are the key's totals, held across the actors by one ``RateKeeper`` (owned by
the process that called ``complete``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from ..config import RunConfig
from ..errors import ConfigError
from ..runner import Seams, run_batch
from ..settings import build_config
from .driver import SilentReporter
from .local import connect
from .rate import SharedBuckets, start_keeper

# options that name a run's OUTPUT or how it runs as a whole: not for a transformation
_REFUSED = ("shard", "engine", "ray_address", "ray_actors", "restart", "batch", "dry_run")


class BatchCompleter:
    """A Ray Data actor UDF: one batch of rows -> the rows with their result columns."""

    def __init__(self, config: RunConfig, keeper: Any = None) -> None:
        self.config = config
        self.buckets = SharedBuckets(keeper) if keeper is not None else None

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        with tempfile.TemporaryDirectory(prefix="pipeline-ray-batch-") as where:
            output = Path(where) / "batch.parquet"
            seams = Seams(reporter=SilentReporter(), handle_signals=False, buckets=self.buckets)
            run_batch(batch.reset_index(drop=True), output, self.config, seams)
            return pq.read_table(output)


def complete(
    dataset: ray.data.Dataset,
    *,
    actors: int = 2,
    batch_size: int = 512,
    **options: Any,
) -> ray.data.Dataset:
    """``dataset`` with the result columns added, lazily (nothing is sent until the dataset
    is consumed). ``options`` are ``pipeline.run``'s (model, prompt_column, template,
    concurrency, rpm, ...); up to ``actors`` actors run our engine (Ray Data scales the pool
    to the blocks it has), ``batch_size`` rows a batch."""
    refused = [key for key in options if key in _REFUSED]
    if refused:
        raise ConfigError(
            f"pipeline.ray.complete: {refused[0]} is not for a transformation (it names how a "
            "whole run runs). Use pipeline run --engine ray for a job with OUTPUT."
        )
    if actors < 1 or batch_size < 1:
        raise ConfigError("pipeline.ray.complete: actors and batch_size must be at least 1.")
    config = build_config(None, {"progress": False, "quiet": True, **options})
    if not ray.is_initialized():
        connect()  # the keeper's actor needs Ray: a local instance on 127.0.0.1 only
    keeper = start_keeper(config.rpm, config.tpm)
    return dataset.map_batches(
        BatchCompleter,
        fn_constructor_kwargs={"config": config, "keeper": keeper},
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=1,
    )
