"""Giving freed memory back to the operating system between the phases of a run.

The key pass, the result index and the output assembly each build large temporary arrays
and then free them; the allocators (pyarrow's memory pool and glibc's heap) keep much of
that memory mapped for reuse, so the process's resident size would carry every phase's peak
into the next. ``release_memory`` hands it back. It changes no data, only the footprint.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import pyarrow as pa


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries (macOS, musl, Windows)."""
    try:
        # the symbols already loaded into this process: the C library among them
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_memory() -> None:
    """Return the free pages of pyarrow's pool and of the C heap to the OS (a few ms)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
