"""Giving freed memory back to the operating system between the phases of a run.

The key pass, the result index and the output assembly each build large temporary arrays
and then free them; the allocators (pyarrow's memory pool and glibc's heap) keep much of
that memory mapped for reuse, so the process's resident size would carry every phase's peak
into the next. ``release_memory`` hands it back, and ``map_large_blocks`` keeps glibc from
moving large blocks (numpy's per-row arrays) into its heap in the first place. They change no
data, only the footprint. ``fewer_collections`` spaces out the cyclic garbage collector while
a run sends (its passes over every young object cost ~10% of the CPU of a request).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Callable, Iterator

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


# Collector thresholds while a run sends: a young-generation pass per 100,000 allocations
# instead of 700. Each request allocates a few dozen short-lived containers, nearly all freed
# by reference counting; the default thresholds ran a pass every ~20 requests over all of
# them. Measured (20k rows against nginx, CPU of the whole process, medians of 6): 2.84 s ->
# 2.59 s. Cycles (exceptions with tracebacks, task callbacks) still go within a pass.
SENDING_THRESHOLDS = (100_000, 50, 50)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Within the block, the collector runs at ``SENDING_THRESHOLDS`` and leaves what exists
    now (imports, the plan) out of its passes (``gc.freeze``); both undone after, so that a
    host process (a notebook) keeps its own settings."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*SENDING_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
