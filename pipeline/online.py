"""The online executor: every ask answered by chat-completion requests, many in flight.

Workers take asks from the stream; at most ``--concurrency`` rows are in progress
(``RowGate``: a row waiting out a retry leaves its place) and at most that many requests in
flight (``Limits``). A row's samples are asked with the API's ``n`` or one seeded request
each (``samples.plan_requests``; a server that ignores ``n`` is found out and asked again by
seed); an answer that fails its schema or labels check is asked again (``--max-reasks``).
Each request goes through ``exchange.Exchange`` (cache, budget, limits, retries, client).
Results go to the recorder through ``failfast.FailFast``. Planning, recording, stopping and
OUTPUT are the engine's, shared with every executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx

from .asks import Ask, RequestShape, Results
from .client import ChatClient, make_transport
from .config import RunConfig
from .errors import BudgetReached, FatalError, RequestError, ServerSaysLater
from .exchange import Exchange, Reply
from .failfast import FailFast
from .limits import BucketFactory, Budget, Limits, RowGate
from .planning import Plan
from .progress import Reporter
from .records import COST_MIXED, Choice, Completion, Cost, RowResult, Usage, request_id_of
from .retry import RetryPolicy
from .samples import SHARED, SampleRequest, plan_requests
from .shards import budget_share
from .stopping import Stop, StopKind
from .structured import reask_messages

WORKERS_PER_SLOT = 8  # rows in progress per request in flight (see OnlineExecutor.execute)
_ONE_SAMPLE = [SampleRequest((0,))]  # the only request of a row without --n


@dataclasses.dataclass(frozen=True, slots=True)
class _Sample:
    """One sample's answer being settled: where it came from and what it has cost so far."""

    key: int
    choice: Choice
    completion: Completion
    spent: tuple[Reply, ...]  # the requests paid for it (none: a shared choice of a request)
    attempts: int
    started: float


