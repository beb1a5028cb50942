"""K samples per row (``--n K``): their keys, how requests ask for them, how OUTPUT holds them.

This module owns the rules of a sampling run, as pure functions:

- **keys** (``unit_keys.UnitKeys``): sample 0 of a (row, model) is stored under the
  pair's own key, sample s > 0 under that key mixed with ``s``, so K = 1 keeps every key
  (and checkpoint) as it was, and each sample is resumed, deduplicated and retried by itself;
- **requests** (:func:`plan_requests`): *native* asks one request for the missing samples
  with the API's ``n``; *seeds* sends one request per sample with ``seed = base + s``
  (``base``: ``--seed``, else :data:`DEFAULT_BASE_SEED`). Usage is reported per response,
  so every request's tokens, cost and attempts are stored on the first sample it answers;
  the other samples of that request carry none and ``cost_source`` :data:`SHARED`;
- **OUTPUT** (``--samples``): *long* stacks the K results of each row as K rows with a
  :data:`SAMPLE_COLUMN` (:func:`stack_samples`); *list* folds them into one row
  (:func:`fold_samples`): the per-sample columns become lists (sample s at position s), and
  the others are summed (tokens, attempts, cost), maxed (latency), the first sample's
  (response model and id), or the row's combined status with the error that decides it.

It sends nothing and reads no files; ``runner.py`` and ``writer.py`` call it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import DEFAULT_BASE_SEED
from .records import COST_SHARED

SAMPLE_COLUMN = "sample"
LAYOUTS = ("list", "long")
N_MODES = ("auto", "native", "seeds")
# The provider's schema sets no maximum for n; OpenAI (behind the AI/ML API's gpt models)
# refuses more than 128. Seeds mode sends no n, so it has no such cap.
MAX_NATIVE_N = 128
# The provider's schema wants seed >= 1, so the default base is 1, not 0.
SHARED = COST_SHARED

# Result columns folded by sum / max / first non-null in the list layout.
_SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "attempts",
    "cost_usd",
)
_MAXED = ("latency_ms",)
_FIRST = ("response_model", "response_id")
# Per-sample result columns (besides the answer's derived columns) in the list layout.
PER_SAMPLE_RESULTS = ("completion", "finish_reason")
# The row's status in the list layout: the first of these any sample has, else "ok".
_STATUS_ORDER = ("pending", "error", "invalid")


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One request of a row's samples.

    Fields:
        samples: the sample indices it answers, in choice order (choice i is samples[i]).
        params: body fields it adds: ``{"n": len(samples)}`` (native, several samples),
            ``{"seed": base + s}`` (seeds), or nothing (one sample, K = 1).
    """

    samples: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def reask_params(self) -> dict[str, Any]:
        """The fields a re-ask of one of its samples adds: the seed, never ``n``."""
        return {name: value for name, value in self.params.items() if name != "n"}


def plan_requests(
    samples: Sequence[int], *, n: int, native: bool, base_seed: int
) -> list[SampleRequest]:
    """The requests that produce ``samples`` (indices out of ``n``).

    ``n == 1``: one plain request, exactly as without sampling. ``native``: one request
    with ``n`` = the number of samples (left out for a single one). Otherwise one request
    per sample ``s`` with ``seed = base_seed + s``.
    """
    wanted = tuple(samples)
    if n == 1:
        return [SampleRequest(wanted)]
    if native:
        return [SampleRequest(wanted, {"n": len(wanted)} if len(wanted) > 1 else {})]
    return [SampleRequest((s,), {"seed": base_seed + s}) for s in wanted]


# -- OUTPUT layouts ------------------------------------------------------------------------


def row_major(rows: int, samples: int) -> pa.Array:
    """Positions that turn K stacked tables (sample-major) into row-major order."""
    return pa.array(np.arange(rows * samples).reshape(samples, rows).T.ravel())


def stack_samples(tables: Sequence[pa.Table]) -> pa.Table:
    """``--samples long``: K result tables of one batch -> K rows per input row, in order
    (row 0 sample 0, row 0 sample 1, ...), without the sample column (the caller adds it)."""
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables).take(row_major(tables[0].num_rows, len(tables)))


