"""The library's entry points, wired from the engine's parts: ``run_batch`` (sync),
``run_async``, and ``RunThread`` for callers whose thread already runs an event loop.

A run, in order:

1. ``planning.plan_run``: open the input, validate the prompt source and the API key, lock
   OUTPUT's checkpoint, check its fingerprint, find which rows still need a result; every
   usage error is raised here, before any request (exit code 2);
2. ``engine.send``: the rows as asks to an executor (``online.OnlineExecutor``, or
   ``Seams.executor``), results into checkpoint parts (``recording.Recorder``), until the
   end, a stop (``stopping``: signal, deadline, budget, fatal error) or a storage failure;
3. OUTPUT written from the checkpoint, every input row in input order (``writer``), the
   manifest updated, and the summary (``summary``) returned, or raised in ``RunAborted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import engine, remote_output
from .asks import RequestShape
from .batch_input_file import batch_file_job
from .config import RunConfig
from .engine import Executor
from .estimating import estimate_job  # noqa: F401  (the CLI's)
from .limits import BucketFactory
from .memory import fewer_collections, map_large_blocks, release_memory
from .online import OnlineExecutor
from .output import finish_output, start_manifest
from .planning import Plan, plan_run
from .progress import Reporter
from .recording import Recorder
from .records import RunSummary
from .result_index import ResultIndex
from .shards import share_limits
from .stopping import Stop
from .summary import add_answer_summary, raise_aborted, summarize


@dataclass
class Seams:
    """Injectable pieces: tests swap the transport, the sleep, the clock, the reporter and
    the executor.

    ``sleep`` and ``clock`` go together (retry waits and pacing): a fake sleep must advance
    the fake clock it comes with.
    """

    transport: httpx.AsyncBaseTransport | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    reporter: Reporter | None = None
    environ: dict[str, str] | None = None
    handle_signals: bool = True
    # Where SIGINT reaches a run that is not on the main thread (``RunThread``): given the
    # run's handler, deliver signals to it and return a function that stops delivering.
    signals: Callable[[Callable[[int], None]], Callable[[], None]] | None = None
    # How answers are obtained; None: the online executor (HTTP requests to --base-url).
    executor: Executor | None = None
    # The --rpm/--tpm buckets; None: this process's own. ``pipeline.ray`` gives the job's
    # actors one shared pair.
    buckets: BucketFactory | None = None


async def run_async(
    data: Any, output: str | Path, config: RunConfig, seams: Seams | None = None
) -> RunSummary:
    """Run the whole job; returns the summary. Raises UsageError/LockHeld before sending,
    RunAborted (with ``.summary``) after a fatal error or a signal."""
    seams = seams or Seams()
    if remote_output.is_remote(output):  # on object storage: a local working copy of it
        return await _run_on_working_copy(data, str(output), config, seams)
    return await _run(data, Path(output), config, seams)


async def _run(data: Any, output: Path, config: RunConfig, seams: Seams) -> RunSummary:
    """``run_async`` on OUTPUT at a local path."""
    if config.input_format == "openai-batch":  # the file says model, messages and fields
        data, config = batch_file_job(data, config)
    config = share_limits(config)  # a shard's share of the key's --rpm / --tpm
    started = time.monotonic()
    map_large_blocks()
    reporter = seams.reporter or Reporter(
        progress=config.progress, log_interval=config.log_interval
    )
    plan = plan_run(data, output, config, seams.environ, sends=seams.executor is None)
    checkpoint = plan.checkpoint
    try:
        for note in plan.notes:
            reporter.note(note)
        manifest = start_manifest(plan, config)
        checkpoint.end_setup()  # a shard has started: the others may start or finish
        todo = plan.pending
        if plan.shard is not None and plan.shard_rows is not None:
            reporter.note(
                f"shard {plan.shard}: {plan.rows_in_scope()} of {plan.rows} input "
                "rows (rows with the same prompt go together); every shard's results count"
            )
        _announce(reporter, plan, config, output, manifest["fingerprint"], todo)
        stop = Stop()
        recorder = Recorder(
            checkpoint,
            reporter,
            stop,
            followers=plan.followers,
            checkpoint_rows=config.checkpoint_rows,
            checkpoint_seconds=config.checkpoint_seconds,
            grace=config.grace,
        )
        shape = RequestShape(config)
        executor = seams.executor or _executor(config, plan, shape, reporter, seams)
        if todo:
            with fewer_collections():  # the collector's passes cost ~10% while sending
                await engine.send(
                    plan,
                    executor,
                    recorder,
                    stop,
                    reporter,
                    shape=shape,
                    n=config.n,
                    concurrency=config.concurrency,
                    grace=config.grace,
                    max_runtime=config.max_runtime,
                    started=started,
                    handle_signals=seams.handle_signals,
                    relay=seams.signals,
                )
            # the plan's index is out of date now: drop it before building the new one
            plan.index = ResultIndex.empty()
            release_memory()  # what the sending freed: the index is built on top of it
        counts = await finish_output(plan, config, output, manifest, recorder, stop, todo)
        summary = summarize(
            plan,
            counts,
            executor,
            recorder,
            stop,
            output=output,
            fingerprint=manifest["fingerprint"],
            started=started,
        )
        answers = len(plan.models) > 1 or config.labels or config.score
        if answers and output.exists():  # noqa: ASYNC240 (one stat, after the run)
            add_answer_summary(summary, output)
    finally:
        checkpoint.release_lock()
    reporter.summary(summary)
    if summary.aborted:
        raise_aborted(summary)
    return summary


async def _run_on_working_copy(data: Any, uri: str, config: RunConfig, seams: Seams) -> RunSummary:
    """OUTPUT on object storage: the run on a local working copy mirrored to ``uri``
    (``remote_output``); OUTPUT is PUT when the run has written it."""
    remote_output.check_supported(config, uri)
    copy = remote_output.working_copy(uri, overwrite=config.overwrite)
    local = await asyncio.to_thread(copy.__enter__)
    reporter = seams.reporter
    if reporter is not None:
        reporter.note(f"OUTPUT {remote_output.shown(uri)}: working copy {local}")
    try:
        summary = await run_async(data, local, config, seams)
    except BaseException as exc:
        await asyncio.to_thread(copy.__exit__, type(exc), exc, exc.__traceback__)
        raise
    await asyncio.to_thread(copy.__exit__, None, None, None)
    return summary


def _executor(
    config: RunConfig, plan: Plan, shape: RequestShape, reporter: Reporter, seams: Seams
) -> Executor:
    """How this run obtains its answers: the provider's Batch API or one request each."""
    if config.batch:
        from .batch.executor import make_batch_executor

        return make_batch_executor(config, plan, shape, reporter, seams.transport)
    return OnlineExecutor(
        config,
        plan,
        shape,
        reporter,
        transport=seams.transport,
        sleep=seams.sleep,
        clock=seams.clock,
        buckets=seams.buckets,
    )


