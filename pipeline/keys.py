"""Stable 64-bit row keys, computed in one streaming pass over the input.

A row's key is what ties it to its result across runs. With ``--id-column`` it is a hash of
the id; otherwise a hash of the row's prompt-source content together with its occurrence
number among rows of equal content (the n-th row reading "hello" is ("hello", n)). So rows
appended to the input are the only new keys, and editing a row makes only that row new.
Keys live in one ``uint64`` array (8 bytes a row) so that a million rows cost 8 MB.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError
from .reader import InputSource

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _hash_batch(batch: pa.RecordBatch) -> np.ndarray:
    frame = pd.DataFrame({name: _as_object(batch.column(name)) for name in batch.schema.names})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def _as_object(column: pa.Array) -> np.ndarray:
    # Hash the text form so that the same value hashes the same in CSV, Parquet and JSONL.
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        try:
            column = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
            return np.array(values, dtype=object)
    return column.to_numpy(zero_copy_only=False)


def compute_keys(
    source: InputSource, *, id_column: str | None, content_columns: list[str]
) -> np.ndarray:
    """The key of every input row, in input order (uint64)."""
    if id_column is not None:
        return _keys_from_ids(source, id_column)
    # CSV: read every column so that bad bytes anywhere are found now, not at output time
    read = None if source.format == "csv" else content_columns
    hashes = [_hash_batch(b.select(content_columns)) for b in source.iter_batches(columns=read)]
    if not hashes:
        return np.zeros(0, dtype=np.uint64)
    content = np.concatenate(hashes)
    occurrence = pd.Series(content).groupby(content, sort=False).cumcount().to_numpy()
    mixed = content ^ (occurrence.astype(np.uint64) * _MIX)
    return pd.util.hash_array(mixed).astype(np.uint64)


def _keys_from_ids(source: InputSource, id_column: str) -> np.ndarray:
    parts: list[np.ndarray] = []
    offset = 0
    read = None if source.format == "csv" else [id_column]
    for batch in source.iter_batches(columns=read):
        batch = batch.select([id_column])
        column = batch.column(0)
        if column.null_count:
            first = offset + column.is_null().to_pylist().index(True)
            raise InputError(
                f"{source.name}: --id-column '{id_column}' is empty on data row {first + 1}. "
                "Every row needs an id; fill it in or drop --id-column."
            )
        parts.append(_hash_batch(batch))
        offset += batch.num_rows
    keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        dup_keys = set(unique[counts > 1].tolist())
        raise InputError(
            f"{source.name}: --id-column '{id_column}' has duplicate ids: "
            f"{_name_ids(source, id_column, keys, dup_keys)}. Ids must be unique; "
            "deduplicate the input or choose another --id-column."
        )
    return keys


def _name_ids(source: InputSource, id_column: str, keys: np.ndarray, dups: set[int]) -> str:
    names: dict[int, str] = {}
    offset = 0
    for batch in source.iter_batches(columns=[id_column]):
        values = batch.column(0).to_pylist()
        for i, value in enumerate(values):
            key = int(keys[offset + i])
            if key in dups and key not in names:
                names[key] = repr(value)
        offset += batch.num_rows
        if len(names) >= min(len(dups), 10):
            break
    shown = list(names.values())[:10]
    more = f" and {len(dups) - len(shown)} more" if len(dups) > len(shown) else ""
    return ", ".join(shown) + more
