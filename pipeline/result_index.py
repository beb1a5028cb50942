"""Where every result of a checkpoint is: the index of the latest result per key.

``ResultIndex`` (each key's latest result's position, and per position its status, tokens
and cost) answers which rows are done, what was spent and where to read a result (a
position is a part and a row); ``build_index`` makes it from the parts (and from the index
a run saves, ``index.npz``, written by ``save_arrays`` and read an array at a time), the
latest result of a key winning. It writes no part: ``checkpoint`` owns the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .keys import stable_argsort
from .part_files import names_digest
from .records import COST_CACHE, COST_DEDUP, STATUS_CODES
from .saved_arrays import NpyRange, array_lengths, read_array, save_arrays
from .schema import FORMAT_VERSION
from .schema import PART_SCHEMA as PART_SCHEMA
from .schema import RESULT_SCHEMA as RESULT_SCHEMA

LOOKUP_CHUNK = 1 << 16
KeyArray = np.ndarray | NpyRange  # keys in memory, or recorded in a file and read in slices
SUPERSEDED = -1  # the status of a result a later one of the same key replaced


def position_type(total: int) -> type[np.unsignedinteger[Any]]:
    """The type of a position among ``total`` results (4 bytes up to 4 billion); its
    largest value means "no result"."""
    return np.uint32 if total < np.iinfo(np.uint32).max else np.uint64


def _locate(
    positions: np.ndarray, numbers: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(part number, row) of each position (int32 both); part -1 for a negative one."""
    part = np.full(len(positions), -1, dtype=np.int32)
    row = np.zeros(len(positions), dtype=np.int32)
    have = np.flatnonzero(positions >= 0)
    if len(have) and len(starts):
        at = positions[have].astype(np.int64)
        which = np.searchsorted(starts, at, side="right") - 1
        part[have] = numbers[which]
        row[have] = at - starts[which]
    return part, row


