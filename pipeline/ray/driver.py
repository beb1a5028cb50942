"""``run_on_ray``: one job answered by Ray actors, shard by shard, over OUTPUT's checkpoint.

The driver (this process) connects to Ray (``local``), starts N actors and cuts the job into
``SHARDS_PER_ACTOR`` x N shards (``pipeline.shards``); each actor takes a shard, runs our
async engine on its rows (many requests in flight), records results in OUTPUT's shared
checkpoint as they complete, and takes the next shard (if any) when it is done. What shards
promise holds here (a run sends only rows that no run has answered), so

- an actor that dies (killed, node lost) takes nothing recorded with it: the driver starts a
  new actor on its shard, which sends only that shard's rows without a result (at most
  ``MAX_ATTEMPTS`` actors per shard, then the run stops, exit 3);
- a driver that dies takes its actors with it (they are owned by this job); what they
  recorded stays, and the same command resumes;
- a row that exhausts its retries is an ``error`` row in its shard, as in a local run.

When every shard is done the driver finishes the job as a local run of the whole job would
(it finds every result there, sends nothing, writes OUTPUT if the last shard did not) and
returns that run's summary with the actors' counts of requests, retries, tokens and cost.

Limits: ``--rpm``/``--tpm`` are the key's totals, held for the whole job by one bucket in a
``RateKeeper`` actor (``rate``) that every actor's requests reserve from: the job's rate
whichever actors are running, none faster. What a run learns from the server (headers, the
adaptive rate on 429s) stays each actor's, as between shard processes.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..config import RunConfig
from ..errors import EXIT_ABORTED, PipelineError, RunAborted
from ..merging import merge_output
from ..progress import Reporter
from ..records import RunSummary
from ..runner import RunThread, Seams, run_batch
from ..shards import MAX_SHARDS
from .local import cluster_cpus, connect
from .rate import SharedBuckets, start_keeper

# actors started for one shard in one run before the run gives up on it
MAX_ATTEMPTS = 4
# shards of the job per actor (an actor that is done takes the next). 1: measured with 4 (2
# actors, --rpm at 97% of a server's limit, 300 rows), the rate was the same (each shard
# run's start idles the actor's share as long as the tail it saves) and 4 requests got 429s
SHARDS_PER_ACTOR = 1
# actors are named "pipeline-shard-<random>" (ray.util.list_named_actors shows them)
ACTOR_PREFIX = "pipeline-shard"


# max_concurrency=3: ``interrupt`` and ``progress`` are called while ``run`` runs (Ray's
# stubs lack the option)
@ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0, max_concurrency=3)  # type: ignore[call-overload]
class ShardActor:
    """Runs one shard of a job with our engine; ``interrupt`` stops it as Ctrl-C would."""

    def __init__(self) -> None:
        self.run_thread: RunThread | None = None
        self.reporter = SilentReporter()

    def run(self, data: Any, output: str, config: RunConfig, keeper: Any = None) -> RunSummary:
        """The shard's summary; a run that stopped (fatal error, budget, interrupt) returns
        its summary with ``aborted`` set; errors before sending are raised. ``keeper``: the
        job's ``RateKeeper`` (``--rpm``/``--tpm`` for all actors)."""
        # interrupt() reaches the run as SIGINT would (RunThread's relay; no OS handler)
        buckets = SharedBuckets(keeper) if keeper is not None else None
        seams = Seams(reporter=self.reporter, buckets=buckets)
        self.run_thread = RunThread(data, output, config, seams)
        self.run_thread.start()
        self.run_thread.thread.join()
        try:
            return self.run_thread.result()
        except RunAborted as exc:
            summary: RunSummary | None = getattr(exc, "summary", None)
            if summary is None:
                raise
            return summary

    def interrupt(self) -> None:
        if self.run_thread is not None:
            self.run_thread.interrupt()

    def progress(self) -> tuple[int, int, int]:
        """(results done, results to send, errors) of this run so far."""
        return (self.reporter.done, self.reporter.todo, self.reporter.errors)

    def pid(self) -> int:
        return os.getpid()


@dataclasses.dataclass
class _Shard:
    """One shard's actor and its attempts so far."""

    index: int
    actor: Any
    attempts: int = 1


