"""Where every result of a checkpoint is: the index of the latest result per key.

``ResultIndex`` answers which keys are done (``lookup``), where to read a result (a
position is a part and a row: ``locate``), what each position's status is and what was
spent. It lives in a file (``array_file``): every key once, sorted, with the position of its
latest result, read a block at a time; and per position, in part order, its status (held
in memory: 1 byte a result), tokens and cost (read when summed). ``index_build`` writes the
file; ``checkpoint`` owns where it is and keeps the last one (``index.arrays``);
``index_join`` finds the results of many rows with one read of it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .array_file import ArrayFile, ArrayFileError, Column
from .errors import OutputError
from .records import STATUS_CODES
from .saved_arrays import NpyRange
from .unit_keys import DerivedKeys

LOOKUP_CHUNK = 1 << 18  # keys looked up at once: ~12 MB of temporaries
CACHED_KEYS = 1 << 20  # an index of up to this many keys is held once read (12 MB)
# keys in memory, or in a file and read in slices (``len``, ``[a:b]`` and ``take``)
KeyArray = np.ndarray | NpyRange | Column | DerivedKeys
SUPERSEDED = -1  # the status of a result a later one of the same key replaced
INDEX_LAYOUT = 3  # 3: an array file, keys in sorted blocks (2: an .npz held whole)
PER_POSITION = ("status", "prompt_tokens", "completion_tokens", "cost_usd")


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


def found_in(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each of ``keys`` is or would be in ``sorted_keys``, which of them are there)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=np.intp), np.zeros(0, dtype=np.intp)
    found = np.searchsorted(sorted_keys, keys)
    np.minimum(found, len(sorted_keys) - 1, out=found)
    return found, np.flatnonzero(sorted_keys[found] == keys)


def _close(file: ArrayFile, temporary: bool) -> None:
    file.close()
    if temporary and file.path is not None:
        file.path.unlink(missing_ok=True)


@dataclass(eq=False)
class ResultIndex:
    """The latest result of every key in a checkpoint (see the module docstring).

    Positions number the results part after part in part-number order, row after row
    (``starts[i]`` is where part ``numbers[i]`` begins). The keys are sorted in blocks
    (``fences``: each block's first and last key); ``status`` is per position
    (``STATUS_CODES``, or ``SUPERSEDED`` for a result a later one replaced). Tokens and cost
    are 0 for a result no request paid for (a dedup copy, a cached answer) and for a
    superseded one, so that sums count each key's latest result once.
    """

    file: ArrayFile | None
    status: np.ndarray
    numbers: np.ndarray
    starts: np.ndarray
    size: int = 0  # keys
    fences: list[tuple[int, int]] = field(default_factory=list)
    spent: tuple[int, int, float] = (0, 0, 0.0)  # prompt and completion tokens, cost
    temporary: bool = False  # the file is this index's own, removed when it is let go
    scratch: Path | None = None  # where lookups may write temporary files (None: $TMPDIR)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # each block's (start, stop)
    _cache: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.file is not None:
            at = 0
            for count in self.file.pieces("keys"):
                self.blocks.append((at, at + count))
                at += count
            self._finalizer = weakref.finalize(self, _close, self.file, self.temporary)

    @classmethod
    def empty(cls) -> ResultIndex:
        z = np.zeros(0, dtype=np.int64)
        return cls(file=None, status=np.zeros(0, dtype=np.int8), numbers=z, starts=z)

    @classmethod
    def open(cls, file: ArrayFile, *, temporary: bool = False) -> ResultIndex:
        """The index in ``file`` (raises ``ArrayFileError`` when it is not whole)."""
        meta = file.meta
        try:
            index = cls(
                file=file,
                status=file.read("status"),
                numbers=file.read("numbers").astype(np.int64),
                starts=file.read("starts").astype(np.int64),
                size=int(meta["keys"]),
                fences=[(int(a), int(b)) for a, b in meta["fences"]],
                spent=(int(meta["spent"][0]), int(meta["spent"][1]), float(meta["spent"][2])),
                temporary=temporary,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            _close(file, temporary)
            raise ArrayFileError(f"{file.path}: {exc}") from None
        ok = (
            file.length("keys") == file.length("at") == index.size
            and len(index.blocks) == len(index.fences)
            and all(file.length(name) == len(index.status) for name in PER_POSITION)
            and len(index.numbers) == len(index.starts)
        )
        if not ok:
            index.close()
            raise ArrayFileError(f"{file.path}: its arrays do not agree")
        return index

    @property
    def positions(self) -> int:
        return len(self.status)

    def close(self) -> None:
        if self.file is not None:
            self._finalizer()

    def keep_as(self, path: Path) -> None:
        """Give this index's file the name ``path`` (replacing what is there): a later
        load starts from it. The open file is read on."""
        if self.file is None or self.file.path is None or self.file.path == path:
            return
        os.replace(self.file.path, path)
        self._finalizer.detach()
        self.file.path = path
        self.temporary = False
        self._finalizer = weakref.finalize(self, _close, self.file, False)

    # -- reading --------------------------------------------------------------------------

    def _block(self, name: str, block: int) -> np.ndarray:
        cached = self._cache.get((name, block))
        if cached is not None:
            return cached
        assert self.file is not None
        start, stop = self.blocks[block]
        try:
            values = self.file.read(name, start, stop)
        except ArrayFileError as exc:
            raise OutputError(f"the result index {self.file.path} cannot be read: {exc}") from None
        if self.size <= CACHED_KEYS:
            self._cache[(name, block)] = values
        return values

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The position of each key's latest result, or -1 when it has none (int64).
        The keys are sorted and walked through the index's blocks in order, each block
        read once (held, for an index of up to ``CACHED_KEYS`` keys)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if self.size == 0 or len(keys) == 0:
            return out
        order = np.argsort(keys)
        ordered = keys[order]
        for block, (first, last) in enumerate(self.fences):
            lo = int(np.searchsorted(ordered, np.uint64(first), side="left"))
            hi = int(np.searchsorted(ordered, np.uint64(last), side="right"))
            if lo >= hi:
                continue
            found, hit = found_in(self._block("keys", block), ordered[lo:hi])
            if len(hit):
                out[order[lo + hit]] = self._block("at", block)[found[hit]]
        return out

    def read_keys(self) -> np.ndarray:
        """Every key, sorted (all at once: for small indexes and tests)."""
        return np.zeros(0, np.uint64) if self.file is None else self.file.read("keys")

    def read_at(self) -> np.ndarray:
        """Per key (``read_keys``), the position of its latest result (all at once)."""
        return np.zeros(0, np.uint32) if self.file is None else self.file.read("at")

    def read_column(self, name: str) -> np.ndarray:
        """A per-position column (``PER_POSITION``) whole: for small indexes and tests."""
        if self.file is None:
            return np.zeros(0, dtype=np.int8 if name == "status" else np.int64)
        return self.file.read(name)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part number, row in it) of each position; part -1 for position -1."""
        return _locate(positions, self.numbers, self.starts)

    def counts(self, among: np.ndarray | None = None) -> dict[str, int]:
        """ok / error / skipped counts, of all keys or of the positions ``among``."""
        status = self.status if among is None else self.status[among]
        return {name: int((status == code).sum()) for name, code in STATUS_CODES.items()}

    def spent_among(self, among: np.ndarray | None) -> tuple[int, int, float]:
        """(prompt tokens, completion tokens, cost) of all results or of the positions
        ``among``, read a chunk of the columns at a time."""
        if self.file is None:
            return 0, 0, 0.0
        if among is None:
            return self.spent
        wanted = np.sort(among)
        sums: list[float] = [0, 0, 0.0]
        for start in range(0, self.positions, LOOKUP_CHUNK):
            stop = min(start + LOOKUP_CHUNK, self.positions)
            lo, hi = np.searchsorted(wanted, [start, stop])
            if lo == hi:
                continue
            picked = wanted[lo:hi] - start
            for i, name in enumerate(PER_POSITION[1:]):
                sums[i] += self.file.read(name, start, stop)[picked].sum()
        return int(sums[0]), int(sums[1]), float(sums[2])

    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``block``'s keys (sorted) and the position of each one's latest result."""
        return self._block("keys", block), self._block("at", block)

    def places(self, key_arrays: Sequence[KeyArray]) -> RowPlaces:
        """Where the result of each of ``key_arrays``'s keys is, aligned with them (4 bytes
        a key), looked up a chunk of keys at a time: a big index is read once a chunk. Many
        rows of a big one: ``index_join.WindowedPlaces`` reads it once."""
        kind = position_type(self.positions)
        at = tuple(np.full(len(keys), np.iinfo(kind).max, dtype=kind) for keys in key_arrays)
        for keys, places in zip(key_arrays, at, strict=True):
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                have = np.flatnonzero(pos >= 0)
                places[start + have] = pos[have]
        return RowPlaces(at, self.numbers, self.starts, self.status)


@dataclass(frozen=True)
class RowPlaces:
    """Per key array given to ``ResultIndex.places`` (one per model and sample), the
    position of each key's result (the type's largest value: none), aligned with the keys,
    the parts' numbers and starts that turn a position into a part and row, and each
    position's status (for counts)."""

    at: tuple[np.ndarray, ...]
    numbers: np.ndarray
    starts: np.ndarray
    status: np.ndarray

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

    def counts(self, rows: np.ndarray | None = None) -> tuple[dict[str, int], int]:
        """(status counts, keys without a result) over every unit's keys, or over the
        keys of ``rows`` (a boolean mask) only."""
        counts = dict.fromkeys(STATUS_CODES, 0)
        missing = 0
        for at in self.at:
            chosen = at if rows is None else at[rows]
            none = np.iinfo(at.dtype).max
            for start in range(0, len(chosen), LOOKUP_CHUNK):
                piece = chosen[start : start + LOOKUP_CHUNK]
                found = piece[piece != none]
                missing += len(piece) - len(found)
                status = self.status[found]
                for name, code in STATUS_CODES.items():
                    counts[name] += int((status == code).sum())
        return counts, missing


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
