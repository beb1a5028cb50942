"""Why and how a run stops early: one ``Stop`` per run, shared by the engine and its executor.

It owns the stop state (one ``StopKind``, the reason shown to the user, soft or hard), the
SIGINT/SIGTERM handlers and the ``--max-runtime`` deadline. It sends nothing and writes
nothing: the executor stops asking when ``stopping`` is set, the engine gives requests in
flight ``--grace`` seconds after a soft stop and none after a hard one.
"""

from __future__ import annotations

import asyncio
import enum
import signal
import threading
import time
from collections.abc import Callable

from .errors import (
    EXIT_ABORTED,
    EXIT_BATCHES_RUNNING,
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_RETRY_LATER,
    EXIT_STORAGE,
)
from .progress import Reporter


class StopKind(enum.Enum):
    """What ended a run early; each maps to the run's exit code (``exit_code``)."""

    INTERRUPTED = "interrupted"  # SIGINT / SIGTERM / RunThread.interrupt()
    DEADLINE = "deadline"  # --max-runtime
    BUDGET = "budget"  # --max-cost / --max-total-tokens
    FATAL = "fatal"  # 401/403/quota, a setup that fails every request, a bad input read
    RETRY_LATER = "retry_later"  # the server asks, again and again, to come back much later
    STORAGE = "storage"  # the checkpoint or OUTPUT cannot be written
    BATCHES_RUNNING = "batches_running"  # --batch --no-wait: submitted, not all finished

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {
    StopKind.INTERRUPTED: EXIT_INTERRUPTED,
    StopKind.DEADLINE: EXIT_INTERRUPTED,
    StopKind.BUDGET: EXIT_BUDGET,
    StopKind.FATAL: EXIT_ABORTED,
    StopKind.RETRY_LATER: EXIT_RETRY_LATER,
    StopKind.STORAGE: EXIT_STORAGE,
    StopKind.BATCHES_RUNNING: EXIT_BATCHES_RUNNING,
}


class Stop:
    """The stop state of one run. The first request decides kind and reason; a later hard
    request still hardens a soft stop (a second Ctrl-C)."""

    def __init__(self) -> None:
        self.kind: StopKind | None = None
        self.reason: str | None = None  # shown as the summary's ``aborted``
        self.hard = False
        self.stopping = asyncio.Event()  # stop asking; requests in flight get the grace
        self.now = asyncio.Event()  # stop at once: the grace is over

    def request(self, kind: StopKind, reason: str, *, hard: bool = False) -> None:
        if self.kind is None:
            self.kind, self.reason = kind, reason
        self.hard = self.hard or hard
        self.stopping.set()
        if hard:
            self.now.set()

    def is_set(self) -> bool:
        return self.stopping.is_set()

    @property
    def skips_output(self) -> bool:
        """A hard interrupt (Ctrl-C twice) leaves OUTPUT as it was: the user wants out now."""
        return self.hard and self.kind is StopKind.INTERRUPTED


async def deadline(
    stop: Stop, reporter: Reporter, max_runtime: float, grace: float, started: float
) -> None:
    """Stop the run (softly) once ``max_runtime`` seconds have passed since ``started``."""
    await asyncio.sleep(max(max_runtime - (time.monotonic() - started), 0.0))
    reporter.note(
        f"--max-runtime {max_runtime:g}s reached: stopping; requests in flight get {grace:g}s"
    )
    stop.request(StopKind.DEADLINE, f"deadline: --max-runtime {max_runtime:g}s reached")


SignalRelay = Callable[[Callable[[int], None]], Callable[[], None]]


def install_signals(
    stop: Stop, reporter: Reporter, grace: float, *, handle: bool, relay: SignalRelay | None
) -> Callable[[], None]:
    """SIGINT/SIGTERM stop the run: the first softly, the next at once. Returns the
    function that removes the handlers. ``relay`` delivers signals to a run off the main
    thread (``RunThread``)."""
    if not handle or (relay is None and threading.current_thread() is not threading.main_thread()):
        return lambda: None
    received = 0

    def on_signal(signum: int) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            reporter.note(
                f"{name}: stopping; requests in flight get {grace:g}s "
                "(send the signal again to stop at once)"
            )
            stop.request(StopKind.INTERRUPTED, f"interrupted by {name}")
        else:
            reporter.note(f"{name} again: stopping now")
            stop.request(StopKind.INTERRUPTED, f"interrupted by {name}", hard=True)

    if relay is not None:
        return relay(on_signal)
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove
