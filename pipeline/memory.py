"""Giving freed memory back to the operating system between the phases of a run.

The key pass, the result index and the output assembly each build large temporary arrays
and then free them; the allocators (pyarrow's memory pool and glibc's heap) keep much of
that memory mapped for reuse, so the process's resident size would carry every phase's peak
into the next. ``release_memory`` hands it back, and ``map_large_blocks`` keeps glibc from
moving large blocks (numpy's per-row arrays) into its heap in the first place. They change no
data, only the footprint.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import pyarrow as pa

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
LARGE_BLOCK = 128 * 1024  # glibc's default threshold


@functools.cache
def map_large_blocks() -> bool:
    """Fix glibc's mmap threshold at its default (128 KiB); True where that took effect.

    glibc raises the threshold each time a mapped block is freed (up to 32 MiB), after which
    the 8 MB arrays of a million-row run come from the heap and stay resident when freed:
    measured, a 1M-row run then sends with ~45 MB more than a 100k-row run; with the
    threshold fixed, about the same. Setting it once turns the raising off.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))


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