def _announce(
    reporter: Reporter, plan: Plan, config: RunConfig, output: Path, fingerprint: str, todo: int
) -> None:
    reporter.run_started(
        output=remote_output.shown_output(output),
        fingerprint=fingerprint,
        config=config.public_dict(),
        total=plan.results_in_scope(),
        todo=todo,
        resumed=plan.resumed,
        input_rows=plan.rows_in_scope(),
        per_row=" x ".join(
            f"{count} {word}"
            for count, word in ((len(plan.models), "models"), (config.n, "samples"))
            if count > 1
        ),
    )


def _run_in_new_loop(main: Coroutine[Any, Any, RunSummary]) -> RunSummary:
    """Run on uvloop when it is installed (less CPU per request), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class RunThread:
    """``run_async`` on its own loop in a worker thread, for callers whose thread already runs
    an event loop (Jupyter, a coroutine): that loop stays free, and the run can still be stopped.

    ``interrupt()``, from any thread, does what SIGINT does to a run on the main thread: the
    first stops sending and gives requests in flight ``grace`` seconds, the next stops at
    once; what is done is kept, OUTPUT is written (after the first) and the lock released,
    and the run raises ``RunAborted``. An interrupt that comes before the run starts sending
    takes effect when it does.
    """

    def __init__(
        self, data: Any, output: str | Path, config: RunConfig, seams: Seams | None = None
    ) -> None:
        self._job = (
            data,
            output,
            config,
            dataclasses.replace(seams or Seams(), signals=self._listen),
        )
        self._guard = threading.Lock()
        self._handler: tuple[asyncio.AbstractEventLoop, Callable[[int], None]] | None = None
        self._waiting = 0  # interrupts that came while no handler listened
        self._on_done: Callable[[], None] | None = None
        self._outcome: RunSummary | BaseException | None = None
        self.interrupts = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._target, name="pipeline-run")

    def start(self, on_done: Callable[[], None] | None = None) -> None:
        """Start the run; ``on_done`` is called from the run's thread when it has ended."""
        self._on_done = on_done
        self.thread.start()

    def _target(self) -> None:
        try:
            self._outcome = _run_in_new_loop(run_async(*self._job))
        except BaseException as exc:  # re-raised by result() in the caller's thread
            self._outcome = exc
        finally:
            self.done.set()
            if self._on_done is not None:
                self._on_done()

    def _listen(self, on_signal: Callable[[int], None]) -> Callable[[], None]:
        # called on the run's loop while it sends (see _Run._install_signals)
        with self._guard:
            self._handler = (asyncio.get_running_loop(), on_signal)
            waiting, self._waiting = min(self._waiting, 2), 0
        for _ in range(waiting):
            on_signal(signal.SIGINT)

        def stop_listening() -> None:
            with self._guard:
                self._handler = None

        return stop_listening

    def interrupt(self) -> None:
        """Stop the run as SIGINT would (see the class docstring); safe from any thread."""
        with self._guard:
            self.interrupts += 1
            handler = self._handler
            if handler is None:
                self._waiting += 1
                return
        loop, on_signal = handler
        with contextlib.suppress(RuntimeError):  # the loop has just closed: the run is over
            loop.call_soon_threadsafe(on_signal, signal.SIGINT)

    def result(self) -> RunSummary:
        """The run's summary once ``done``; raises what the run raised. The thread is gone
        when it returns (it is past ``done`` already: only its last lines are left)."""
        if self.done.is_set():
            self.thread.join(timeout=5.0)
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None, "result() before the run ended"
        return outcome


