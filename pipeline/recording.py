"""Where every result of a run goes: ``Recorder`` buffers results, writes them to checkpoint
parts and gives each duplicate row (``--dedup``) its first row's result.

Shared by every executor: it knows results and the checkpoint, nothing of how an answer was
obtained. Its promise: a result handed to ``record`` reaches a checkpoint part before the run
ends, or, when the checkpoint cannot be written, the rescue place; only when both fail is it
counted as ``unsaved`` and reported. A failed write stops the run (``StopKind.STORAGE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

from .checkpoint import Checkpoint
from .followers import Followers
from .progress import Reporter
from .records import COST_DEDUP, RowResult
from .stopping import Stop, StopKind


class Recorder:
    """Collects results and writes them as checkpoint parts (see the module docstring).

    A part is written when ``checkpoint_rows`` results are waiting or ``checkpoint_seconds``
    have passed (``flusher``); one write at a time, while results keep collecting for the
    next part.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        reporter: Reporter,
        stop: Stop,
        *,
        followers: Followers,
        checkpoint_rows: int,
        checkpoint_seconds: float,
        grace: float,
    ) -> None:
        self.checkpoint = checkpoint
        self.reporter = reporter
        self.stop = stop
        self.followers = followers  # leader key -> keys of its duplicates sent with it
        self.checkpoint_rows = checkpoint_rows
        self.checkpoint_seconds = checkpoint_seconds
        self.grace = grace
        self.buffer: list[RowResult] = []
        self.deduplicated = 0
        self.storage_error: str | None = None  # the first failed write
        self.unsaved = 0  # results that could not be written anywhere
        self._lock = asyncio.Lock()
        self._flushes: set[asyncio.Task[bool]] = set()  # flushes record() started
        self._flush_scheduled = False
        self._flusher_done = asyncio.Event()
        self._last_flush = time.monotonic()

    def record(self, result: RowResult) -> None:
        """Take one final result (and give it to the row's duplicates)."""
        self.buffer.append(result)
        self.reporter.row_done(result)
        for key in self.followers.pop(result.key):
            self.record_copy(result, key)
        if (
            len(self.buffer) >= self.checkpoint_rows
            and not self._flush_scheduled
            and self.storage_error is None
        ):
            # one flush at a time: while a part is being written, results keep collecting
            # for the next one (scheduling a flush per result would write tiny parts)
            self._flush_scheduled = True
            task = asyncio.get_running_loop().create_task(self.flush())
            self._flushes.add(task)  # awaited before the run ends: never dropped
            task.add_done_callback(self._flushes.discard)

    def record_copy(self, result: RowResult, key: int) -> None:
        """A duplicate row gets its first row's result; it cost nothing itself."""
        self.deduplicated += 1
        self.record(
            dataclasses.replace(
                result,
                key=key,
                attempts=0,
                latency_ms=None,
                # marked whatever its status: budgets and status count no tokens for it
                cost_usd=0.0,
                cost_source=COST_DEDUP,
            )
        )

    async def flush(self) -> bool:
        """Write the buffered results as one part; False when the write failed.

        Never cancelled half way (the flusher is stopped by an event, record()'s flushes are
        awaited): a part write that went on in its thread after a cancel let the next flush
        take the same part number and lose a part. A failed write puts its results back in
        the buffer (nothing received is dropped) and stops the run.
        """
        async with self._lock:
            self._flush_scheduled = False
            if not self.buffer:
                return True
            batch, self.buffer = self.buffer, []
            self._last_flush = time.monotonic()
            try:
                await asyncio.to_thread(self.checkpoint.write_part, batch)
            except Exception as exc:  # disk full, read-only, I/O error: all stop
                self.buffer[:0] = batch
                self._storage_failed(exc)
                return False
            return True

    async def flusher(self) -> None:
        """Write a part every ``checkpoint_seconds`` while results come; ticks the progress."""
        tick = min(self.checkpoint_seconds, 0.5)
        self._last_flush = time.monotonic()
        while not self._flusher_done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flusher_done.wait(), tick)
            self.reporter.tick()
            if (
                self.buffer
                and self.storage_error is None
                and time.monotonic() - self._last_flush >= self.checkpoint_seconds
            ):
                await self.flush()

    async def last_flushes(self) -> None:
        """Every result received reaches a part (or the rescue place) before the run ends."""
        self._flusher_done.set()
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if await self.flush() or not self.buffer:
            return
        # the checkpoint cannot be written: one more try in a moment, then the rescue place
        await asyncio.sleep(min(self.grace, 1.0))
        if await self.flush() or not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        try:
            rescued = await asyncio.to_thread(self.checkpoint.rescue_part, batch)
        except Exception as exc:  # nowhere left to write
            self.unsaved = len(batch)
            self.reporter.error(
                f"{len(batch)} answers received could not be saved anywhere "
                f"({type(exc).__name__}: {exc}); a rerun sends those rows again"
            )
            return
        self.reporter.error(
            f"{len(batch)} answers received could not be written to the checkpoint; they "
            f"were saved to {rescued} and the next run of this OUTPUT takes them from there"
        )

    def storage_failed_at_end(self, exc: OSError, path: Path) -> None:
        """OUTPUT or the manifest could not be written after every result was saved."""
        if self.storage_error is None:
            self.storage_error = f"{type(exc).__name__}: {exc}"
            self.stop.request(StopKind.STORAGE, f"storage: cannot write {path}")
        self.reporter.error(
            f"cannot write {path} ({type(exc).__name__}: {exc}); every result received is in "
            "the checkpoint: free space or fix permissions, then rerun to write OUTPUT"
        )

    def _storage_failed(self, exc: Exception) -> None:
        if self.storage_error is not None:
            return
        self.storage_error = f"{type(exc).__name__}: {exc}"
        self.reporter.error(
            f"stopping the run: cannot write the checkpoint ({self.storage_error}). "
            "Nothing more is sent; the answers received are kept in memory and written "
            "when the run ends if the disk allows. Free space or fix permissions, then rerun."
        )
        self.stop.request(
            StopKind.STORAGE, f"storage: checkpoint write failed: {self.storage_error}"
        )