class OnlineExecutor:
    """Answers asks over HTTP (see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        plan: Plan,
        shape: RequestShape,
        reporter: Reporter,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Any = asyncio.sleep,
        clock: Any = time.monotonic,
        buckets: BucketFactory | None = None,
    ) -> None:
        self.config = config
        self.plan = plan
        self.shape = shape
        self.reporter = reporter
        self._transport = transport
        self.limits = Limits(
            concurrency=config.concurrency,
            rpm=config.rpm,
            tpm=config.tpm,
            max_tokens=config.max_tokens,
            adaptive=config.adaptive,
            max_pause=config.max_retry_wait,
            clock=clock,
            sleep=sleep,
            on_change=lambda why, view: reporter.rate_changed(why, view),
            buckets=buckets,
        )
        reporter.rate_view = self.limits.view
        reporter.in_flight = lambda: self.limits.concurrency.in_flight
        self.rows = RowGate(config.concurrency)
        self.policy = RetryPolicy(
            max_retries=config.max_retries,
            max_retry_wait=config.max_retry_wait,
            sleep=self.rows.parked(sleep),
        )
        index = plan.index
        prompt_tokens, completion_tokens, spent_cost = index.spent
        spent_tokens = prompt_tokens + completion_tokens
        count = plan.shard.count if plan.shard is not None else 1
        self.budget = Budget(
            max_cost=budget_share(config.max_cost, spent_cost, count),
            max_tokens=budget_share(config.max_total_tokens, spent_tokens, count),
            spent_cost=spent_cost,
            spent_tokens=spent_tokens,
        )
        self.cache_hits = 0
        self.ignores_n: set[str] = set()  # models whose server answered fewer choices than n
        self._exchange: Exchange | None = None

    @property
    def sent(self) -> int:
        return self._exchange.sent if self._exchange is not None else 0

    async def execute(self, asks: AsyncIterator[Ask], results: Results, stop: Stop) -> None:
        config = self.config
        transport = self._transport or make_transport(
            config.http_backend, config.concurrency, config.max_response_bytes, self.plan.proxies
        )
        client = ChatClient(
            config.base_url,
            api_key=self.plan.api_key,
            timeout=config.timeout,
            transport=transport,
            max_response_bytes=config.max_response_bytes,
        )
        watch = FailFast(results, stop, self.reporter, config.base_url)
        self.results, self.stop = watch, stop
        self._exchange = Exchange(
            config,
            client=client,
            limits=self.limits,
            policy=self.policy,
            budget=self.budget,
            prices=self.plan.prices,
            reporter=self.reporter,
            stop=stop,
            watch=watch,
        )
        try:
            # more workers than --concurrency (RowGate and Limits hold rows in progress and
            # requests in flight to it): a row waiting out its Retry-After holds a worker but
            # no place, so the others keep going
            async with asyncio.TaskGroup() as group:
                for _ in range(config.concurrency * WORKERS_PER_SLOT):
                    group.create_task(self._work(asks))
        finally:
            watch.release()  # a small job whose rows all failed: ordinary errors
            if self._transport is None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.aclose())

    async def _work(self, asks: AsyncIterator[Ask]) -> None:
        async for ask in asks:
            if self.stop.is_set():
                return
            open_keys = {key for _, key in ask.samples}  # those not recorded yet
            try:
                await self._ask(ask, open_keys)
            except Exception as exc:  # a row's failure is its own
                if not self.stop.is_set():  # in a stop, the row just stays pending
                    self._row_failed(ask, open_keys, exc)

    def _record(self, result: RowResult, open_keys: set[int]) -> None:
        open_keys.discard(result.key)
        self.results.record(result)

    def _row_failed(self, ask: Ask, open_keys: set[int], exc: Exception) -> None:
        """An unexpected exception while a row was handled ends that row as an error."""
        while isinstance(exc, ExceptionGroup) and exc.exceptions:  # from a TaskGroup
            exc = exc.exceptions[0]
        message = str(exc) or repr(exc)
        for _, key in ask.samples:
            if key not in open_keys:
                continue
            self.results.record(
                RowResult(
                    key=key,
                    status="error",
                    error_type=type(exc).__name__,
                    error_message=message[:2000],
                )
            )

    # -- one row: request(s), answer checks and re-asks -------------------------------------

    def _native(self, model: str) -> bool:
        """Whether ``model``'s samples are asked for with the API's ``n`` (see --n-mode)."""
        mode = self.config.n_mode
        return mode == "native" or (mode == "auto" and model not in self.ignores_n)

    def _requests(self, model: str, samples: list[int]) -> list[SampleRequest]:
        config = self.config
        if config.n == 1:
            return _ONE_SAMPLE  # the hot path without --n: nothing to decide
        return plan_requests(
            samples, n=config.n, native=self._native(model), base_seed=config.base_seed
        )

    async def _ask(self, ask: Ask, open_keys: set[int]) -> None:
        """Every sample ``ask`` still needs; each result is recorded when it is final.

        At most ``--concurrency`` rows are in progress, not counting rows waiting out a
        retry: those leave their place to the next row (``RowGate``)."""
        await self.rows.enter()
        try:
            requests = self._requests(ask.model, [s for s, _ in ask.samples])
            if len(requests) == 1:
                await self._send_samples(ask, requests[0], open_keys)
                return
            # a TaskGroup: if one request fails unexpectedly its siblings stop too, so the
            # row is settled once (by the worker) and nothing outlives the run
            async with asyncio.TaskGroup() as group:
                for request in requests:
                    group.create_task(self._send_samples(ask, request, open_keys))
        finally:
            self.rows.leave()

    def _stop_for(self, exc: BudgetReached | FatalError) -> None:
        """A budget or a fatal error ends the run; what it interrupted stays pending."""
        if isinstance(exc, BudgetReached):
            if not self.stop.is_set():
                self.reporter.error(f"stopping the run: {exc.message}")
            self.stop.request(StopKind.BUDGET, f"{exc.kind}: {exc.message}")
            return  # requests in flight may finish
        kind = StopKind.RETRY_LATER if isinstance(exc, ServerSaysLater) else StopKind.FATAL
        self.reporter.error(f"stopping the run: {exc.message}", http_status=exc.status)
        self.stop.request(kind, f"{exc.kind}: {exc.message}", hard=True)

    async def _send_samples(self, ask: Ask, request: SampleRequest, open_keys: set[int]) -> None:
        """One request for ``request.samples``, then each sample's checks and re-asks.

        The request's usage, cost and attempts go to its first sample; the others share it
        (no usage of their own, ``cost_source`` shared) unless re-asks of theirs spend.
        """
        if self.stop.is_set():
            return  # not sent: these samples stay pending
        assert self._exchange is not None
        keys = ask.keys
        first = request.samples[0]
        started = time.monotonic()
        params = {**ask.params, **request.params} if request.params else ask.params
        try:
            reply = await self._exchange.send(
                ask.model,
                ask.messages,
                params,
                request_id_of(keys[first]),
                row_index=ask.index,
                choices=len(request.samples),
            )
        except (BudgetReached, FatalError) as exc:
            self._stop_for(exc)
            return
        except RequestError as exc:
            for sample in request.samples:
                self._record(
                    RowResult(
                        key=keys[sample],
                        status="error",
                        error_type=exc.kind,
                        error_message=exc.message,
                        http_status=exc.status,
                        attempts=exc.attempts if sample == first else 0,
                        latency_ms=_since(started),
                        cost_source=None if sample == first else SHARED,
                    ),
                    open_keys,
                )
            return
        choices = reply.completion.choices
        answered = request.samples[: len(choices)]
        pending: list[Coroutine[Any, Any, None]] = []
        if len(answered) < len(request.samples):
            pending.extend(self._fill_missing(ask, request, len(answered), started, open_keys))
        reask = (
            dataclasses.replace(ask, params={**ask.params, **request.reask_params})
            if request.params
            else ask
        )
        for sample, choice in zip(answered, choices, strict=False):
            shared = sample != first
            settling = _Sample(
                keys[sample],
                choice,
                reply.completion,
                () if shared else (reply,),
                0 if shared else reply.attempts,
                started,
            )
            pending.append(self._settle(reask, settling, open_keys))
        if len(pending) == 1:
            await pending[0]
            return
        async with asyncio.TaskGroup() as group:
            for coroutine in pending:
                group.create_task(coroutine)

    def _fill_missing(
        self, ask: Ask, request: SampleRequest, got: int, started: float, open_keys: set[int]
    ) -> list[Coroutine[Any, Any, None]]:
        """A reply with fewer choices than ``n`` asked: auto falls back to seeds for this
        model (these samples now, every later row too); native makes them errors."""
        missing = request.samples[got:]
        asked = len(request.samples)
        keys = ask.keys
        if self.config.n_mode != "auto":
            message = (
                f"the server answered {got} choice(s) for n={asked}: it may not support n. "
                "Use --n-mode auto or seeds (one request per sample)."
            )
            for sample in missing:
                self._record(
                    RowResult(
                        key=keys[sample],
                        status="error",
                        error_type="MissingChoice",
                        error_message=message,
                        http_status=200,
                        latency_ms=_since(started),
                        cost_source=SHARED,
                    ),
                    open_keys,
                )
            return []
        if ask.model not in self.ignores_n:
            self.ignores_n.add(ask.model)
            self.reporter.note(
                f"{ask.model} answered {got} choice(s) for n={asked}: the server ignores n, so "
                f"its samples are sent one request each (seed {self.config.base_seed} + sample)"
            )
        return [
            self._send_samples(ask, seeded, open_keys)
            for seeded in self._requests(ask.model, list(missing))
        ]

    async def _settle(self, ask: Ask, sample: _Sample, open_keys: set[int]) -> None:
        """Check one sample's answer, re-ask while it does not parse or validate, record it."""
        assert self._exchange is not None
        text, finish_reason = sample.choice.text, sample.choice.finish_reason
        completion, spent, attempts = sample.completion, list(sample.spent), sample.attempts
        shared = not sample.spent
        reask = 0
        while True:
            parsed = self.shape.check(text, finish_reason)
            if parsed is None or parsed.ok:
                break
            cost = _sum_cost(spent, shared)
            # a truncated answer would be cut again at the same limit: report it as it is
            if parsed.truncated or reask == self.config.max_reasks:
                result = _answered(sample, text, finish_reason, completion, attempts, cost, spent)
                self._record(
                    dataclasses.replace(
                        result,
                        status="invalid",
                        error_type="TruncatedAnswer" if parsed.truncated else "InvalidAnswer",
                        error_message=parsed.error,
                    ),
                    open_keys,
                )
                return
            reask += 1
            messages = reask_messages(ask.messages, text, parsed.error or "")
            try:
                reply = await self._exchange.send(
                    ask.model,
                    messages,
                    ask.params,
                    f"{request_id_of(sample.key)}.r{reask}",
                    row_index=ask.index,
                )
            except (BudgetReached, FatalError) as exc:
                self._stop_for(exc)
                return  # the sample stays pending; a rerun sends it
            except RequestError as exc:
                self._record(
                    RowResult(
                        key=sample.key,
                        status="error",
                        error_type=exc.kind,
                        error_message=exc.message,
                        http_status=exc.status,
                        attempts=attempts + exc.attempts,
                        latency_ms=_since(sample.started),
                        usage=_sum_usage(spent),
                        cost_usd=cost.usd,
                        cost_source=cost.source,
                    ),
                    open_keys,
                )
                return
            attempts += reply.attempts
            spent.append(reply)
            completion = reply.completion
            text, finish_reason = completion.text, completion.finish_reason
        if len(spent) == 1 and spent[0].cached:
            self.cache_hits += 1
        cost = _sum_cost(spent, shared)
        self._record(
            _answered(sample, text, finish_reason, completion, attempts, cost, spent), open_keys
        )


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _answered(
    sample: _Sample,
    text: str | None,
    finish_reason: str | None,
    completion: Completion,
    attempts: int,
    cost: Cost,
    spent: list[Reply],
) -> RowResult:
    """The result of an answered sample: ``text`` from ``completion``, whose model and id
    it reports; usage is that of every request paid for it (none for a shared choice)."""
    return RowResult(
        key=sample.key,
        status="ok",
        completion=text,
        finish_reason=finish_reason,
        usage=_sum_usage(spent),
        response_model=completion.model,
        response_id=completion.response_id,
        http_status=200,
        attempts=attempts,
        latency_ms=_since(sample.started),
        cost_usd=cost.usd,
        cost_source=cost.source,
    )


def _sum_usage(spent: list[Reply]) -> Usage:
    """Usage of all requests of one sample (re-asks count)."""
    if len(spent) == 1:
        return spent[0].completion.usage

    def total(name: str) -> int | None:
        values = [getattr(r.completion.usage, name) for r in spent]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return Usage(
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        total_tokens=total("total_tokens"),
        cached_tokens=total("cached_tokens"),
        reasoning_tokens=total("reasoning_tokens"),
    )


def _sum_cost(spent: list[Reply], shared: bool) -> Cost:
    """The cost of every request paid for a sample; a shared choice's is the request's."""
    if not spent:
        return Cost(None, SHARED) if shared else Cost(None, None)
    costs = [reply.cost for reply in spent]
    if any(c.usd is None for c in costs):
        return Cost(None, None)
    sources = {c.source for c in costs}
    source = sources.pop() if len(sources) == 1 else COST_MIXED
    return Cost(sum(c.usd for c in costs if c.usd is not None), source)