# The RunThreads that Ctrl-C stops now, and the SIGINT handler to put back after the last.
_interruptible: list[RunThread] = []
_sigint_before: list[Any] = []


def _interrupt_runs(signum: int, frame: Any) -> None:
    for run in list(_interruptible):
        run.interrupt()


@contextlib.contextmanager
def sigint_interrupts(run: RunThread, handle_signals: bool = True) -> Iterator[None]:
    """While the caller waits for ``run``, Ctrl-C (SIGINT) interrupts the run, in place of
    whatever the handler did before (raise, cancel a task): the run stops cleanly and the
    caller raises once it has. Several runs at once are all interrupted; the previous
    handler is back when the last one ends. Main thread only (where signals arrive)."""
    if not handle_signals or threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _interruptible:
        _sigint_before[:] = [signal.getsignal(signal.SIGINT)]
        signal.signal(signal.SIGINT, _interrupt_runs)
    _interruptible.append(run)
    try:
        yield
    finally:
        _interruptible.remove(run)
        if not _interruptible:
            previous = _sigint_before.pop() if _sigint_before else None
            signal.signal(
                signal.SIGINT, previous if previous is not None else signal.default_int_handler
            )


def run_batch(
    data: Any, output: str | Path, config: RunConfig, seams: Seams | None = None
) -> RunSummary:
    """Synchronous wrapper around ``run_async``; works inside a running loop (notebooks) too.

    Inside a running loop the run goes to a ``RunThread`` and this call waits for it; Ctrl-C
    (SIGINT) meanwhile stops it as on the command line (again: at once), and the interrupted
    run raises ``RunAborted`` once it has kept what is done and released OUTPUT's lock.
    """
    try:
        asyncio.get_running_loop()
        in_a_loop = True
    except RuntimeError:
        in_a_loop = False
    if not in_a_loop:
        # outside the except block: run there, every exception of the run would carry
        # "RuntimeError: no running event loop" as its context
        return _run_in_new_loop(run_async(data, output, config, seams))
    run = RunThread(data, output, config, seams)
    run.start()
    with sigint_interrupts(run, seams.handle_signals if seams is not None else True):
        while not run.done.is_set():
            try:
                run.thread.join()
            except KeyboardInterrupt:  # raised by a SIGINT handler we could not replace
                run.interrupt()
    summary = run.result()
    if run.interrupts:  # it came too late to stop the run (OUTPUT was being written)
        raise KeyboardInterrupt(f"interrupted after the run had ended; {output} is complete")
    return summary
