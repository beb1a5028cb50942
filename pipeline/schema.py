"""The result columns as Arrow sees them: one schema for checkpoint parts and OUTPUT.

``records.RESULT_COLUMNS`` names the result columns in order; ``RESULT_SCHEMA`` gives them
their types, ``PART_SCHEMA`` is a checkpoint part's (the key first), ``results_to_table`` and
``row_result`` convert row results to a part table and back. No I/O here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from .records import RESULT_COLUMNS, RowResult, Usage

FORMAT_VERSION = 2  # of parts and the saved index; 2: parts carry cost_usd and cost_source

# The Arrow type of each result column, in ``records.RESULT_COLUMNS`` order: the one list of
# result columns is that tuple; this gives each its type.
_TYPES: dict[str, pa.DataType] = {
    "completion": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
    "reasoning_tokens": pa.int64(),
    "response_model": pa.string(),
    "response_id": pa.string(),
    "status": pa.string(),
    "error_type": pa.string(),
    "error_message": pa.string(),
    "http_status": pa.int64(),
    "attempts": pa.int64(),
    "latency_ms": pa.float64(),
    "cost_usd": pa.float64(),
    "cost_source": pa.string(),
}
RESULT_SCHEMA = pa.schema([(name, _TYPES[name]) for name in RESULT_COLUMNS])
PART_SCHEMA = pa.schema([("key", pa.uint64()), *RESULT_SCHEMA])


def results_to_table(results: Sequence[RowResult]) -> pa.Table:
    """Row results -> a part table (key + result columns)."""
    cols: dict[str, list[Any]] = {name: [] for name in PART_SCHEMA.names}
    for r in results:
        u = r.usage
        values = (
            r.key,
            r.completion,
            r.finish_reason,
            u.prompt_tokens,
            u.completion_tokens,
            u.total_tokens,
            u.cached_tokens,
            u.reasoning_tokens,
            r.response_model,
            r.response_id,
            r.status,
            r.error_type,
            r.error_message,
            r.http_status,
            r.attempts,
            r.latency_ms,
            r.cost_usd,
            r.cost_source,
        )
        for name, value in zip(PART_SCHEMA.names, values, strict=True):
            cols[name].append(value)
    return pa.table(cols, schema=PART_SCHEMA)


def valid_text(result: RowResult) -> RowResult:
    """``result`` with every lone surrogate in its text replaced by U+FFFD."""

    def valid(text: str | None) -> str | None:
        if text is None:
            return None
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

    return dataclasses.replace(
        result,
        completion=valid(result.completion),
        error_message=valid(result.error_message),
        response_model=valid(result.response_model),
        response_id=valid(result.response_id),
        finish_reason=valid(result.finish_reason),
    )


def row_result(record: dict[str, Any]) -> RowResult:
    """A part row (as a dict) back into a RowResult."""
    return RowResult(
        key=record["key"],
        status=record["status"],
        completion=record["completion"],
        finish_reason=record["finish_reason"],
        usage=Usage(
            prompt_tokens=record["prompt_tokens"],
            completion_tokens=record["completion_tokens"],
            total_tokens=record["total_tokens"],
            cached_tokens=record["cached_tokens"],
            reasoning_tokens=record["reasoning_tokens"],
        ),
        response_model=record["response_model"],
        response_id=record["response_id"],
        error_type=record["error_type"],
        error_message=record["error_message"],
        http_status=record["http_status"],
        attempts=record["attempts"] or 0,
        latency_ms=record["latency_ms"],
        cost_usd=record["cost_usd"],
        cost_source=record["cost_source"],
    )
