"""``BatchExecutor``: the engine's asks answered through a provider's Batch API.

It writes the asks into part files (``parts``), then drives each part through the journal's
steps (``journal``): upload, create (tagged with job, part and attempt in its metadata),
poll, download the output and error files, merge. Merging records a result for every line
the engine asked for, in the checkpoint (``Results.flush`` makes them durable) before the
journal says ``merged``; lines that expired, were cancelled by the provider, failed with a
429/5xx or are missing go into a new part, up to ``max_rounds`` rounds, then become errors.

A rerun of a killed or ``--no-wait`` run replays the journal: asks whose lines sit in an
open part wait for that part instead of being submitted again; a create announced without
its id is looked for by its tag before anything is created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from ..asks import Ask, RequestShape, Results
from ..config import RunConfig
from ..errors import ConfigError
from ..planning import Plan
from ..pricing import Price
from ..progress import Reporter
from ..records import Cost, RowResult
from ..stopping import Stop, StopKind
from .budget import PartBudget
from .dialect import TERMINAL, BatchView, Dialect
from .journal import Journal, PartState, batch_tag
from .lines import Outcome, given_up, row_result, validation_failed, validation_failure
from .openai import AmbiguousCreate, BatchAPIError, PollLater, TokenLimit
from .parts import MAX_REQUESTS, PartCaps, PartWriter, WrittenPart, ask_lines, read_lines
from .providers import check_batchable, make_dialect

FLUSH_LINES = 2000  # a merge makes its results durable this often (bounded memory; as
# often as an online run's default --checkpoint-rows)


# A create sent and not answered (a kill, a lost answer) may still be in the provider's hands,
# not listed yet: no new attempt (a second billed batch) until it is this many seconds old.
CREATE_SETTLE = 30.0


@dataclass(frozen=True)
class BatchOptions:
    """How batch mode cuts, waits and resubmits."""

    wait: bool = True  # False (--no-wait): submit, collect what is ready, stop
    poll_interval: float = 30.0  # the first wait between polls; x1.5 up to max_poll_interval
    max_poll_interval: float = 600.0
    caps: PartCaps = field(default_factory=PartCaps)
    max_rounds: int = 3  # submissions of one line (expired, missing, 429/5xx lines go again)


class BatchExecutor:
    """See the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        plan: Plan,
        shape: RequestShape,
        reporter: Reporter,
        options: BatchOptions,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        dialect: Callable[[], Dialect] | None = None,
    ) -> None:
        self.config = config
        self.plan = plan
        self.shape = shape
        self.reporter = reporter
        self.options = options
        self.directory = plan.checkpoint.dir / "batch"
        self.journal = Journal(self.directory)
        self._transport = transport
        self._make_dialect = dialect
        self.budget = PartBudget(config, plan.index, plan.prices, self.directory)
        self.sent = 0  # lines submitted by this run
        self.cache_hits = 0
        self.poll_later = 0.0  # seconds a poll answered with Retry-After asks to wait
        self._prices: dict[str, tuple[Price, str] | None] = {}  # model -> batch price, source

    # -- the asks into parts ------------------------------------------------------------------

    async def execute(self, asks: AsyncIterator[Ask], results: Results, stop: Stop) -> None:
        parts = self.journal.replay()
        awaiting = await asyncio.to_thread(self._open_lines, parts)
        held: set[int] = set()  # lines of batches the user cancelled: not sent again
        if not self.config.resubmit_cancelled:
            held = await asyncio.to_thread(self._cancelled_lines, parts)
        asked = array("Q")  # every line's key, 8 bytes each (a set would take ~70)
        kept_back = 0
        writer = PartWriter(self.directory, max(parts, default=0) + 1, self.options.caps)
        async for ask in asks:
            if stop.is_set():
                return
            for key, line in ask_lines(ask, self.config.n, self.config.base_seed):
                asked.append(key)
                if key in held:
                    kept_back += 1
                elif key not in awaiting:
                    writer.add(ask.model, line)
        if kept_back:
            self.reporter.note(
                f"{kept_back} requests of batches cancelled with `pipeline batch cancel` are "
                "not sent again; --resubmit-cancelled sends them"
            )
        for written in await asyncio.to_thread(writer.finish):
            self._add_part(parts, written, round_=1)
        if not any(p.open for p in parts.values()):
            return
        self.budget.commit_created(parts)
        wanted = np.unique(np.frombuffer(asked, dtype=np.uint64))
        del asked
        dialect = self._dialect()
        try:
            await self._drive(parts, wanted, results, stop, dialect)
        except BatchAPIError as exc:
            # what is merged is kept; open parts stay in the journal for the next run
            self.reporter.error(f"stopping the run: {exc.message}", http_status=exc.status)
            stop.request(StopKind.FATAL, f"batch: {exc.message}")
        finally:
            await dialect.aclose()

    def _dialect(self) -> Dialect:
        if self._make_dialect is not None:
            return self._make_dialect()
        return make_dialect(self.config, self.plan.api_key, self._transport)

    def _open_lines(self, parts: dict[int, PartState]) -> dict[int, int]:
        """Result key -> the open part whose lines hold it."""
        awaiting: dict[int, int] = {}
        for state in parts.values():
            if state.open and not state.cancelled:
                for key, _ in read_lines(self.directory / state.file):
                    awaiting[key] = state.part
        return awaiting

    def _lines_elsewhere(self, parts: dict[int, PartState], part: int) -> np.ndarray:
        """Result keys in the open parts other than ``part`` (lines sent again)."""
        others = [
            state
            for state in parts.values()
            if state.open and not state.cancelled and state.part != part
        ]
        return self._keys_of(others)

    def _keys_of(self, states: list[PartState]) -> np.ndarray:
        """The result keys of the lines of these parts' files, in file order."""
        return np.fromiter(
            (key for state in states for key, _ in read_lines(self.directory / state.file)),
            dtype=np.uint64,
        )

    def _cancelled_lines(self, parts: dict[int, PartState]) -> set[int]:
        """Result keys in parts the user cancelled (``pipeline batch cancel``)."""
        return set(self._keys_of([s for s in parts.values() if s.cancelled]).tolist())

    def _add_part(self, parts: dict[int, PartState], written: WrittenPart, round_: int) -> None:
        number = int(written.name.split("-")[1].split(".")[0])
        self.journal.append(
            "part",
            number,
            model=written.model,
            file=written.name,
            lines=written.lines,
            round=round_,
        )
        parts[number] = PartState(
            number, model=written.model, file=written.name, lines=written.lines, round=round_
        )
        self.sent += written.lines
        self.reporter.note(
            f"batch part {number}: {written.lines} requests to {written.model}"
            + (f" (round {round_}: lines sent again)" if round_ > 1 else "")
        )

    # -- driving the parts ----------------------------------------------------------------------

    async def _drive(
        self,
        parts: dict[int, PartState],
        wanted: np.ndarray,
        results: Results,
        stop: Stop,
        client: Dialect,
    ) -> None:
        interval = self.options.poll_interval
        while not stop.is_set():
            changed = False
            # a cancelled batch is still collected: what it answered before is kept
            driven = []
            for state in [p for p in parts.values() if p.open]:
                if state.cancelled and state.batch_id is None:
                    self.journal.append("merged", state.part)  # never created: nothing to get
                    state.merged = True
                else:
                    driven.append(state)
            # every part a step at once: one uploads while the provider works on another;
            # the batches polled are asked about together (one list call where it can)
            client.new_cycle(s.batch_id for s in driven if s.batch_id and s.status is None)
            steps = await asyncio.gather(*(self._advance(state, client) for state in driven))
            changed = any(steps)
            for state in driven:
                if stop.is_set():
                    return
                if state.status is not None and not state.merged:
                    await self._merge(state, parts, wanted, results, client)
                    changed = True
            if not any(p.open for p in parts.values()):
                return
            waiting = [p for p in parts.values() if p.open]
            if all(p.part in self.budget.held for p in waiting) and not any(
                self.budget.refusal(p) is None for p in waiting
            ):
                held = sorted(self.budget.held)
                stop.request(
                    StopKind.BUDGET,
                    f"budget reached: batch part(s) {', '.join(map(str, held))} not created "
                    "(their rows stay pending; rerun with a larger budget to create them)",
                )
                return
            if not self.options.wait:
                running = [p for p in parts.values() if p.open]
                stop.request(
                    StopKind.BATCHES_RUNNING,
                    f"batches running: {len(running)} part(s) not finished "
                    f"({', '.join(p.batch_id or f'part {p.part}' for p in running[:5])}); "
                    "rerun the same command to collect them",
                )
                return
            interval = self.options.poll_interval if changed else interval
            later, self.poll_later = self.poll_later, 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.stopping.wait(), max(interval, later))
            if not changed:
                interval = min(interval * 1.5, self.options.max_poll_interval)

    async def _advance(self, state: PartState, client: Dialect) -> bool:
        """Upload, create, or poll ``state``'s batch one step; True when something changed."""
        journal = self.journal
        if client.uploads and state.file_id is None:
            journal.append("upload", state.part)
            state.file_id = await client.upload(self.directory / state.file)
            journal.append("uploaded", state.part, file_id=state.file_id)
        if state.batch_id is None:
            return await self._create(state, client)
        try:
            view = await client.view(state.batch_id)
        except PollLater as exc:  # Retry-After: the next cycle waits that long
            if exc.wait > self.poll_later:
                self.reporter.note(f"polling batches: {exc}; next poll in {exc.wait:g}s")
            self.poll_later = max(self.poll_later, exc.wait)
            return False
        counts = {"completed": view.completed, "failed": view.failed, "total": view.total}
        if view.status not in TERMINAL:
            seen = (view.remote, view.completed, view.failed, view.total)
            if seen != (state.remote_status, state.completed, state.failed, state.total):
                journal.append("polled", state.part, status=view.remote, **counts)
                state.remote_status, state.completed, state.failed, state.total = seen
            return False
        if view.status == "failed" and view.token_limited:
            # the enqueued-token limit: create again later, without spending a round
            journal.append("requeue", state.part)
            state.batch_id, state.status = None, None
            return True
        journal.append(
            "ended",
            state.part,
            status=view.status,
            output_file_id=view.output_ref,
            error_file_id=view.error_ref,
            errors=view.errors,
            remote=view.remote,
            **counts,
        )
        state.status, state.errors = view.status, view.errors
        state.output_file_id, state.error_file_id = view.output_ref, view.error_ref
        self.reporter.note(
            f"batch {state.batch_id} (part {state.part}) {view.status}: "
            f"{_count(view.completed)} completed, {_count(view.failed)} failed "
            f"of {view.total if view.total is not None else state.lines}"
        )
        return True

    async def _create(self, state: PartState, client: Dialect) -> bool:
        journal = self.journal
        if state.creating is not None:
            # a create announced without its answer (a kill, a lost response)
            if not client.finds:
                raise BatchAPIError(
                    f"batch part {state.part} ({state.file}): a create was sent and its answer "
                    "never saved, and this provider's batches cannot be found by a tag; "
                    "the batch may exist (and be billed). Check the provider's console; "
                    "--restart sends everything again"
                )
            found = await client.find(self._tag(state, state.attempt))
            if found is not None:
                journal.append("created", state.part, batch_id=found, dialect=client.name)
                state.batch_id, state.creating = found, None
                self.reporter.note(f"batch part {state.part}: found batch {found} by its tag")
                return True
            settle = state.creating + CREATE_SETTLE - time.time()
            if settle > 0:
                self.reporter.note(
                    f"batch part {state.part}: its create was sent and not answered; looking "
                    f"for the batch again in {settle:.0f}s before creating it again"
                )
                self.poll_later = max(self.poll_later, settle)
                return False
        refusal = self.budget.admit(state)
        if refusal is not None:
            if state.part not in self.budget.held:
                self.budget.held.add(state.part)
                self.reporter.note(f"batch part {state.part}: not created: {refusal}")
            return False
        attempt = state.attempt + 1
        t0 = time.time()
        journal.append("create", state.part, attempt=attempt, t0=t0)
        state.attempt, state.creating = attempt, t0
        try:
            batch_id = await client.create(
                self.directory / state.file, state.file_id, self._tag(state, attempt)
            )
        except AmbiguousCreate as exc:
            self.reporter.note(
                f"batch part {state.part}: {exc}; looking for it before creating again"
            )
            return False  # next cycle: found by its tag, or created as the next attempt
        except TokenLimit as exc:
            journal.append("refused", state.part)
            state.creating = None
            self.reporter.note(f"batch part {state.part}: {exc}; waiting for running batches")
            return False
        journal.append("created", state.part, batch_id=batch_id, dialect=client.name)
        state.batch_id, state.creating = batch_id, None
        self.reporter.note(f"batch part {state.part}: batch {batch_id} created")
        return True

    def _tag(self, state: PartState, attempt: int) -> dict[str, str]:
        job = (self.plan.checkpoint.identity or {}).get("job", "")
        return batch_tag(str(job), state.part, attempt)

    # -- merging a finished part ----------------------------------------------------------------

    async def _merge(
        self,
        state: PartState,
        parts: dict[int, PartState],
        wanted: np.ndarray,
        results: Results,
        client: Dialect,
    ) -> None:
        view = BatchView(
            state.status or "", output_ref=state.output_file_id, error_ref=state.error_file_id
        )
        paths = await client.fetch(view, self.directory / state.file)
        if state.status == "failed":
            self.reporter.error(
                validation_failure(state.batch_id, state.file, state.errors)
                + "; its rows are errors (rerun with --retry-failed after fixing them)"
            )
        elsewhere = await asyncio.to_thread(self._lines_elsewhere, parts, state.part)
        # the lines still to settle: asked for, and not waiting in a newer part
        ours = await asyncio.to_thread(self._keys_of, [state])
        open_keys = np.unique(ours[np.isin(ours, wanted) & ~np.isin(ours, elsewhere)])
        spent, unsettled = await self._record_outcomes(state, client, paths, open_keys, results)
        if unsettled is None:
            return  # the checkpoint cannot be written: the run stops; a rerun merges again
        again: list[bytes] = []
        if not state.cancelled:  # a cancelled batch's other lines stay pending
            resend = {k for k in unsettled if state.round < self.options.max_rounds}
            for key in unsettled.keys() - resend:
                results.record(given_up(key, unsettled[key], state.round))
            if resend:
                again = [
                    line for key, line in read_lines(self.directory / state.file) if key in resend
                ]
        if again:
            writer = PartWriter(self.directory, max(parts) + 1, self.options.caps)
            for line in again:
                writer.add(state.model, line)
            for written in await asyncio.to_thread(writer.finish):
                self._add_part(parts, written, round_=state.round + 1)
        if not await results.flush():
            return  # the checkpoint cannot be written: the run stops; a rerun merges again
        self.journal.append("merged", state.part)
        state.merged = True
        self.budget.settle(state, spent[0], int(spent[1]))

    async def _record_outcomes(
        self,
        state: PartState,
        client: Dialect,
        paths: list[Path],
        open_keys: np.ndarray,
        results: Results,
    ) -> tuple[tuple[float, int], dict[int, Outcome | None] | None]:
        """Record the result of each open line (``open_keys``: sorted) as its outcome is read
        (never all at once); returns (USD and tokens spent, the lines left unsettled: missing
        (None) or retryable), or None for the latter when the checkpoint cannot be written."""
        spent, recorded = [0.0, 0], 0
        if state.status == "failed":
            for key in open_keys.tolist():
                results.record(
                    validation_failed(key, state.batch_id, state.file, state.errors, state.round)
                )
            return (0.0, 0), {}
        # per open line: 0 open, 1 a retryable outcome kept, 2 settled (an array, not a dict:
        # a part's 50,000 keys as Python ints and dict entries cost ~5 MB more at the peak)
        seen = np.zeros(len(open_keys), dtype=np.int8)
        retryable: dict[int, Outcome | None] = {}
        for key, outcome in client.outcomes(_lines_of(paths)):
            at = int(np.searchsorted(open_keys, np.uint64(key)))
            if at == len(open_keys) or int(open_keys[at]) != key or seen[at]:
                continue  # not ours to settle, or a repeated line (the first wins)
            if outcome.retryable:
                seen[at] = 1
                retryable[key] = outcome
                continue
            seen[at] = 2
            result = self._result(outcome, state)
            usage = result.usage
            spent[0] += result.cost_usd or 0.0
            spent[1] += (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
            results.record(result)
            recorded += 1
            if recorded % FLUSH_LINES == 0 and not await results.flush():
                return (spent[0], int(spent[1])), None
        unsettled = dict.fromkeys(open_keys[seen == 0].tolist()) | retryable
        return (spent[0], int(spent[1])), unsettled

    def _result(self, outcome: Outcome, state: PartState) -> RowResult:
        cost = Cost(None, None)
        completion = outcome.completion
        priced = self._batch_price(state.model)
        if completion is not None and priced is not None:
            usage = completion.usage
            if usage.prompt_tokens is not None and usage.completion_tokens is not None:
                batch, source = priced
                usd = batch.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
                cost = Cost(usd, source)
        return row_result(outcome, attempts=state.round, cost=cost, shape=self.shape)

    def _batch_price(self, model: str) -> tuple[Price, str] | None:
        """The batch price of ``model`` at this provider and its cost source (looked up
        once a model: every line of a part asks)."""
        if model not in self._prices:
            price = self.plan.prices.price(model)
            share = self.plan.prices.batch_share(self.config.base_url)
            self._prices[model] = None if price is None else price.batch(share)
        return self._prices[model]


def _lines_of(paths: Iterable[Path]) -> Iterator[bytes]:
    """Every line of the files, one at a time."""
    for path in paths:
        with open(path, "rb") as fh:
            yield from fh


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def make_batch_executor(
    config: RunConfig,
    plan: Plan,
    shape: RequestShape,
    reporter: Reporter,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BatchExecutor:
    """The batch executor for ``config``, or a ConfigError saying why this run cannot go
    through a Batch API (before anything is sent; never a silent fall back to online)."""
    check_batchable(config, plan.models, shape)
    if (
        config.max_cost is not None or config.max_total_tokens is not None
    ) and config.max_tokens is None:
        raise ConfigError(
            "--batch with --max-cost/--max-total-tokens needs --max-tokens: a batch is paid "
            "when it runs, so each part's worst case must be known before it is created "
            "(e.g. --max-tokens 256)."
        )
    caps = PartCaps(requests=config.batch_max_requests or MAX_REQUESTS)
    options = BatchOptions(wait=config.wait, poll_interval=config.poll_interval, caps=caps)

    def make() -> Dialect:
        return make_dialect(config, plan.api_key, transport)

    return BatchExecutor(config, plan, shape, reporter, options, dialect=make)
