"""The .npz and .npy files a checkpoint keeps beside its parts: the input's key pass
(``input-keys.npz``, see ``keys.KeyPass``) and the run's unit keys (``keys.npy``, read
back a slice at a time: ``NpyRange``). (The result index is an ``array_file``.)
An .npz is arrays plus JSON metadata, written atomically; a missing or damaged one reads as
None (it is a cache: the next run rebuilds it)."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, fsync_dir
from .keys import KeyPass

KEY_PASS_VERSION = 1


def save_arrays(
    path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray], *, atomic: bool = True
) -> None:
    """An .npz of ``arrays`` plus ``meta`` as JSON, written atomically (temp, fsync,
    rename), or (``atomic=False``: a temporary file itself) in place and fsynced."""
    encoded = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if not atomic:
        with path.open("wb") as fh:
            np.savez(fh, meta=encoded, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        return
    with atomic_write(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, meta=encoded, **arrays)  # type: ignore[arg-type]


def load_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """What ``save_arrays`` wrote, or None when it is missing or damaged."""
    try:
        # our own handle: np.load leaks the one it opens when the zip is damaged
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return meta, arrays


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """(shape, dtype) from the header of the .npy data ``fh`` is at; leaves it at the data."""
    if np.lib.format.read_magic(fh) == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return shape, dtype


def write_key_arrays(path: Path, arrays: Sequence[Any], rows: int) -> None:
    """``arrays`` (``rows`` keys each) one after another as one uint64 .npy file, written
    piece by piece (never joined in memory; each array taken once) and atomically."""
    header = {"descr": "<u8", "fortran_order": False, "shape": (rows * len(arrays),)}
    with atomic_write(path) as tmp, tmp.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for keys in arrays:
            values = np.ascontiguousarray(keys[:], dtype="<u8")
            if len(values) != rows:
                raise ValueError(f"{path}: a key array of {len(values)} keys, not {rows}")
            fh.write(values.data)


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

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: slice) -> np.ndarray:
        begin, end, _ = rows.indices(self.length)
        count = max(end - begin, 0)
        values = np.fromfile(self.path, dtype="<u8", count=count, offset=self.offset + 8 * begin)
        if len(values) != count:
            raise ValueError(f"{self.path} was cut short while it was read")
        return values


def save_key_pass(path: Path, key_pass: KeyPass, *, atomic: bool = True) -> None:
    meta = {
        "version": KEY_PASS_VERSION,
        "params": key_pass.params,
        "stat": key_pass.stat,
        "sha256": key_pass.sha256,
        "ends_with_newline": key_pass.ends_with_newline,
    }
    arrays = {"content": key_pass.content}
    if key_pass.ids is not None:
        arrays["ids"] = key_pass.ids
    save_arrays(path, meta, arrays, atomic=atomic)


def stage_key_pass(output: Path, key_pass: KeyPass) -> Path | None:
    """Write ``key_pass`` beside ``output`` before the run locks its checkpoint (the
    pass's arrays are then let go of); None when it cannot be written (it is a cache)."""
    path = output.parent / f".{output.name}.input-keys.{os.getpid()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as the run would
        save_key_pass(path, key_pass, atomic=False)
    except OSError:
        path.unlink(missing_ok=True)
        return None
    return path


def take_in(staged: Path, path: Path) -> None:
    """Move the ``staged`` file to ``path``, durably; a cache, so a failure only drops it."""
    try:
        os.replace(staged, path)
        fsync_dir(path.parent)
    except OSError:
        staged.unlink(missing_ok=True)


def load_key_pass(path: Path) -> KeyPass | None:
    loaded = load_arrays(path)
    if loaded is None or loaded[0].get("version") != KEY_PASS_VERSION:
        return None
    meta, arrays = loaded
    content, ids = arrays.get("content"), arrays.get("ids")
    if content is None or (ids is not None and len(ids) != len(content)):
        return None
    try:
        return KeyPass(
            params=meta["params"],
            stat=meta["stat"],
            sha256=meta["sha256"],
            ends_with_newline=bool(meta["ends_with_newline"]),
            content=content.astype(np.uint64, copy=False),
            ids=None if ids is None else ids.astype(np.uint64, copy=False),
        )
    except KeyError:
        return None
