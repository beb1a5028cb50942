"""Which rows repeat an earlier row's hash, found with a sort that holds one bucket of
hashes at a time (``spill``): the duplicate groups of a key pass over any number of rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .spill import Buckets, bucket_bits

READ = 1 << 18  # hashes read at once from a file-backed column (~10 MB at the spread)


def stable_argsort(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, values[order], where a run of equal values starts) with equal values kept in
    their original order, as a stable sort would; ~4x faster than one on 1M random keys.

    numpy's default sort (SIMD quicksort) is not stable, so the members of each run of 2+
    equal values are put back in order afterwards: equal keys are few, so that sorts a
    small subset.
    """
    order = np.argsort(values)
    ordered = values[order]
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    in_run = ~starts
    in_run[:-1] |= ~starts[1:]
    if in_run.any():
        members = np.flatnonzero(in_run)
        order[members] = order[members][np.lexsort((order[members], ordered[members]))]
    return order, ordered, starts


def repeats(
    hashes: Any, directory: Path | None = None, *, per_bucket: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows whose hash an earlier row has (ascending), each one's occurrence number
    among the rows of its hash (1, 2, ...) and the first row of its hash.

    ``hashes`` is an array or a column read in slices (``array_file.Column``). Past
    ``per_bucket`` rows (``spill.BUCKET_KEYS``), (hash, row) pairs are spread over unnamed
    files in ``directory`` ($TMPDIR when None) by the hash's top bits, and each bucket is
    sorted on its own: equal hashes share their top bits. So the sort's 26 bytes a row
    are taken by one bucket's rows, not every row's; where no file can be written, by
    every row's.
    Sparse: a row seen for the first time (most rows) costs nothing past the sort.
    """
    rows = len(hashes)
    bits = bucket_bits(rows, per_bucket)
    if not bits:
        return _repeats_among(hashes[:])
    kind = np.uint32 if rows < np.iinfo(np.uint32).max else np.uint64
    parts: tuple[list[np.ndarray], ...] = ([], [], [])  # per bucket: rows, occurrence, leaders
    try:
        with Buckets(bits, directory) as buckets:
            for start in range(0, rows, READ):
                chunk = hashes[start : start + READ]
                buckets.add(chunk, np.arange(start, start + len(chunk), dtype=kind))
            for bucket in range(1 << bits):
                values, where = buckets.get(bucket)
                found, occurrence, leaders = _repeats_among(values)
                del values
                parts[0].append(where[found])
                parts[1].append(occurrence.astype(kind))
                parts[2].append(where[leaders])
    except OSError:  # a full disk: every row at once
        return _repeats_among(hashes[:])
    return _in_row_order(*parts)


def _in_row_order(
    rows: list[np.ndarray], occurrence: list[np.ndarray], leaders: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The buckets' repeats (their rows, occurrences and leaders, 4 bytes each a repeat)
    merged in row order, a column at a time, each column's parts let go of once merged:
    ~32 bytes a repeat at the peak (merged whole, 64)."""
    found = _joined(rows)
    by_row = np.argsort(found)
    in_order = found[by_row].astype(np.int64)
    del found
    occurrences = _joined(occurrence)[by_row]
    firsts = _joined(leaders)[by_row].astype(np.int64)
    return in_order, occurrences, firsts


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """``parts`` one after another, the list emptied (its arrays let go of)."""
    joined = np.concatenate(parts)
    parts.clear()
    return joined


def _repeats_among(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``repeats`` of ``hashes`` all at once (26 bytes a row at the sort)."""
    order, ordered, starts = stable_argsort(hashes)
    del ordered
    found = np.flatnonzero(~starts)  # places in sorted order that are not a group's first
    del starts
    if not len(found):
        return found, np.zeros(0, dtype=np.uint64), found
    # a group's repeats follow its first row in sorted order: each run of consecutive
    # places starts right after that first row
    new_run = np.ones(len(found), dtype=bool)
    new_run[1:] = found[1:] != found[:-1] + 1
    first_place = np.where(new_run, found - 1, 0)
    np.maximum.accumulate(first_place, out=first_place)
    occurrence = (found - first_place).astype(np.uint64)
    rows, leaders = order[found], order[first_place]  # stable: a group's first is its earliest
    del order
    by_row = np.argsort(rows)
    return rows[by_row], occurrence[by_row], leaders[by_row]
