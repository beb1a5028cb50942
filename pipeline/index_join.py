"""The results of many rows' keys, found with one read of a big index.

A window of rows looked up on its own reads every block of a big index (the keys are
hashes: every window has keys in every block), so finding R rows a window at a time read
the index R / window times: quadratic in the job. ``WindowedPlaces`` reads it once. Every
key, with its unit and row, is spread over unnamed files by the index block that may hold
it; each block is read once and matched with its keys; the matches (a slot in a window, a
position) are spread over files by window of rows, and a window's places are read from its
file. An index held in memory (up to ``CACHED_KEYS`` keys) is looked up a window at a time
instead, and so is one where no temporary file can be written (a full disk).

``PlacesByWindow`` serves assembling OUTPUT from it: a batch of rows at a time, in order.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import numpy as np

from . import result_index
from .records import STATUS_CODES
from .result_index import KeyArray, ResultIndex, RowPlaces, found_in, position_type
from .row_bits import RowMask
from .spill import Spread

MAX_WINDOWS = 256  # a bigger job takes bigger windows (a file open per window)
ROW_BITS = 40  # a spread key's origin: unit << ROW_BITS | row
Counts = tuple[dict[str, int], int]  # (status counts, keys without a result)


class WindowedPlaces:
    """The places (``RowPlaces``) of ``key_arrays``'s keys (aligned, one per unit), a
    window of rows at a time: ``at(start)`` for each of ``starts()``, in any order and as
    often as asked. A window is ``window`` rows, or a multiple of it for a job of over
    ``MAX_WINDOWS`` windows. A big index is joined with every key on first use, the matches
    kept in unnamed files in the index's ``scratch`` (8 bytes a row and unit with a
    result; 16 more a row and unit while the join lasts); ``close`` lets them go."""

    def __init__(self, index: ResultIndex, key_arrays: Sequence[KeyArray], window: int) -> None:
        self.index, self.key_arrays = index, key_arrays
        self.rows = len(key_arrays[0]) if key_arrays else 0
        self.window = window * max(1, -(-self.rows // (window * MAX_WINDOWS)))
        self._matches: Spread | None = None
        self._joined = not (
            index.size > result_index.CACHED_KEYS and len(index.fences) > 1 and self.rows
        )

    def starts(self) -> range:
        return range(0, self.rows, self.window)

    def at(self, start: int) -> RowPlaces:
        """The places of the window's rows that begins at row ``start`` (one of ``starts``)."""
        stop = min(self.rows, start + self.window)
        matches = self._join()
        if matches is None:
            return self.index.places([keys[start:stop] for keys in self.key_arrays])
        kind = position_type(self.index.positions)
        n = stop - start
        flat = np.full(len(self.key_arrays) * n, np.iinfo(kind).max, dtype=kind)
        for pairs in matches.read(start // self.window, result_index.LOOKUP_CHUNK):
            units, rows = np.divmod(pairs[:, 0].astype(np.int64), self.window)
            flat[units * n + rows] = pairs[:, 1]
        at = tuple(flat[unit * n : (unit + 1) * n] for unit in range(len(self.key_arrays)))
        index = self.index
        return RowPlaces(at, index.numbers, index.starts, index.status)

    def close(self) -> None:
        if self._matches is not None:
            self._matches.close()
            self._matches = None

    def _join(self) -> Spread | None:
        """The matches by window, found on first use (None: look windows up one by one)."""
        if not self._joined:
            self._joined = True
            try:
                self._matches = self._match_all()
            except OSError:  # a full disk, a directory not ours to write
                return None
            weakref.finalize(self, self._matches.close)  # (closed when let go of unclosed)
        return self._matches

    def _match_all(self) -> Spread:
        """Spread the keys by block, then match each block once and spread the matches by
        window."""
        index, window = self.index, self.window
        firsts = np.array([first for first, _ in index.fences], dtype=np.uint64)
        wide = index.positions >= np.iinfo(np.uint32).max or len(self.key_arrays) * window >= 2**32
        matches = Spread(len(self.starts()), index.scratch, np.uint64 if wide else np.uint32)
        try:
            with Spread(len(firsts), index.scratch, np.uint64) as by_block:
                _spread(self.key_arrays, firsts, by_block)
                for block in range(len(firsts)):
                    keys, positions = index.block(block)
                    for pairs in by_block.read(block, result_index.LOOKUP_CHUNK):
                        found, hit = found_in(keys, pairs[:, 0])
                        origin = pairs[hit, 1]
                        units = (origin >> np.uint64(ROW_BITS)).astype(np.int64)
                        rows = (origin & np.uint64((1 << ROW_BITS) - 1)).astype(np.int64)
                        records = np.empty((len(hit), 2), dtype=matches.kind)
                        records[:, 0] = units * window + rows % window
                        records[:, 1] = positions[found[hit]]
                        matches.add(rows // window, records)
                    by_block.let_go(block)
            for fh in matches.files:  # (a full disk says so here, not at the first read)
                fh.flush()
        except BaseException:
            matches.close()
            raise
        return matches


def _spread(key_arrays: Sequence[KeyArray], firsts: np.ndarray, by_block: Spread) -> None:
    """Add each key (with its unit and row) to the group of the block that may hold it (the
    last block whose first key is not above it), a chunk of keys at a time."""
    chunk_keys = result_index.LOOKUP_CHUNK
    for unit, keys in enumerate(key_arrays):
        for start in range(0, len(keys), chunk_keys):
            chunk = np.asarray(keys[start : start + chunk_keys], dtype=np.uint64)
            pairs = np.empty((len(chunk), 2), dtype=np.uint64)
            pairs[:, 0] = chunk
            pairs[:, 1] = np.arange(start, start + len(chunk), dtype=np.uint64)
            pairs[:, 1] |= np.uint64(unit << ROW_BITS)
            by_block.add(np.searchsorted(firsts, chunk, side="right") - 1, pairs)


PLACES_WINDOW = 1 << 20  # places held at once (4 bytes each: rows x units)
MIN_WINDOW_ROWS = 1 << 14  # two of OUTPUT's batches: a batch is in at most two windows


class PlacesByWindow:
    """What ``RowPlaces`` answers (``locate``, ``counts``) for ``key_arrays`` (aligned, one
    per unit), a window of rows at a time as they are asked for: assembling OUTPUT holds
    one window's places, not every row's (``PLACES_WINDOW`` places: fewer rows with
    several units), and the index is read once however many windows there are. With
    several units the window before is kept too: OUTPUT asks for a batch's rows a unit
    after another, and a batch across two windows read both again for every unit. The
    index stays open meanwhile; ``close`` lets the windows go."""

    def __init__(self, index: ResultIndex, key_arrays: Sequence[KeyArray]) -> None:
        rows = max(MIN_WINDOW_ROWS, PLACES_WINDOW // max(1, len(key_arrays)))
        self.windows = WindowedPlaces(index, key_arrays, rows)
        self.rows, self.units = self.windows.rows, len(key_arrays)
        self._held: tuple[int, RowPlaces] | None = None  # a window's first row, its places
        self._before: tuple[int, RowPlaces] | None = None  # the one held before it
        # the counts of rows 0..counted, taken as windows were found in order (OUTPUT
        # written): counting every row afterwards finds no window again
        self._counted, self._counts = 0, _no_counts()

    def close(self) -> None:
        self._held = self._before = None
        self.windows.close()

    def _window(self, row: int) -> tuple[int, RowPlaces]:
        """The window that holds row ``row``: its first row and its places."""
        start = row - row % self.windows.window
        if self._before is not None and self._before[0] == start:
            self._held, self._before = self._before, self._held  # (a batch across two)
        if self._held is None or self._held[0] != start:
            self._before, self._held = (self._held if self.units > 1 else None), None
            self._held = (start, self.windows.at(start))
            if start == self._counted:
                self._counts = _added(self._counts, self._held[1].counts())
                self._counted = min(self.rows, start + self.windows.window)
        return self._held

    def locate(self, unit: int, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """(part, row) of the results of unit ``unit``'s keys ``rows``; part -1: none."""
        start, stop, _ = rows.indices(self.rows)
        pieces = []
        while start < stop:
            first, places = self._window(start)
            end = min(stop, first + self.windows.window)
            pieces.append(places.locate(unit, slice(start - first, end - first)))
            start = end
        if len(pieces) == 1:
            return pieces[0]
        none = np.zeros(0, dtype=np.int32)
        return (
            np.concatenate([part for part, _ in pieces] or [none]),
            np.concatenate([row for _, row in pieces] or [none]),
        )

    def answered(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(unit, first row, which rows have a result), a window of rows at a time."""
        for start in self.windows.starts():
            _, places = self._window(start)
            for unit in range(self.units):
                yield unit, start, ~places.missing(unit)

    def counts(self, rows: RowMask | None = None) -> Counts:
        """``RowPlaces.counts`` over every row (or ``rows``), a window at a time."""
        if rows is None and self._counted == self.rows:
            return dict(self._counts[0]), self._counts[1]
        total = _no_counts()
        for start in self.windows.starts():
            _, places = self._window(start)
            chosen = None if rows is None else rows[start : start + self.windows.window]
            total = _added(total, places.counts(chosen))
        return total


def _no_counts() -> Counts:
    return dict.fromkeys(STATUS_CODES, 0), 0


def _added(a: Counts, b: Counts) -> Counts:
    return {name: a[0][name] + b[0].get(name, 0) for name in a[0]}, a[1] + b[1]
