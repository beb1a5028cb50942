"""A file of named one-dimensional arrays written a piece at a time and read a slice at a
time: the result index of a checkpoint (``result_index``), which must not be held whole.

Layout: the pieces' raw little-endian bytes one after another, then a JSON footer (each
array's type and its pieces' offsets and lengths, plus the writer's metadata), then the
footer's length as 8 bytes. An array is the concatenation of its pieces, in the order they
were written, so that pieces of several arrays can be interleaved (a bucket of keys, then
its positions). Written to a temporary name and renamed by the caller; read through one
open descriptor, so that a reader keeps its file after a newer one replaced the name.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_TAIL = 8  # the footer's length, little-endian


class ArrayFileError(ValueError):
    """The file is not one ``ArrayWriter`` finished, or was cut short."""


class ArrayWriter:
    """Appends pieces of named arrays to ``path`` (created or truncated), or with None to a
    file in memory, or to the open file ``fh`` (an unnamed temporary file, say);
    ``close(meta)`` writes the footer and returns the file, open for reading. Each array
    keeps the type of its first piece. ``locked``: an exclusive ``flock`` on the file, held
    until the file returned is let go of (another process may then tell it is in use)."""

    def __init__(self, path: Path | None, fh: Any = None, *, locked: bool = False) -> None:
        self.path = path
        if locked and path is not None:
            fh = _locked_file(path)
        self._fh: Any = fh if fh is not None else path.open("w+b") if path else _memory_file()
        self._arrays: dict[str, dict[str, Any]] = {}

    def declare(self, name: str, dtype: Any) -> None:
        """An array that may get no piece (an empty one still reads as its type)."""
        kind = np.dtype(dtype).newbyteorder("<").str
        self._arrays.setdefault(name, {"dtype": kind, "pieces": []})

    def append(self, name: str, values: np.ndarray) -> None:
        self.declare(name, values.dtype)
        entry = self._arrays[name]
        data = np.ascontiguousarray(values, dtype=entry["dtype"])
        if len(data):
            entry["pieces"].append([self._fh.tell(), len(data)])
            self._fh.write(data.data)

    def close(self, meta: dict[str, Any]) -> ArrayFile:
        footer = json.dumps({"meta": meta, "arrays": self._arrays}).encode()
        self._fh.write(footer)
        self._fh.write(len(footer).to_bytes(_TAIL, "little"))
        self._fh.flush()
        if self.path is not None:
            os.fsync(self._fh.fileno())
        try:
            return ArrayFile(self.path, os.dup(self._fh.fileno()))
        finally:
            self._fh.close()

    def abort(self) -> None:
        self._fh.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _locked_file(path: Path) -> Any:
    """``path`` created or emptied under an exclusive ``flock``, held by the file's
    descriptors (the reader's too) until all are closed; raises OSError, without touching
    the file, when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "w+b")


def _memory_file() -> Any:
    """A file in memory (Linux), or an unnamed temporary file elsewhere."""
    if hasattr(os, "memfd_create"):
        return os.fdopen(os.memfd_create("pipeline-index"), "w+b")
    return tempfile.TemporaryFile()