@dataclass
class ResultLocations:
    """Where the latest result of every key in the checkpoint is.

    The results are numbered by position: part after part in part-number order, row after
    row (``starts[i]`` is where part ``numbers[i]`` begins). ``keys`` holds each key once,
    sorted, and ``at`` the position of its latest result; ``status`` is per position
    (``STATUS_CODES``, or ``SUPERSEDED`` for a result a later one replaced). Per-position
    columns stay in part order: building the index sorts 12 bytes a result, not every
    column (it peaked at 53 bytes a result when each column was reordered by key).
    """

    keys: np.ndarray
    at: np.ndarray
    status: np.ndarray
    numbers: np.ndarray
    starts: np.ndarray

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The position of each key's latest result, or -1 when it has none (int64)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(self.keys) == 0:
            return out
        if len(keys) > 4096:
            # sorted queries walk the index in order: ~4x faster than random probes at 1M
            order = np.argsort(keys)
            found = np.empty(len(keys), dtype=np.int64)
            found[order] = np.searchsorted(self.keys, keys[order])
            del order
        else:
            found = np.searchsorted(self.keys, keys)
        np.minimum(found, len(self.keys) - 1, out=found)
        hit = np.flatnonzero(self.keys[found] == keys)
        out[hit] = self.at[found[hit]]
        return out

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part number, row in it) of each position; part -1 for position -1."""
        return _locate(positions, self.numbers, self.starts)

    def counts(self, among: np.ndarray | None = None) -> dict[str, int]:
        """ok / error / skipped counts, of all keys or of the positions ``among``."""
        status = self.status if among is None else self.status[among]
        return {name: int((status == code).sum()) for name, code in STATUS_CODES.items()}

    def places(self, key_arrays: Sequence[KeyArray]) -> RowPlaces:
        """Where the result of each of ``key_arrays``'s keys is, aligned with them (a chunk
        at a time): all that assembling OUTPUT needs, 4 bytes a key."""
        kind = position_type(len(self.status))
        none = np.iinfo(kind).max
        at = []
        for keys in key_arrays:
            at.append(np.full(len(keys), none, dtype=kind))
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                have = np.flatnonzero(pos >= 0)
                at[-1][start + have] = pos[have]
        return RowPlaces(tuple(at), self.numbers, self.starts)

    def counts_of(self, key_arrays: Sequence[KeyArray]) -> tuple[dict[str, int], int]:
        """(status counts, keys without a result) over ``key_arrays``, a chunk at a time so
        that a million keys need no million-entry temporaries."""
        counts = dict.fromkeys(STATUS_CODES, 0)
        missing = 0
        for keys in key_arrays:
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                found = pos[pos >= 0]
                missing += len(pos) - len(found)
                for name, count in self.counts(found).items():
                    counts[name] += count
        return counts, missing


@dataclass(frozen=True)
class RowPlaces:
    """Per key array given to ``ResultLocations.places`` (one per model and sample), the
    position of each key's result (the type's largest value: none), aligned with the keys,
    and the parts' numbers and starts that turn a position into a part and row."""

    at: tuple[np.ndarray, ...]
    numbers: np.ndarray
    starts: np.ndarray

    def missing(self, unit: int) -> np.ndarray:
        """Which keys of unit ``unit`` have no result."""
        at = self.at[unit]
        return at == np.iinfo(at.dtype).max

    def locate(self, unit: int, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """(part, row) of the results of unit ``unit``'s keys ``rows``; part -1: none."""
        at = self.at[unit][rows]
        positions = at.astype(np.int64)
        positions[at == np.iinfo(at.dtype).max] = -1
        return _locate(positions, self.numbers, self.starts)


@dataclass
class ResultIndex(ResultLocations):
    """``ResultLocations`` plus what each result spent, per position, for budgets and
    ``status``: tokens and cost, both 0 for a result that no request paid for (a dedup copy,
    a cached answer; its OUTPUT row still shows the usage of the answer it got) and for a
    superseded one, so that sums count each key's latest result only."""

    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    cost_usd: np.ndarray

    @classmethod
    def empty(cls) -> ResultIndex:
        z = np.zeros(0, dtype=np.int64)
        return cls(
            keys=np.zeros(0, dtype=np.uint64),
            at=np.zeros(0, dtype=np.uint32),
            status=np.zeros(0, dtype=np.int8),
            numbers=z,
            starts=z,
            prompt_tokens=np.zeros(0, dtype=np.int32),
            completion_tokens=np.zeros(0, dtype=np.int32),
            cost_usd=np.zeros(0, dtype=np.float64),
        )


def rows_of(path: Path) -> int:
    """A part's row count; a part that cannot say is named (a run sets it aside first, but
    ``pipeline status`` reads the checkpoint as it is)."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise OutputError(
            f"checkpoint part {path} is damaged ({type(exc).__name__}); the next "
            "`pipeline run` of this OUTPUT sets it aside and sends its rows again"
        ) from None


NOT_SPENT = pa.array([COST_DEDUP, COST_CACHE])  # cost sources of results that no request paid for
PER_KEY = ("keys", "at")
PER_POSITION = ("status", "prompt_tokens", "completion_tokens", "cost_usd")
PER_PART = ("numbers", "starts")
INDEX_ARRAYS = (*PER_KEY, *PER_POSITION, *PER_PART)
INDEX_LAYOUT = 2  # 2: per-position columns in part order (1: every column sorted by key)


class SavedIndexUnreadable(Exception):
    """An array of the saved index could not be read after all: the index is rebuilt."""


@dataclass(frozen=True)
class SavedIndex:
    """A valid saved index, read an array at a time (a run's end need not hold all of
    it at once while it adds the newer parts)."""

    path: Path
    covers: int  # the highest part number it includes
    positions: int  # how many results (of all its parts) it numbers

    def column(self, name: str) -> np.ndarray:
        try:
            return read_array(self.path, name)
        except ValueError:
            raise SavedIndexUnreadable(name) from None

    def index(self) -> ResultIndex:
        return ResultIndex(**{name: self.column(name) for name in INDEX_ARRAYS})


def build_index(new: list[tuple[Path, int]], base: SavedIndex | None) -> ResultIndex:
    """The latest result per key: ``base`` (the saved index, or None) plus the parts ``new``
    ((path, number), in number order), their rows numbered on after the base's.

    Memory, the peak of a run's end: the keys are read and sorted first (26 bytes a
    result at the sort), then the per-position columns are read into arrays allocated
    once (17 bytes a result, in part order: never reordered); 29 bytes a result are kept
    (every column reordered by key peaked at 53).
    """
    sizes = np.array([rows_of(path) for path, _ in new], dtype=np.int64)
    n_old = 0 if base is None else base.positions
    total = n_old + int(sizes.sum())
    firsts = n_old + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    keys, at, replaced = _latest(base, new, sizes, position_type(total))
    per_position = _per_position(base, new, sizes, total)
    per_position["status"][replaced] = SUPERSEDED  # a later result of their key exists
    for name in ("prompt_tokens", "completion_tokens", "cost_usd"):
        per_position[name][replaced] = 0
    del replaced
    return ResultIndex(
        keys=keys,
        at=at,
        numbers=np.concatenate([_old(base, "numbers"), [n for _, n in new]]).astype(np.int64),
        starts=np.concatenate([_old(base, "starts"), firsts]).astype(np.int64),
        **per_position,
    )


def _old(base: SavedIndex | None, name: str) -> np.ndarray:
    """Array ``name`` of the saved index, or an empty one of its type without one."""
    if base is None:
        return getattr(ResultIndex.empty(), name)
    return base.column(name)


def _latest(
    base: SavedIndex | None,
    new: list[tuple[Path, int]],
    sizes: np.ndarray,
    kind: type[np.unsignedinteger[Any]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(every key once, sorted; the position of its latest result; the positions of the
    results a later one replaced): the old index's keys and then every new row's, sorted
    stably, the last of each key kept."""
    old_keys = _old(base, "keys")
    n_keys, n_old = len(old_keys), 0 if base is None else base.positions
    candidates = np.empty(n_keys + int(sizes.sum()), dtype=np.uint64)
    candidates[:n_keys] = old_keys
    del old_keys
    at = n_keys
    for (path, _), size in zip(new, sizes, strict=True):
        column = _read(path, ["key"], int(size)).column("key")
        candidates[at : at + int(size)] = column.to_numpy()
        at += int(size)
    # the candidates are in (part, row) order already, so a stable sort by key keeps each
    # key's results in that order; keep the last of each key
    order, ordered, starts = stable_argsort(candidates)
    del candidates
    positions = _positions(order, _old(base, "at"), n_keys, n_old, kind)
    del order
    last = np.ones(len(positions), dtype=bool)
    last[:-1] = starts[1:]
    del starts
    if last.all():
        return ordered, positions, np.zeros(0, dtype=np.int64)
    # compacted one array at a time: 21 bytes a candidate at most, below the sort's 26
    keys = ordered[last]
    del ordered
    return keys, positions[last], positions[~last]


