"""Values spread over temporary files by their top bits, so that each bucket can be sorted
on its own: a sort over every key of a checkpoint or every row of an input holds one
bucket, not all of them (``index_build``, ``repeats``).

The files are unnamed (``tempfile.TemporaryFile``): a run killed meanwhile leaves nothing
behind. With no bits at all the pairs are held in memory, in one bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from tempfile import TemporaryFile
from typing import Any, BinaryIO

import numpy as np

from .array_file import ArrayFile, ArrayWriter

BUCKET_KEYS = 1 << 20  # keys sorted at once, about (a bucket: 26 bytes a key at the sort)
MAX_BUCKET_BITS = 8  # at most 256 buckets (512 temporary files open)


def unnamed_file(directory: Path | None) -> BinaryIO:
    """A temporary file in ``directory`` ($TMPDIR when None) without a name: gone once
    closed, even when the process is killed."""
    return TemporaryFile(dir=directory, prefix=".", suffix=".tmp")


def bucket_bits(keys: int, per_bucket: int | None = None) -> int:
    """How many top bits of a key choose its bucket, for about ``keys`` keys."""
    per_bucket = BUCKET_KEYS if per_bucket is None else per_bucket
    bits = 0
    while (keys >> bits) > per_bucket and bits < MAX_BUCKET_BITS:
        bits += 1
    return bits


def grouped(groups: np.ndarray, count: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(an order that puts ``groups``'s items group by group, each group's items in their
    own order; (group, start, stop) in that order of every group with an item), for
    ``groups`` in ``0 .. count-1`` (-1 counts as 0)."""
    order = np.argsort(groups, kind="stable")
    ends = np.searchsorted(groups[order], np.arange(count), side="right")
    return order, [
        (int(g), int(ends[g - 1]) if g else 0, int(ends[g]))
        for g in np.flatnonzero(np.diff(ends, prepend=0))
    ]


class Buckets:
    """(key, value) pairs spread over ``1 << bits`` buckets by their keys' top bits, each
    bucket's in the order they were added: in unnamed files in ``directory`` ($TMPDIR when
    None), or in memory with one bucket (``bits`` 0). Raises OSError when the files cannot
    be made; close it (``with``) to let them go."""

    def __init__(self, bits: int, directory: Path | None = None) -> None:
        self.bits = bits
        self.held: list[tuple[np.ndarray, np.ndarray]] = []
        self.kind: np.dtype[Any] | None = None
        self.files: list[tuple[BinaryIO, BinaryIO]] = []
        try:
            for _ in range(1 << bits if bits else 0):
                keys = unnamed_file(directory)
                self.files.append((keys, keys))  # (closed with the values' if this fails)
                self.files[-1] = (keys, unnamed_file(directory))
        except BaseException:  # too many open files, say
            self.close()
            raise

    def __enter__(self) -> Buckets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.kind = values.dtype
        if not self.bits:
            self.held.append((keys, values))
            return
        order, groups = grouped((keys >> np.uint64(64 - self.bits)).astype(np.intp), 1 << self.bits)
        keys, values = keys[order], values[order]
        for bucket, lo, hi in groups:
            self.files[bucket][0].write(keys[lo:hi].data)
            self.files[bucket][1].write(values[lo:hi].data)

    def upper(self, bucket: int) -> int:
        """The first key past bucket ``bucket`` (2**64 past the last)."""
        return (bucket + 1) << (64 - self.bits)

    def get(self, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Bucket ``bucket``'s keys and values, in the order they were added (once each)."""
        kind = self.kind or np.dtype(np.uint32)
        if not self.bits:
            keys = [k for k, _ in self.held] or [np.zeros(0, np.uint64)]
            values = [v for _, v in self.held] or [np.zeros(0, kind)]
            self.held = []
            return np.concatenate(keys), np.concatenate(values)
        held_keys, held_values = self.files[bucket]
        return _read_back(held_keys, np.dtype(np.uint64)), _read_back(held_values, np.dtype(kind))

    def close(self) -> None:
        for keys, values in self.files:
            keys.close()
            values.close()
        self.held = []


class Spread:
    """Records (rows of two values of type ``kind``) spread over ``count`` unnamed files in
    ``directory`` ($TMPDIR when None) by a group number each, then read back a group at a
    time, in the order they were added, as often as asked. Raises OSError when the files
    cannot be made or written; close it (``with``) to let them go."""

    def __init__(self, count: int, directory: Path | None, kind: type[Any]) -> None:
        self.kind = np.dtype(kind)
        self.files: list[BinaryIO] = []
        try:
            for _ in range(count):
                self.files.append(unnamed_file(directory))
        except BaseException:  # too many open files, say
            self.close()
            raise

    def __enter__(self) -> Spread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, groups: np.ndarray, records: np.ndarray) -> None:
        """Append each of ``records`` (n x 2) to the file of its group (``groups``)."""
        order, spans = grouped(groups, len(self.files))
        ordered = np.ascontiguousarray(records[order], dtype=self.kind)
        for group, lo, hi in spans:
            self.files[group].write(ordered[lo:hi].data)

    def read(self, group: int, chunk: int) -> Iterator[np.ndarray]:
        """Group ``group``'s records, ``chunk`` of them at a time (n x 2 arrays)."""
        fh = self.files[group]
        fh.flush()
        fh.seek(0)
        while len(values := np.fromfile(fh, self.kind, 2 * chunk)):
            yield values.reshape(-1, 2)

    def let_go(self, group: int) -> None:
        """Give back the disk group ``group``'s records took (it reads empty from now on)."""
        self.files[group].seek(0)
        self.files[group].truncate()

    def close(self) -> None:
        files, self.files = self.files, []
        for fh in files:
            with contextlib.suppress(OSError):  # (its data is let go of: a full disk
                fh.close()  # fails the flush)


def write_spilled(
    fill: Callable[[ArrayWriter], dict[str, Any]], path: Path | None, directory: Path | None
) -> ArrayFile:
    """The array file ``fill`` writes (it returns the footer's metadata): at ``path`` (under
    an ``flock`` while the file is open), or (None) in an unnamed file in ``directory``
    ($TMPDIR when None); written again in memory when the disk cannot take it (full, or not
    ours to write)."""
    makers: list[Callable[[], ArrayWriter]] = [
        (lambda: ArrayWriter(path, locked=True))
        if path is not None
        else (lambda: ArrayWriter(None, unnamed_file(directory))),
        lambda: ArrayWriter(None),
    ]
    for attempt, make in enumerate(makers):
        try:
            writer = make()
        except OSError:
            continue
        try:
            return writer.close(fill(writer))
        except OSError:
            writer.abort()
            if attempt == len(makers) - 1:
                raise
        except BaseException:
            writer.abort()
            raise
    raise OSError("no file could be written, not even in memory")


def _read_back(fh: BinaryIO, kind: np.dtype[Any]) -> np.ndarray:
    """What was written to ``fh``, which is closed (and so gone)."""
    fh.flush()
    fh.seek(0)
    values = np.fromfile(fh, kind)
    fh.close()
    return values
