"""``run_on_ray``: one job answered by Ray actors, one shard of it each, over OUTPUT's checkpoint.

The driver (this process) connects to Ray (``local``), starts N actors and gives actor i the
job's shard i/N (``pipeline.shards``): each actor runs our async engine on its rows, with
many requests in flight, and records results in OUTPUT's shared checkpoint as they complete.
What shards promise holds here: a run sends only rows that no run has answered, so

- an actor that dies (killed, node lost) takes nothing recorded with it: the driver starts a
  new actor on the same shard, which sends only that shard's rows without a result (at most
  ``MAX_ATTEMPTS`` actors per shard, then the run stops, exit 3);
- a driver that dies takes its actors with it (they are owned by this job); what they
  recorded stays, and the same command resumes;
- a row that exhausts its retries is an ``error`` row in its shard, as in a local run.

When every shard is done the driver finishes the job as a local run of the whole job would
(it finds every result there, sends nothing, writes OUTPUT if the last shard did not) and
returns that run's summary with the actors' counts of requests, retries, tokens and cost.

Limits: ``--rpm``/``--tpm`` are the key's totals and each of the N shards takes 1/N, as a
shard process does (``shards.share_limits``): the split is static, needs no round trip per
request, and a 429 pause in one actor does not stop the others.
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
from .local import cluster_cpus, connect

# actors started for one shard in one run before the run gives up on it
MAX_ATTEMPTS = 4
# actors are named "pipeline-shard-I-of-N-<random>" (ray.util.list_named_actors shows them)
ACTOR_PREFIX = "pipeline-shard"
# seconds an interrupted actor gets beyond --grace to stop and keep what it has
STOP_MARGIN = 15.0


# max_concurrency=2: ``interrupt`` is called while ``run`` runs (Ray's stubs lack the option)
@ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0, max_concurrency=2)  # type: ignore[call-overload]
class ShardActor:
    """Runs one shard of a job with our engine; ``interrupt`` stops it as Ctrl-C would."""

    def __init__(self) -> None:
        self.run_thread: RunThread | None = None

    def run(self, data: Any, output: str, config: RunConfig) -> RunSummary:
        """The shard's summary; a run that stopped (fatal error, budget, interrupt) returns
        its summary with ``aborted`` set; errors before sending are raised."""
        seams = Seams(reporter=Reporter(progress=False, quiet=True), handle_signals=False)
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
        reporter.note(f"ray: {count} actors, one shard of {output} each (--shard i/{count})")
        summaries = _run_shards(ray.put(data), output, local, count, reporter)
        aborted = [s for s in summaries if s.aborted]
        if aborted:
            merged = merge_output(output, data)  # OUTPUT as a stopped local run leaves it
            summary = _combined(aborted[0], summaries, started)
            summary.rows_total, summary.pending = merged.rows_total, merged.pending
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
            Seams(reporter=_Silent(), handle_signals=False),
        )
        summary = _combined(finish, summaries, started)
        reporter.summary(summary)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _run_shards(
    data: Any, output: Path, config: RunConfig, count: int, reporter: Reporter
) -> list[RunSummary]:
    """Every shard's summary, once each has run to its end; a dead actor's shard is run
    again on a new actor. Ctrl-C interrupts every actor (they keep what they have)."""
    running: dict[Any, _Shard] = {}

    def start(shard: _Shard) -> None:
        shard_config = dataclasses.replace(config, shard=f"{shard.index}/{count}")
        running[shard.actor.run.remote(data, str(output), shard_config)] = shard

    for index in range(count):
        start(_Shard(index, _new_actor(index, count)))
    summaries: list[RunSummary] = []
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            shard = running.pop(ready[0])
            try:
                summary = ray.get(ready[0])
            except RayActorError as exc:
                if shard.attempts >= MAX_ATTEMPTS:
                    raise RunAborted(
                        f"ray: the actors of shard {shard.index}/{count} died "
                        f"{shard.attempts} times (last: {exc}); what they recorded is kept: "
                        "rerun the same command to continue.",
                        reason="actors died",
                    ) from None
                reporter.note(
                    f"ray: the actor of shard {shard.index}/{count} died; a new actor sends "
                    "that shard's rows without a result"
                )
                start(_Shard(shard.index, _new_actor(shard.index, count), shard.attempts + 1))
                continue
            except RayTaskError as exc:
                cause = exc.cause
                raise (cause if isinstance(cause, PipelineError | OSError) else exc) from None
            summaries.append(summary)
            if summary.aborted:  # a fatal error, the budget, --max-runtime: all stop
                _stop(running, config)
    except KeyboardInterrupt:
        _stop(running, config)
        raise
    finally:
        for shard in running.values():
            ray.kill(shard.actor)
    return summaries


def _new_actor(index: int, count: int) -> Any:
    name = f"{ACTOR_PREFIX}-{index}-of-{count}-{uuid.uuid4().hex[:8]}"
    return ShardActor.options(name=name).remote()  # type: ignore[attr-defined]


def _stop(running: dict[Any, _Shard], config: RunConfig) -> None:
    """Interrupt every running actor and wait (up to --grace and a margin) for them to keep
    what they have; the driver kills what is left."""
    for shard in running.values():
        shard.actor.interrupt.remote()
    ray.wait(list(running), num_returns=len(running), timeout=config.grace + STOP_MARGIN)


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


class _Silent(Reporter):
    """The finishing run's reporter: it sends nothing and its summary is replaced."""

    def __init__(self) -> None:
        super().__init__(progress=False, quiet=True)

    def summary(self, summary: RunSummary) -> None:
        self.close()

    def note(self, text: str, **fields: Any) -> None:
        pass
