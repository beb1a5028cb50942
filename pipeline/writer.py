"""Final assembly: every input row, in input order, joined with its result, into one Parquet.

Streams the input again batch by batch and looks each row's result up in the checkpoint
index, so memory holds one input batch and a few checkpoint parts at a time, never the
whole output. Rows without a result yet get ``status = "pending"``. The file is written
under a temporary name, fsynced and renamed over OUTPUT: a failure here leaves the previous
OUTPUT untouched.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import RESULT_SCHEMA, Checkpoint, ResultIndex, _fsync_dir, file_signature
from .reader import InputSource

PART_CACHE = 8


class _PartCache:
    """The few most recently used checkpoint parts (results arrive roughly in input order)."""

    def __init__(self, checkpoint: Checkpoint, size: int = PART_CACHE) -> None:
        self.checkpoint = checkpoint
        self.size = size
        self.tables: OrderedDict[int, pa.Table] = OrderedDict()

    def get(self, number: int) -> pa.Table:
        table = self.tables.get(number)
        if table is None:
            table = self.checkpoint.read_part(number).drop(["key"])
            self.tables[number] = table
            if len(self.tables) > self.size:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(number)
        return table


def _pending(n: int) -> pa.Table:
    arrays = [
        pa.array(["pending"] * n, pa.string()) if f.name == "status" else pa.nulls(n, f.type)
        for f in RESULT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


def results_for(keys: np.ndarray, index: ResultIndex, parts: _PartCache) -> pa.Table:
    """The result columns for ``keys`` (one input batch), in the same order."""
    pos = index.lookup(keys)
    pieces: list[pa.Table] = []
    placed: list[np.ndarray] = []
    have = pos >= 0
    if have.any():
        rows_at = np.nonzero(have)[0]
        part_of = index.part[pos[have]]
        row_of = index.row[pos[have]]
        for number in np.unique(part_of):
            mask = part_of == number
            pieces.append(parts.get(int(number)).take(pa.array(row_of[mask])))
            placed.append(rows_at[mask])
    missing = np.nonzero(~have)[0]
    if len(missing):
        pieces.append(_pending(len(missing)))
        placed.append(missing)
    if not pieces:
        return _pending(0)
    combined = pa.concat_tables(pieces)
    where = np.concatenate(placed)
    inverse = np.empty_like(where)
    inverse[where] = np.arange(len(where))
    return combined.take(pa.array(inverse))


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    return pa.schema([*input_schema.remove_metadata(), *RESULT_SCHEMA])


def write_output(
    source: InputSource,
    keys: np.ndarray,
    index: ResultIndex,
    checkpoint: Checkpoint,
    output: Path,
    before_replace: Callable[[dict[str, int] | None], None] | None = None,
) -> None:
    """Write OUTPUT atomically: input columns in input order + result columns.

    ``before_replace`` gets the new file's signature just before it replaces OUTPUT (the
    rename keeps size and mtime), so that the caller can record it first.
    """
    schema = output_schema(source.schema())
    parts = _PartCache(checkpoint)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    offset = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in source.iter_batches():
                n = batch.num_rows
                results = results_for(keys[offset : offset + n], index, parts)
                offset += n
                columns = [*batch.columns, *results.columns]
                out = pa.Table.from_arrays(
                    [
                        c if isinstance(c, pa.ChunkedArray) else pa.chunked_array([c])
                        for c in columns
                    ],
                    names=schema.names,
                )
                writer.write_table(out.cast(schema))
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(file_signature(tmp))
        os.replace(tmp, output)
        _fsync_dir(output.parent)
    finally:
        tmp.unlink(missing_ok=True)
