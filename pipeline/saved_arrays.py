"""The arrays a checkpoint keeps beside its parts: the input's key pass (``input-keys.arrays``,
an ``array_file`` made by ``keys.compute_keys``, see ``keys.KeyPass``) and the run's unit
keys (``keys.npy``, read back a slice at a time: ``NpyRange``). (The result index is an
``array_file`` too.) A missing or damaged key pass reads as None: it is a cache, the next
run makes it again."""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .array_file import ArrayFile, ArrayFileError, gather
from .atomic import atomic_write, fsync_dir
from .keys import KeyPass


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """(shape, dtype) from the header of the .npy data ``fh`` is at; leaves it at the data."""
    if np.lib.format.read_magic(fh) == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return shape, dtype


WRITE_KEYS = 1 << 20  # keys written at once


def write_key_arrays(path: Path, arrays: Sequence[Any], rows: int) -> None:
    """``arrays`` (``rows`` keys each) one after another as one uint64 .npy file, written
    a slice at a time (never held whole; each array read once) and atomically."""
    header = {"descr": "<u8", "fortran_order": False, "shape": (rows * len(arrays),)}
    with atomic_write(path) as tmp, tmp.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for keys in arrays:
            if len(keys) != rows:
                raise ValueError(f"{path}: a key array of {len(keys)} keys, not {rows}")
            for start in range(0, rows, WRITE_KEYS):
                fh.write(np.ascontiguousarray(keys[start : start + WRITE_KEYS], dtype="<u8").data)


class NpyRange:
    """``length`` uint64 values of a one-dimensional .npy file from value ``start`` on,
    read from the file a slice at a time (``len`` and ``[a:b]``, as an array's): for key
    arrays a run no longer needs to hold."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        with path.open("rb") as fh:
            shape, dtype = _npy_header(fh)
            data = fh.tell()
        if dtype != np.dtype("<u8") or len(shape) != 1 or start + length > shape[0]:
            raise ValueError(f"{path} does not hold {start + length} keys")
        self.path, self.length = path, length
        self.offset = data + 8 * start

    @classmethod
    def whole(cls, path: Path) -> NpyRange:
        """Every value of the .npy file at ``path`` (raises OSError or ValueError)."""
        with path.open("rb") as fh:
            shape, _ = _npy_header(fh)
        return cls(path, 0, shape[0] if len(shape) == 1 else -1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: slice) -> np.ndarray:
        begin, end, _ = rows.indices(self.length)
        count = max(end - begin, 0)
        values = np.fromfile(self.path, dtype="<u8", count=count, offset=self.offset + 8 * begin)
        if len(values) != count:
            raise ValueError(f"{self.path} was cut short while it was read")
        return values

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The values at ``rows`` (any order), read a span at a time."""
        return gather(self.__getitem__, self.length, rows, np.uint64)


def staged_key_pass(output: Path) -> Path | None:
    """Where a run writes the input's key pass before it locks its checkpoint: a file
    beside ``output`` that ``take_in`` moves into it (None when that directory cannot be
    made: the pass then goes to an unnamed file, and is not kept). Its writer holds an
    ``flock`` on it (``array_file.ArrayWriter(locked=True)``): another run's cleanup spares
    it (``checkpoint.prepare``)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)  # as the run would
    except OSError:
        return None
    # unique: two runs may have the same pid (containers), and "w+b" empties a file
    return output.parent / f".{output.name}.input-keys.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def in_use(path: Path) -> bool:
    """Whether another open file holds an ``flock`` on ``path`` (a run writing it)."""
    try:
        with path.open("rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def take_in(staged: Path, path: Path) -> None:
    """Move the ``staged`` file to ``path``, durably; a cache, so a failure only drops it."""
    try:
        os.replace(staged, path)
        fsync_dir(path.parent)
    except OSError:
        staged.unlink(missing_ok=True)


def load_key_pass(path: Path) -> KeyPass | None:
    """The key pass saved at ``path``, or None when it is missing or damaged (a cache: the
    next run makes it again)."""
    try:
        file = ArrayFile(path)
    except (OSError, ArrayFileError):
        return None
    key_pass = KeyPass.of(file)
    if key_pass is None:
        file.close()
    return key_pass
