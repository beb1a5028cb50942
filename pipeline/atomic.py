"""Atomic file replacement: the one temp-name, write, fsync, rename, fsync-the-directory recipe.

Owns how a file reaches disk so that a crash at any instant leaves either the old file or the
new one, never half of one. Does not own what is written (callers write into the temporary
path it hands out) nor where files live.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush the data of the file at ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary name a write of ``path`` uses: hidden, per process, ending in ``.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(
    path: Path,
    *,
    temp: Path | None = None,
    sync_dir: bool = True,
    before_replace: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit fsync it, call ``before_replace``
    with it, rename it over ``path`` and (``sync_dir``) fsync the directory. On any error
    the temporary file is removed (a full disk keeps no half-written temp) and the error
    propagates; ``path`` is untouched."""
    tmp = temp or temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