def fold_samples(tables: Sequence[pa.Table], per_sample: Collection[str]) -> pa.Table:
    """``--samples list``: K result tables of one batch (rows aligned) -> one row per input row.

    Columns named in ``per_sample`` become lists (sample s at position s). Tokens, attempts
    and cost are summed over the samples that have them (null when none does), latency is
    the largest, response model and id the first sample's that has one. ``status`` is
    ``pending`` if any sample is, else ``skipped`` if all are, else ``error`` / ``invalid``
    if any sample is, else ``ok``; ``error_type``, ``error_message`` and ``http_status`` are
    those of the first sample with that status (the message says which samples failed).
    ``cost_source`` is the one source of the samples' own costs, ``mixed`` if they differ.
    """
    count = len(tables)
    rows = tables[0].num_rows
    names = tables[0].column_names
    order = row_major(rows, count)
    offsets = pa.array(np.arange(0, rows * count + 1, count, dtype=np.int32))
    status = np.array([t.column("status").to_pylist() for t in tables], dtype=object)
    row_status, chosen = _fold_status(status)
    columns: list[pa.Array] = []
    for name in names:
        arrays = [t.column(name).combine_chunks() for t in tables]
        if name in per_sample:
            values = pa.concat_arrays(arrays).take(order)
            columns.append(pa.ListArray.from_arrays(offsets, values))
        elif name in _SUMMED:
            columns.append(_fold_numbers(arrays, np.nansum))
        elif name in _MAXED:
            columns.append(_fold_numbers(arrays, np.nanmax))
        elif name in _FIRST:
            columns.append(pc.coalesce(*arrays))
        elif name == "status":
            columns.append(pa.array(row_status, pa.string()))
        elif name == "cost_source":
            columns.append(_fold_cost_source(arrays))
        elif name == "error_message":
            columns.append(_fold_error_message(arrays, status, row_status, chosen))
        else:  # error_type, http_status: the deciding sample's
            picked = [
                arrays[int(chosen[i])][i].as_py() if chosen[i] >= 0 else None for i in range(rows)
            ]
            columns.append(pa.array(picked, arrays[0].type))
    return pa.Table.from_arrays(columns, names=names)


def _fold_status(status: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Each row's status and the sample whose error fields it reports (-1: none, pending)."""
    rows = status.shape[1]
    row_status = ["ok"] * rows
    chosen = np.full(rows, -1, dtype=np.int64)
    skipped = (status == "skipped").all(axis=0)
    for i in range(rows):
        column = list(status[:, i])
        if "pending" in column:
            row_status[i] = "pending"
        elif skipped[i]:
            row_status[i], chosen[i] = "skipped", 0
        else:
            for name in _STATUS_ORDER[1:]:
                if name in column:
                    row_status[i], chosen[i] = name, column.index(name)
                    break
            else:
                chosen[i] = 0  # all ok: sample 0's http_status (200)
    return row_status, chosen


def _fold_numbers(arrays: Sequence[pa.Array], reduce: Any) -> pa.Array:
    values = np.stack([a.cast(pa.float64()).to_numpy(zero_copy_only=False) for a in arrays])
    known = ~np.isnan(values).all(axis=0)
    folded = np.zeros(values.shape[1])
    if known.any():
        folded[known] = reduce(values[:, known], axis=0)
    return pa.array(folded, pa.float64(), mask=~known).cast(arrays[0].type)


def _fold_cost_source(arrays: Sequence[pa.Array]) -> pa.Array:
    sources = [a.to_pylist() for a in arrays]
    folded: list[str | None] = []
    for values in zip(*sources, strict=True):
        own = {value for value in values if value is not None and value != SHARED}
        folded.append(own.pop() if len(own) == 1 else "mixed" if own else None)
    return pa.array(folded, pa.string())


def _fold_error_message(
    arrays: Sequence[pa.Array], status: np.ndarray, row_status: list[str], chosen: np.ndarray
) -> pa.Array:
    messages = [a.to_pylist() for a in arrays]
    folded: list[str | None] = []
    for i, state in enumerate(row_status):
        pick = int(chosen[i])
        if pick < 0:
            folded.append(None)
            continue
        message = messages[pick][i]
        failed = [s for s in range(len(arrays)) if status[s, i] == state]
        same = len(failed) == len(arrays) and len({messages[s][i] for s in failed}) == 1
        if state not in ("error", "invalid") or same:
            folded.append(message)  # every sample says the same: no need to name them
        elif len(failed) == 1:
            folded.append(f"sample {pick}: {message}")
        else:
            listed = ", ".join(str(s) for s in failed)
            folded.append(f"samples {listed} {state}; sample {pick}: {message}")
    return pa.array(folded, pa.string())


def list_fields(fields: Sequence[pa.Field], per_sample: Collection[str]) -> list[pa.Field]:
    """``fields`` with the per-sample ones as lists of their type (the list layout)."""
    return [pa.field(f.name, pa.list_(f.type)) if f.name in per_sample else f for f in fields]


__all__ = [
    "DEFAULT_BASE_SEED",
    "LAYOUTS",
    "MAX_NATIVE_N",
    "N_MODES",
    "PER_SAMPLE_RESULTS",
    "SAMPLE_COLUMN",
    "SHARED",
    "SampleRequest",
    "fold_samples",
    "list_fields",
    "plan_requests",
    "row_major",
    "stack_samples",
]