class ArrayFile:
    """A finished ``ArrayWriter`` file, opened once: ``meta``, ``length(name)`` and
    ``read(name, start, stop)``. Raises ``ArrayFileError`` when the file is not whole."""

    def __init__(self, path: Path | None, fd: int | None = None) -> None:
        self.path = path  # None: a file in memory, open as ``fd``
        self._fd = fd if fd is not None else os.open(path or "", os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self._fd)  # once, when let go of
        try:
            size = os.fstat(self._fd).st_size
            if size < _TAIL:
                raise ArrayFileError(f"{path} is too short")
            length = int.from_bytes(os.pread(self._fd, _TAIL, size - _TAIL), "little")
            if length > size - _TAIL:
                raise ArrayFileError(f"{path} has no footer")
            footer = json.loads(os.pread(self._fd, length, size - _TAIL - length))
            self.meta: dict[str, Any] = footer["meta"]
            self._arrays: dict[str, dict[str, Any]] = footer["arrays"]
            for entry in self._arrays.values():
                np.dtype(entry["dtype"])
                for offset, count in entry["pieces"]:
                    end = offset + count * np.dtype(entry["dtype"]).itemsize
                    if offset < 0 or end > size - _TAIL - length:
                        raise ArrayFileError(f"{path} was cut short")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.close()
            if isinstance(exc, ArrayFileError):
                raise
            raise ArrayFileError(f"{path}: {type(exc).__name__}") from None

    def close(self) -> None:
        self._closer()
        self._fd = -1

    def names(self) -> set[str]:
        return set(self._arrays)

    def dtype(self, name: str) -> np.dtype[Any]:
        return np.dtype(self._arrays[name]["dtype"])

    def pieces(self, name: str) -> list[int]:
        """The lengths of ``name``'s pieces, in order."""
        return [count for _, count in self._arrays[name]["pieces"]]

    def length(self, name: str) -> int:
        return sum(self.pieces(name))

    def _read_into(self, values: np.ndarray, offset: int) -> None:
        """Fill ``values`` from byte ``offset`` on (no copy through a bytes object)."""
        view = memoryview(values.data).cast("B")
        while len(view):
            got = os.preadv(self._fd, [view], offset)
            if got <= 0:
                raise ArrayFileError(f"{self.path} was cut short while it was read")
            view, offset = view[got:], offset + got

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values ``start:stop`` of array ``name``."""
        entry = self._arrays[name]
        dtype = np.dtype(entry["dtype"])
        stop = self.length(name) if stop is None else stop
        out = np.empty(max(stop - start, 0), dtype=dtype)
        at = 0  # where the current piece starts in the array
        for offset, count in entry["pieces"]:
            lo, hi = max(start, at), min(stop, at + count)
            if lo < hi:
                self._read_into(out[lo - start : hi - start], offset + (lo - at) * dtype.itemsize)
            at += count
            if at >= stop:
                break
        return out


GATHER = 1 << 20  # values read at once by ``Column.take``


class Column:
    """Array ``name`` of ``file``, read a slice at a time: ``len``, ``[a:b]`` and ``take``
    as an array's, for per-row arrays a run must not hold (8 bytes a row at 10M rows)."""

    def __init__(self, file: ArrayFile, name: str) -> None:
        self.file, self.name = file, name
        self.length = file.length(name)
        self.dtype = file.dtype(name)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: slice) -> np.ndarray:
        begin, end, _ = rows.indices(self.length)
        return self.file.read(self.name, begin, max(begin, end))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The values at ``rows`` (any order)."""
        return gather(self.__getitem__, self.length, rows, self.dtype)


def gather(
    read: Callable[[slice], np.ndarray], length: int, rows: np.ndarray, dtype: Any
) -> np.ndarray:
    """The values at ``rows`` (any order) of an array of ``length`` that ``read`` reads a
    slice of: a span of at most ``GATHER`` values at a time, each span once."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(len(rows), dtype=dtype)
    if not len(rows):
        return out
    if rows.min() < 0 or rows.max() >= length:
        raise IndexError(f"rows outside 0..{length - 1}")
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    lo = 0
    while lo < len(ordered):
        hi = int(np.searchsorted(ordered, ordered[lo] + GATHER))
        first = int(ordered[lo])
        span = read(slice(first, int(ordered[hi - 1]) + 1))
        out[order[lo:hi]] = span[ordered[lo:hi] - first]
        lo = hi
    return out


def take(values: np.ndarray | Column | Any, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` of an array, or of a ``Column``-like one read in slices."""
    if isinstance(values, np.ndarray):
        return values[rows]
    picked: np.ndarray = values.take(rows)
    return picked
