"""Writing a checkpoint's result index file (``result_index``) from its parts and the index
saved before, in memory that does not grow with the results.

The keys of the new parts are spread over buckets by their top bits (temporary files
beside the index once there are more than ``BUCKET_KEYS``), then each bucket is merged
with the old index's keys of that range and sorted on its own, the latest result of each
key kept: the sort holds one bucket, not every key. The per-position columns are copied and
appended a part at a time, a superseded result's tokens and cost set to 0 on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .array_file import ArrayFile, ArrayFileError, ArrayWriter
from .errors import OutputError
from .part_files import names_digest
from .records import COST_CACHE, COST_DEDUP, STATUS_CODES
from .repeats import stable_argsort
from .result_index import (
    INDEX_LAYOUT,
    PER_POSITION,
    SUPERSEDED,
    ResultIndex,
    position_type,
    rows_of,
)
from .schema import FORMAT_VERSION
from .spill import Buckets, bucket_bits

READ_ROWS = 1 << 20  # rows of a part read at once
NOT_SPENT = pa.array([COST_DEDUP, COST_CACHE])  # cost sources of results no request paid for


class SavedIndexUnreadable(Exception):
    """The saved index could not be read after all: the index is rebuilt from every part."""


def index_meta(parts: dict[int, Path]) -> dict[str, Any]:
    """What says which parts an index covers: the highest number, how many, their names."""
    return {
        "version": FORMAT_VERSION,
        "layout": INDEX_LAYOUT,
        "covers": max(parts) if parts else 0,
        "parts": len(parts),
        "names": names_digest(parts.values()),
    }


def saved_index(path: Path, parts: dict[int, Path]) -> ResultIndex | None:
    """The index saved at ``path``, if it covers exactly the parts numbered up to its
    ``covers``: a part set aside (quarantine/) or one written since under another name makes
    it stale (a part number is never used twice, and the name carries the part's checksum).
    Reads its footer and per-position status only."""
    try:
        file = ArrayFile(path)
    except (OSError, ArrayFileError):
        return None
    meta = file.meta
    covers = meta.get("covers")
    current = False
    if isinstance(covers, int):
        covered = {number: part for number, part in parts.items() if number <= covers}
        current = index_meta(covered) == {k: meta.get(k) for k in index_meta(covered)}
    if not current:
        file.close()
        return None
    try:
        return ResultIndex.open(file)
    except (OSError, ArrayFileError):
        return None


def index_of(
    parts: dict[int, Path], saved: Path, temp: Callable[[], Path]
) -> tuple[ResultIndex, int]:
    """(The latest result per key over ``parts`` (number -> path), how many parts were
    read): the index saved at ``saved`` when it is valid for the parts it covers, plus the
    parts written after it, in a new file at ``temp()`` (in memory if that cannot be
    written: a full disk)."""
    base = saved_index(saved, parts)
    covered = base.file.meta["covers"] if base is not None and base.file else 0
    new = [(path, number) for number, path in parts.items() if number > covered]
    if not new:
        return (ResultIndex.empty() if base is None else base), 0
    meta = index_meta(parts)
    try:
        try:
            return build_index(new, base, temp(), meta), len(new)
        except OSError:  # a full disk: held in memory (the run says the disk is full)
            return build_index(new, base, None, meta), len(new)
    except SavedIndexUnreadable:  # damaged after all: a cache, rebuilt from every part
        every = [(path, number) for number, path in parts.items()]
        try:
            return build_index(every, None, temp(), meta), len(every)
        except OSError:
            return build_index(every, None, None, meta), len(every)
    finally:
        if base is not None:
            base.close()


def build_index(
    new: list[tuple[Path, int]],
    base: ResultIndex | None,
    dest: Path | None,
    meta: dict[str, Any],
) -> ResultIndex:
    """The index of ``base`` (the saved index, or None) plus the parts ``new`` ((path,
    number), in number order), their rows numbered on after the base's, written to
    ``dest`` (removed when the index is let go of, unless it is kept: ``keep_as``), or,
    with None, held in memory, every key in one bucket (a disk that is full)."""
    sizes = [rows_of(path) for path, _ in new]
    n_old = 0 if base is None else base.positions
    total = n_old + sum(sizes)
    firsts = n_old + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    kind = position_type(total)
    writer = ArrayWriter(dest)
    try:
        bits = bucket_bits((base.size if base else 0) + sum(sizes)) if dest is not None else 0
        with Buckets(bits, dest.parent if dest is not None else None) as buckets:
            for (path, _), size, first in zip(new, sizes, firsts, strict=True):
                at = int(first)
                for batch in _batches(path, ["key"], size):
                    column = batch.column(0).to_numpy()
                    buckets.add(column, np.arange(at, at + len(column), dtype=kind))
                    at += len(column)
            superseded, fences, keys = _merge(buckets, base, writer, kind)
        spent = _per_position(base, new, sizes, superseded, writer, total)
        old = base if base is not None else ResultIndex.empty()
        numbers = np.array([n for _, n in new], dtype=np.int64)
        writer.append("numbers", np.concatenate([old.numbers, numbers]).astype(np.int64))
        writer.append("starts", np.concatenate([old.starts, firsts]).astype(np.int64))
        file = writer.close({**meta, "keys": keys, "fences": fences, "spent": spent})
    except BaseException:
        writer.abort()
        raise
    return ResultIndex.open(file, temporary=True)


def _base_read(base: ResultIndex, name: str, start: int, stop: int) -> np.ndarray:
    assert base.file is not None
    try:
        return base.file.read(name, start, stop)
    except (OSError, ArrayFileError):
        raise SavedIndexUnreadable(name) from None


def _count_below(base: ResultIndex, value: int) -> int:
    """How many of ``base``'s keys are below ``value``."""
    total = 0
    for block, (first, last) in enumerate(base.fences):
        start, stop = base.blocks[block]
        if value > last:
            total = stop
        elif value > first:
            keys = _base_read(base, "keys", start, stop)
            return start + int(np.searchsorted(keys, np.uint64(value)))
        else:
            return total
    return total


def _merge(
    buckets: Buckets, base: ResultIndex | None, writer: ArrayWriter, kind: type[Any]
) -> tuple[np.ndarray, list[list[int]], int]:
    """Write each bucket's keys, sorted, with the position of each one's latest result;
    returns the superseded positions (sorted), the blocks' fences (first and last key) and
    how many keys there are."""
    writer.declare("keys", np.uint64)
    writer.declare("at", kind)
    superseded = []
    fences: list[list[int]] = []
    count = 0
    cursor = 0  # the base's keys merged so far
    for bucket in range(1 << buckets.bits):
        keys, positions = buckets.get(bucket)
        if base is not None and base.size:
            end = base.size if bucket == (1 << buckets.bits) - 1 else None
            end = _count_below(base, buckets.upper(bucket)) if end is None else end
            keys = np.concatenate([_base_read(base, "keys", cursor, end), keys])
            old_at = _base_read(base, "at", cursor, end).astype(kind)
            positions = np.concatenate([old_at, positions.astype(kind)])
            cursor = end
        if not len(keys):
            continue
        # the old key first, then the new results in position order: a stable sort keeps
        # each key's results in that order; the last of each is kept
        order, ordered, starts = stable_argsort(keys)
        del keys
        positions = positions[order]
        del order
        last = np.ones(len(positions), dtype=bool)
        last[:-1] = starts[1:]
        del starts
        superseded.append(positions[~last])  # positions' own type: 4 bytes each, mostly
        kept = ordered[last]
        writer.append("keys", kept)
        writer.append("at", positions[last])
        fences.append([int(kept[0]), int(kept[-1])])
        count += len(kept)
    return np.sort(np.concatenate(superseded or [np.zeros(0, kind)])), fences, count


def _batches(path: Path, columns: list[str], size: int) -> Iterator[pa.RecordBatch]:
    """The rows of part ``path`` (``size`` of them), ``READ_ROWS`` at a time."""
    read = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=columns):
            read += batch.num_rows
            yield batch
    except OSError:
        read = -1
    if read != size:
        raise OutputError(
            f"Checkpoint part {path} changed while it was read. Parts are written once; "
            "is another process writing this checkpoint?"
        )