def _positions(
    order: np.ndarray,
    old_at: np.ndarray,
    n_keys: int,
    n_old: int,
    kind: type[np.unsignedinteger[Any]],
) -> np.ndarray:
    """The position of each sorted candidate's result: an old key's from ``old_at``, a new
    row's after the old positions (a function of its own: no view of ``order`` outlives
    it)."""
    positions = np.empty(len(order), dtype=kind)
    for begin in range(0, len(order), LOOKUP_CHUNK):
        chunk = order[begin : begin + LOOKUP_CHUNK]
        place = chunk - n_keys + n_old
        from_old = np.flatnonzero(chunk < n_keys)
        place[from_old] = old_at[chunk[from_old]]
        positions[begin : begin + len(chunk)] = place
    return positions


def _per_position(
    base: SavedIndex | None, new: list[tuple[Path, int]], sizes: np.ndarray, total: int
) -> dict[str, np.ndarray]:
    """The per-position columns: the old index's, then each new part's rows in order."""
    columns: dict[str, np.ndarray] = {
        "status": np.empty(total, dtype=np.int8),
        "prompt_tokens": np.empty(total, dtype=np.int32),
        "completion_tokens": np.empty(total, dtype=np.int32),
        "cost_usd": np.empty(total, dtype=np.float64),
    }
    n_old = 0 if base is None else base.positions
    for name, column in columns.items():
        column[:n_old] = _old(base, name)  # one saved column at a time
    codes = pa.array(list(STATUS_CODES))
    at = n_old
    for (path, _), size in zip(new, sizes, strict=True):
        names = ["status", "prompt_tokens", "completion_tokens", "cost_usd", "cost_source"]
        table = _read(path, names, int(size))
        end = at + int(size)
        status = pa.compute.index_in(table.column("status"), value_set=codes)
        columns["status"][at:end] = status.to_numpy(zero_copy_only=False)
        # a copy (dedup) or a cached answer spent nothing: its tokens are not counted
        copied = pa.compute.is_in(table.column("cost_source"), value_set=NOT_SPENT)
        for name in ("prompt_tokens", "completion_tokens"):
            spent = pa.compute.if_else(copied, 0, table.column(name).fill_null(0))
            columns[name][at:end] = spent.to_numpy()
        columns["cost_usd"][at:end] = table.column("cost_usd").fill_null(0.0).to_numpy()
        at = end
    return columns


def _read(path: Path, columns: list[str], size: int) -> pa.Table:
    table = pq.read_table(path, columns=columns)
    if table.num_rows != size:
        raise OutputError(
            f"Checkpoint part {path} changed while it was read. Parts are written once; "
            "is another process writing this checkpoint?"
        )
    return table


def save_index(path: Path, parts: dict[int, Path], index: ResultIndex) -> None:
    """Keep ``index``, built from ``parts`` (number -> file), for the next load."""
    if not parts:
        return
    meta = {
        "version": FORMAT_VERSION,
        "layout": INDEX_LAYOUT,
        "covers": max(parts),
        "parts": len(parts),
        "names": names_digest(parts.values()),
    }
    arrays = {name: getattr(index, name) for name in INDEX_ARRAYS}
    save_arrays(path, meta, arrays)


def saved_index(path: Path, parts: dict[int, Path]) -> SavedIndex | None:
    """The index saved at ``path``, if it covers exactly the parts numbered up to its
    ``covers``: a part set aside (quarantine/) or one written since under another name makes
    it stale (a part number is never used twice, and the name carries the part's checksum).
    Only its metadata and array headers are read here."""
    loaded = array_lengths(path)
    if loaded is None:
        return None
    meta, lengths = loaded
    if set(lengths) != set(INDEX_ARRAYS):
        return None
    covers = meta.get("covers")
    if meta.get("version") != FORMAT_VERSION or meta.get("layout") != INDEX_LAYOUT:
        return None
    if not isinstance(covers, int):
        return None
    covered = [file for number, file in parts.items() if number <= covers]
    if len(covered) != meta.get("parts") or names_digest(covered) != meta.get("names"):
        return None
    for group in (PER_KEY, PER_POSITION, PER_PART):
        if len({lengths[name] for name in group}) != 1:
            return None
    return SavedIndex(path=path, covers=covers, positions=lengths["status"])