def run_on_ray(
    data: Any, output: str | Path, config: RunConfig, reporter: Reporter | None = None
) -> RunSummary:
    """Run the job on Ray (see the module docstring); returns the whole job's summary.
    Raises what a local run raises: UsageError/LockHeld before sending, RunAborted after."""
    reporter = reporter or Reporter(progress=config.progress, log_interval=config.log_interval)
    started = time.monotonic()
    output = Path(output).absolute()
    if isinstance(data, str | os.PathLike) and "://" not in str(data):
        data = str(Path(data).absolute())  # actors may run in another directory
    count = config.ray_actors
    started_ray = connect(config.ray_address, num_cpus=max(os.cpu_count() or 1, count or 2))
    try:
        count = count or max(2, cluster_cpus())
        local = dataclasses.replace(
            config, engine="local", ray_address=None, ray_actors=None, progress=False
        )
        runs = _ShardRuns(ray.put(data), output, local, count, reporter)
        reporter.note(
            f"ray: {count} actors take the {runs.count} shards of {output} in turn "
            f"(--shard i/{runs.count} each)"
        )
        try:
            summaries = runs.collect()
        except KeyboardInterrupt:
            raise RunAborted(
                "interrupted twice: the actors were stopped at once; what they recorded is "
                "kept: rerun the same command to continue.",
                reason="interrupted by SIGINT",
            ) from None
        aborted = [s for s in summaries if s.aborted]
        if aborted:
            merged = merge_output(output, data)  # OUTPUT as a stopped local run leaves it
            summary = _combined(aborted[0], summaries, started)
            summary.rows_total, summary.pending = merged.rows_total, merged.pending
            inputs = {s.shard: s.input_rows for s in summaries}
            summary.input_rows = sum(inputs.values()) if len(inputs) == runs.count else 0
            summary.ok, summary.error = merged.counts.get("ok", 0), merged.counts.get("error", 0)
            summary.invalid = merged.counts.get("invalid", 0)
            summary.skipped = merged.counts.get("skipped", 0)
            reporter.summary(summary)
            error = RunAborted(f"run stopped: {summary.aborted}", reason=summary.aborted or "")
            error.summary = summary  # type: ignore[attr-defined]
            raise error
        finish = run_batch(
            data,
            output,
            dataclasses.replace(local, quiet=True),
            Seams(reporter=SilentReporter(), handle_signals=False),
        )
        summary = _combined(finish, summaries, started)
        reporter.summary(summary)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


class _ShardRuns:
    """The actors of one run, the shards of the job they take in turn, and the summaries
    their runs returned."""

    def __init__(
        self, data: Any, output: Path, config: RunConfig, actors: int, reporter: Reporter
    ) -> None:
        self.job = (data, str(output))
        self.actors = actors
        self.count = min(MAX_SHARDS, actors * SHARDS_PER_ACTOR)
        self.config = config
        self.keeper = start_keeper(config.rpm, config.tpm)  # the job's --rpm/--tpm
        self.reporter = reporter
        self.waiting = list(range(self.count))  # shards no actor has taken yet
        self.running: dict[Any, _Shard] = {}  # the object ref of each actor's run
        self.summaries: list[RunSummary] = []
        self.stopping = False

    def collect(self) -> list[RunSummary]:
        """Every shard's summary, once each has run to its end. Ctrl-C interrupts every
        actor (they keep what they have and return); again, the driver kills them."""
        for _ in range(min(self.actors, self.count)):
            self.start(self.new_actor(), self.waiting.pop(0))
        try:
            while self.running:
                try:
                    ready, _ = ray.wait(
                        list(self.running), num_returns=1, timeout=self.config.log_interval
                    )
                except KeyboardInterrupt:
                    if self.stopping:
                        raise
                    self.reporter.note(
                        "ray: interrupted: every actor stops and keeps what it has (Ctrl-C "
                        "again stops at once)"
                    )
                    self.stop()
                    continue
                if ready:
                    self.take(ready[0])
                else:
                    self.report_progress()
        finally:
            for shard in self.running.values():
                ray.kill(shard.actor)
        return self.summaries

    def new_actor(self) -> Any:
        name = f"{ACTOR_PREFIX}-{uuid.uuid4().hex[:12]}"
        return ShardActor.options(name=name).remote()  # type: ignore[attr-defined]

    def start(self, actor: Any, index: int, attempts: int = 1) -> None:
        config = dataclasses.replace(self.config, shard=f"{index}/{self.count}")
        run = actor.run.remote(*self.job, config, self.keeper)
        self.running[run] = _Shard(index, actor, attempts)

    def take(self, done: Any) -> None:
        """A shard's run has ended: keep its summary, or run a dead actor's shard again."""
        shard = self.running.pop(done)
        try:
            summary = ray.get(done)
        except RayActorError as exc:
            self.restart(shard, exc)
            return
        except RayTaskError as exc:  # raised before sending (usage, lock): the run's error
            cause = exc.cause
            raise (cause if isinstance(cause, PipelineError | OSError) else exc) from None
        self.summaries.append(summary)
        if summary.aborted:  # a fatal error, the budget, --max-runtime: every shard stops
            self.stop()
        if self.waiting and not self.stopping:
            self.start(shard.actor, self.waiting.pop(0))
        else:
            ray.kill(shard.actor)  # its CPU goes back to the cluster

    def restart(self, shard: _Shard, exc: Exception) -> None:
        where = f"shard {shard.index}/{self.count}"
        if self.stopping:  # its rows without a result wait for the next run
            return
        if shard.attempts >= MAX_ATTEMPTS:
            raise RunAborted(
                f"ray: the actors of {where} died {shard.attempts} times (last: {exc}); what "
                "they recorded is kept: rerun the same command to continue.",
                reason="actors died",
            ) from None
        self.reporter.note(
            f"ray: the actor of {where} died; a new actor sends that shard's rows without a result"
        )
        self.start(self.new_actor(), shard.index, shard.attempts + 1)

    def report_progress(self) -> None:
        """A log line: what the running actors have done, and the shards that are done."""
        try:
            counts = ray.get([s.actor.progress.remote() for s in self.running.values()], timeout=5)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return  # an actor died or is busy: the next line says it
        done, todo, errors = (sum(column) for column in zip(*counts, strict=True))
        self.reporter.note(
            f"ray: {done}/{todo} results of the running shards done ({errors} error), "
            f"{len(self.summaries)}/{self.count} shards finished"
        )

    def stop(self) -> None:
        """Interrupt every running actor, as Ctrl-C a local run (they return when done)."""
        self.stopping = True
        for shard in self.running.values():
            shard.actor.interrupt.remote()


def _combined(final: RunSummary, shards: list[RunSummary], started: float) -> RunSummary:
    """The whole job's counts (``final``) with what the actors did: requests, retries,
    tokens, cost, finish reasons and error types summed over the shards."""
    reasons: Counter[str] = Counter()
    types: Counter[str] = Counter()
    messages: dict[str, str] = {}
    for s in shards:
        reasons.update(s.finish_reasons)
        types.update(s.error_types)
        messages.update(s.error_messages)
    summary = dataclasses.replace(
        final,
        sent=sum(s.sent for s in shards),
        retries=sum(s.retries for s in shards),
        deduplicated=sum(s.deduplicated for s in shards),
        cache_hits=sum(s.cache_hits for s in shards),
        resumed=sum(s.resumed for s in shards),
        prompt_tokens=sum(s.prompt_tokens for s in shards),
        completion_tokens=sum(s.completion_tokens for s in shards),
        total_tokens=sum(s.total_tokens for s in shards),
        unpriced=sum(s.unpriced for s in shards),
        cost_usd=sum(s.cost_usd for s in shards),
        finish_reasons=dict(reasons),
        error_types=dict(types),
        error_messages=messages,
        wall_seconds=time.monotonic() - started,
        shard=None,
        job_pending=0,
    )
    if final.aborted and not summary.exit_code:
        summary.exit_code = EXIT_ABORTED
    return summary


class SilentReporter(Reporter):
    """A reporter that keeps its counts and prints nothing: the actors' (the driver reports
    for them) and the finishing run's (its summary is replaced)."""

    def __init__(self) -> None:
        super().__init__(progress=False, quiet=True)

    def summary(self, summary: RunSummary) -> None:
        self.close()

    def note(self, text: str, **fields: Any) -> None:
        pass