def _per_position(
    base: ResultIndex | None,
    new: list[tuple[Path, int]],
    sizes: list[int],
    superseded: np.ndarray,
    writer: ArrayWriter,
    total: int,
) -> list[float]:
    """Write the per-position columns: the old index's, then each new part's rows in
    order, a superseded result's tokens and cost 0; returns the sums."""
    status = np.empty(total, dtype=np.int8)
    sums = [0, 0, 0.0]
    n_old = 0 if base is None else base.positions

    def put(start: int, columns: list[np.ndarray]) -> None:
        stop = start + len(columns[0])
        lo, hi = np.searchsorted(superseded, [start, stop])
        for i, (name, values) in enumerate(zip(PER_POSITION[1:], columns, strict=True)):
            values[superseded[lo:hi].astype(np.int64) - start] = 0
            sums[i] += values.sum().item()
            writer.append(name, values)

    for name, kind in zip(PER_POSITION, (np.int8, np.int32, np.int32, np.float64), strict=True):
        writer.declare(name, kind)
    if base is not None:
        status[:n_old] = base.status
        for start in range(0, n_old, READ_ROWS):
            stop = min(start + READ_ROWS, n_old)
            put(start, [_base_read(base, name, start, stop) for name in PER_POSITION[1:]])
    codes = pa.array(list(STATUS_CODES))
    at = n_old
    names = ["status", "prompt_tokens", "completion_tokens", "cost_usd", "cost_source"]
    for (path, _), size in zip(new, sizes, strict=True):
        for table in _batches(path, names, size):
            end = at + table.num_rows
            status[at:end] = pc.index_in(table.column(0), value_set=codes).to_numpy(
                zero_copy_only=False
            )
            # a copy (dedup) or a cached answer spent nothing: its tokens are not counted
            copied = pc.is_in(table.column("cost_source"), value_set=NOT_SPENT)
            columns = [
                pc.if_else(copied, 0, table.column(name).fill_null(0)).to_numpy().astype(np.int32)
                for name in ("prompt_tokens", "completion_tokens")
            ]
            columns.append(table.column("cost_usd").fill_null(0.0).to_numpy().astype(np.float64))
            put(at, columns)
            at = end
    status[superseded] = SUPERSEDED  # a later result of their key exists
    writer.append("status", status)
    return sums
