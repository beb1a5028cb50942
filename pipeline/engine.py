"""The sending phase of a run, and the seam where "which rows need an answer" meets "how
answers are obtained".

``send`` runs three tasks: ``asks.produce`` (the plan's rows as ``Ask``s), an ``Executor``
(answers them) and the recorder's flusher (checkpoint parts), under one ``Stop`` (signals,
``--max-runtime``, budgets and fatal errors reported by the executor, storage failures).
A soft stop gives the executor ``--grace`` seconds, a hard one none; then it is cancelled and
every result received is written before ``send`` returns. The engine knows nothing of HTTP:
the online executor (``online.OnlineExecutor``) is one executor; any object with
``execute``, ``sent`` and ``cache_hits`` is another (a test answers from a dict).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol

from .asks import Ask, AskStream, RequestShape, Results, produce
from .planning import Plan
from .progress import Reporter
from .recording import Recorder
from .stopping import SignalRelay, Stop, StopKind, deadline, install_signals


class Executor(Protocol):
    """Obtains answers: takes asks, puts one final ``RowResult`` per wanted sample into
    ``results``; stops asking once ``stop`` is set (what it has not answered stays pending),
    and may itself stop the run (``stop.request``: budget, fatal error). It is cancelled
    after the grace period of a stop."""

    @property
    def sent(self) -> int:
        """Requests sent (the summary's ``sent``)."""
        ...

    @property
    def cache_hits(self) -> int:
        """Results answered from the response cache."""
        ...

    async def execute(self, asks: AsyncIterator[Ask], results: Results, stop: Stop) -> None: ...


async def send(
    plan: Plan,
    executor: Executor,
    recorder: Recorder,
    stop: Stop,
    reporter: Reporter,
    *,
    shape: RequestShape,
    n: int,
    concurrency: int,
    grace: float,
    max_runtime: float | None,
    started: float,
    handle_signals: bool = True,
    relay: SignalRelay | None = None,
) -> None:
    """Answer every unit the plan sends (see the module docstring)."""
    _copy_done_duplicates(plan, recorder)
    asks = AskStream(maxsize=concurrency * 2)
    flusher = asyncio.create_task(recorder.flusher())
    work = asyncio.create_task(executor.execute(asks, recorder, stop))
    producer = asyncio.create_task(produce(plan, n, shape, asks, recorder, stop))

    def producer_ended(task: asyncio.Task[None]) -> None:
        # an input that fails while it is read stops the run (the error is raised after)
        if not task.cancelled() and task.exception() is not None:
            stop.request(StopKind.FATAL, f"input: {task.exception()}", hard=True)

    producer.add_done_callback(producer_ended)
    remove_handlers = install_signals(stop, reporter, grace, handle=handle_signals, relay=relay)
    timer = (
        asyncio.create_task(deadline(stop, reporter, max_runtime, grace, started))
        if max_runtime
        else None
    )
    stopping = asyncio.ensure_future(stop.stopping.wait())
    now = asyncio.ensure_future(stop.now.wait())
    try:
        await asyncio.wait([work, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not work.done() and not stop.hard:
            # requests in flight get the grace period, unless a hard stop comes first
            await asyncio.wait([work, now], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # whatever ended the wait (the end, a stop, a cancel from outside): no task is left
        # running, and every result received is written before the run goes on
        for task in (work, producer, stopping, now):
            task.cancel()
        await asyncio.gather(work, producer, return_exceptions=True)
        remove_handlers()
        if timer is not None:
            timer.cancel()
        await _uncancellable(recorder.last_flushes())
        await flusher
    if not work.cancelled() and work.exception() is not None:
        raise work.exception()  # type: ignore[misc]
    if not producer.cancelled() and producer.exception() is not None:
        raise producer.exception()  # type: ignore[misc]


def _copy_done_duplicates(plan: Plan, recorder: Recorder) -> None:
    """Duplicates (``--dedup``) of rows answered by an earlier run get their results now."""
    if not len(plan.copy_from):
        return
    stored = plan.checkpoint.results_at(plan.index, plan.copy_from)
    for result, key in zip(stored, plan.copy_to, strict=True):
        recorder.record_copy(result, int(key))


async def _uncancellable(step: Coroutine[Any, Any, None]) -> None:
    """Run ``step`` to its end even if the caller is cancelled meanwhile (the cancel is
    raised after): the last checkpoint writes must not be cut off."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError
