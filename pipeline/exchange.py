"""One request of the online executor: response cache, budget, limits, retries, client.

``Exchange.send`` turns (ask, messages, parameters) into a ``Reply`` (the completion, the
attempts it took, what it cost, whether it came from the cache) or raises the request's
``RequestError`` once retries are spent; ``BudgetReached`` and ``FatalError`` end the run
(the caller stops it). Per attempt, in this order: the budget holds the request's worst
case, the limits give it a place (``Limits.start``), the client sends it, the limits and the
budget learn what it used. It records no result and knows no rows, only requests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .cache import ResponseCache
from .client import ChatClient, build_body, parse_completion
from .config import RunConfig
from .errors import BudgetReached, RateLimited, RequestError, ServerSaysLater, UnexpectedError
from .limits import Budget, Limits, Outcome
from .pricing import PriceTable, row_cost
from .progress import Reporter
from .records import COST_CACHE, Completion, Cost, Message
from .retry import RetryPolicy
from .stopping import Stop

CACHED = Cost(0.0, COST_CACHE)


@dataclass(frozen=True, slots=True)
class Reply:
    """An answered request."""

    completion: Completion
    attempts: int  # requests made (0: from the cache)
    cost: Cost

    @property
    def cached(self) -> bool:
        return self.attempts == 0


class Watch(Protocol):
    """Told of every attempt's outcome (``failfast.FailFast``)."""

    def failed(self, exc: RequestError) -> None: ...

    def answered(self) -> None: ...


class Exchange:
    """Sends one request with its retries (see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        client: ChatClient,
        limits: Limits,
        policy: RetryPolicy,
        budget: Budget,
        prices: PriceTable,
        reporter: Reporter,
        stop: Stop,
        watch: Watch,
    ) -> None:
        self.config = config
        self.client = client
        self.limits = limits
        self.policy = policy
        self.budget = budget
        self.prices = prices
        self.reporter = reporter
        self.stop = stop
        self.watch = watch
        self.cache = ResponseCache(config.cache) if config.cache else None
        self.sent = 0  # requests that went out (retries not counted)

    async def send(
        self,
        model: str,
        messages: list[Message],
        params: dict[str, Any],
        request_id: str,
        *,
        row_index: int,
        choices: int = 1,
    ) -> Reply:
        """One request with its retries, or a cache hit. ``choices`` is the number of
        completions it asks for (the API's ``n``): budgets and token pacing reserve that many."""
        body = build_body(model, messages, params)
        cache_key = None
        if self.cache is not None:
            cache_key = self.cache.key(self.config.base_url, body)
            stored = await asyncio.to_thread(self.cache.get, cache_key)
            if stored is not None:
                try:
                    return Reply(parse_completion(stored), 0, CACHED)
                except RequestError:
                    pass  # a damaged entry is a miss

        def on_retry(error: RequestError, attempt: int, wait: float) -> None:
            self.reporter.retry(
                row_index=row_index,
                error=error.message,
                status=error.status,
                attempt=attempt,
                wait=wait,
                asked=error.retry_after,
            )

        chars = sum(len(str(m.get("content") or "")) for m in messages)

        async def attempt() -> Completion:
            return await self._attempt(model, body, request_id, chars, choices)

        self.sent += 1
        try:
            completion, attempts = await self.policy.call(attempt, on_retry=on_retry)
        except BudgetReached:
            self.sent -= 1  # nothing went out
            raise
        if cache_key is not None and self.cache is not None and completion.raw:
            await asyncio.to_thread(
                self.cache.put,
                cache_key,
                completion.raw,
                {"model": model, "base_url": self.config.base_url},
            )
        return Reply(completion, attempts, self.cost(completion, model))

    async def _attempt(
        self, model: str, body: bytes | dict[str, Any], request_id: str, chars: int, choices: int
    ) -> Completion:
        reservation = self._reserve(chars, model, choices)
        if reservation is None:
            return await self._limited_send(body, request_id, chars, choices)
        used = (0.0, 0.0)
        try:
            completion = await self._limited_send(body, request_id, chars, choices)
            used = (self.cost(completion, model).usd or 0.0, _tokens(completion))
            return completion
        finally:
            self.budget.settle(reservation, *used)

    async def _limited_send(
        self, body: Any, request_id: str, chars: int, choices: int
    ) -> Completion:
        limits = self.limits
        try:
            async with limits.slot(limits.ticket(chars, choices)) as slot:
                if self.stop.hard:
                    # the run stopped at once while this request waited for a place: it
                    # stays pending; the engine cancels the executor
                    await asyncio.Event().wait()
                try:
                    completion = await self.client.send(body, request_id)
                except RequestError as exc:
                    self.watch.failed(exc)
                    slot.done(
                        Outcome(
                            headers=exc.headers,
                            rate_limited=isinstance(exc, RateLimited),
                            retry_after=exc.retry_after,
                        )
                    )
                    raise
                except Exception as exc:  # anything else ends this row, not the worker
                    raise UnexpectedError(exc) from exc
                slot.done(
                    Outcome(
                        headers=completion.headers,
                        prompt_tokens=completion.usage.prompt_tokens,
                        completion_tokens=completion.usage.completion_tokens,
                        answered=True,
                    )
                )
        except RateLimited as exc:
            if limits.come_back_later:
                raise _come_back_later(exc, self.config.max_retry_wait) from exc
            raise
        self.watch.answered()
        return completion

    def cost(self, completion: Completion, model: str) -> Cost:
        """The server's figure when it reports one, else the price table's."""
        usage = completion.usage
        return row_cost(
            self.prices,
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reported=completion.reported_cost,
            response_model=completion.model,
        )

    def _reserve(self, chars: int, model: str, choices: int = 1) -> tuple[float, float] | None:
        """Hold the worst case of one request (``choices`` completions) against the budget,
        or raise BudgetReached."""
        if not self.budget.active:
            return None
        estimator = self.limits.estimator
        tokens = estimator.cost(chars, choices)
        prompt = estimator.prompt_tokens(chars)
        cost = 0.0
        if self.budget.max_cost is not None:
            priced = self.prices.cost(model, round(prompt), round(tokens - prompt))
            cost = priced or 0.0
        if not self.budget.reserve(cost, tokens):
            worst = f"${cost:.4f}, " if self.budget.max_cost is not None else ""
            raise BudgetReached(
                f"budget reached: {self.budget.describe()}; the next request could cross it "
                f"(it reserves up to {worst}{tokens:,.0f} tokens: its prompt plus "
                + ("--max-tokens" if self.config.max_tokens is not None else "a typical answer")
                + f" x {choices} completion{'s' if choices != 1 else ''}). Rerun with a larger "
                "budget to continue."
            )
        return (cost, tokens)


def _tokens(completion: Completion) -> float:
    usage = completion.usage
    if usage.total_tokens is not None:
        return float(usage.total_tokens)
    return float((usage.prompt_tokens or 0) + (usage.completion_tokens or 0))


def _come_back_later(exc: RequestError, max_wait: float) -> ServerSaysLater:
    """The error that ends a run whose server asks, again and again, to come back later."""
    asked = exc.retry_after or 0.0
    when = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + asked))
    return ServerSaysLater(
        f"the server answers 429 asking to come back in {asked:g} s (after {when}), "
        f"longer than --max-retry-wait {max_wait:g} s, three times in a row; the rows not "
        "done stay pending. Rerun the same command after that time to resume.",
        status=exc.status,
        retry_after=asked,
    )
