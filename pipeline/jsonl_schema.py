"""JSONL values -> Arrow: one column type from the kinds of value seen, and one batch of rows.

Owns how a JSON value's kind maps to an Arrow type (ints with floats become float64; any
other mix, or nested values, become text with nested values as JSON) and building a batch
against a schema. It does not read files or infer the schema over a file (pipeline.reader).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "nested"


def unify_kinds(kinds: set[str]) -> pa.DataType:
    kinds = kinds - {"null"}
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds and kinds <= {"int", "float"}:
        return pa.float64()
    return pa.string()  # text, nested values as JSON text, or a mix


def _to_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def jsonl_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for fld in schema:
        values = [row.get(fld.name) for row in rows]
        if pa.types.is_string(fld.type):
            values = [_to_text(v) for v in values]
        arrays.append(pa.array(values, type=fld.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
