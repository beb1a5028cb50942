"""Pacing: how many requests may be in flight, and when the next one may start.

Small meters that stack, each separately testable with an injectable clock and sleep:

- ``AdaptiveConcurrency``: at most ``limit`` requests in flight; on a 429 the limit halves
  (multiplicative decrease), and every ``limit`` successes it grows by one (additive
  increase), never above ``--concurrency``.
- ``RateMeter``: a token bucket (``rate`` units per second, ``burst`` capacity) for requests
  per minute (``--rpm``) or tokens per minute (``--tpm``); ``refund``/``charge`` correct it
  when the actual usage of a response differs from the estimate.
- ``PauseGate``: a shared "nobody starts before T" used when any request gets a 429, so that
  every worker waits out the Retry-After, not only the one that got it.
- ``HeaderPacer``: reads ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and mirrors
  the server's bucket in a ``RateMeter`` (its refill rate estimated from limit, remaining and
  reset), so that sending slows down before remaining reaches zero.
- ``TokenEstimator``: a request's token cost before sending (prompt characters scaled by a
  ratio calibrated on actual usage, plus ``max_tokens`` or the running mean completion).

``Limits`` composes them for the runner: ``await limits.start(cost)`` before a request and
``limits.finish(...)`` after. It knows nothing of HTTP bodies or retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .config import parse_duration

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateMeter:
    """Token bucket: ``rate`` units per second, at most ``burst`` banked.

    ``acquire(n)`` waits until ``n`` units are available and takes them. The bucket may go
    negative through ``charge`` (actual usage above the estimate); later acquires then wait
    for it to refill.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.clock = clock
        self.sleep = sleep
        self.level = self.burst
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        if self.rate > 0:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float = 1.0) -> None:
        # One waiter at a time keeps the order fair (FIFO through the lock).
        async with self._lock:
            amount = min(amount, self.burst)  # a request larger than the bucket still goes
            while True:
                self._refill()
                if self.level >= amount - 1e-9:  # float dust must not stall the loop
                    self.level -= amount
                    return
                if self.rate <= 0:
                    await self.sleep(0.05)
                    continue
                await self.sleep((amount - self.level) / self.rate)

    def charge(self, amount: float) -> None:
        """Take ``amount`` more (may go below zero)."""
        self._refill()
        self.level -= amount

    def refund(self, amount: float) -> None:
        self._refill()
        self.level = min(self.burst, self.level + amount)

    def clamp(self, level: float) -> None:
        """Lower the bucket to what the server says is left (never raise it)."""
        self._refill()
        self.level = min(self.level, level)


class PauseGate:
    """Everyone waits until ``until`` (a clock time) before starting a request."""

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.clock = clock
        self.sleep = sleep
        self.until = 0.0

    def pause(self, seconds: float) -> None:
        self.until = max(self.until, self.clock() + seconds)

    async def wait(self) -> None:
        while True:
            left = self.until - self.clock()
            if left <= 0:
                return
            await self.sleep(left)


class AdaptiveConcurrency:
    """AIMD limit on requests in flight: halve on 429, +1 per ``limit`` successes."""

    def __init__(self, maximum: int, *, minimum: int = 1) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self.limit = float(maximum)
        self.in_flight = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self) -> None:
        # fast path without a lock: the common case is "under the limit"
        while self.in_flight >= int(self.limit):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.in_flight += 1

    async def release(self) -> None:
        self.in_flight -= 1
        # wake as many waiters as there are free places
        free = int(self.limit) - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def on_success(self) -> None:
        if self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit + 1.0 / max(self.limit, 1.0))

    def on_rate_limited(self) -> None:
        self.limit = max(float(self.minimum), self.limit / 2)


@dataclass
class _ServerBucket:
    """What the headers said of one server bucket (requests or tokens)."""

    limit: float
    remaining: float
    reset: float


def read_bucket(headers: Mapping[str, str], kind: str) -> _ServerBucket | None:
    """``kind`` is "requests" or "tokens"; None when the headers are absent or unreadable."""
    try:
        limit = float(headers[f"x-ratelimit-limit-{kind}"])
        remaining = float(headers[f"x-ratelimit-remaining-{kind}"])
    except (KeyError, ValueError):
        return None
    reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", "")) or 0.0
    return _ServerBucket(limit=limit, remaining=remaining, reset=reset)


class HeaderPacer:
    """Mirror of one server bucket built from rate-limit headers.

    The refill rate is estimated as (limit - remaining) / reset, the time the server says it
    needs to refill what is used; it is smoothed, and only trusted when enough of the bucket
    is used for the numbers to mean something. Until a rate is known, the pacer only holds
    sending when the server says nothing is left.
    """

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.meter: RateMeter | None = None
        self.clock = clock
        self.sleep = sleep
        self.rate: float | None = None
        self.blocked_until = 0.0

    def observe(self, bucket: _ServerBucket, in_flight: float) -> None:
        used = bucket.limit - bucket.remaining
        if bucket.reset > 0 and used >= max(2.0, 0.05 * bucket.limit):
            estimate = used / bucket.reset
            self.rate = estimate if self.rate is None else 0.8 * self.rate + 0.2 * estimate
        if self.rate is not None:
            if self.meter is None:
                self.meter = RateMeter(
                    self.rate, burst=bucket.limit, clock=self.clock, sleep=self.sleep
                )
                self.meter.level = bucket.remaining
            self.meter.rate = self.rate
            self.meter.burst = bucket.limit
            # keep a margin for requests already on their way to the server
            self.meter.clamp(bucket.remaining - in_flight)
        elif bucket.remaining <= in_flight and bucket.reset > 0:
            self.blocked_until = max(self.blocked_until, self.clock() + bucket.reset)

    @property
    def active(self) -> bool:
        """True once the server's headers gave anything to pace by."""
        return self.meter is not None or self.blocked_until > 0

    async def acquire(self, amount: float) -> None:
        left = self.blocked_until - self.clock()
        if left > 0:
            await self.sleep(left)
        if self.meter is not None:
            await self.meter.acquire(amount)


class TokenEstimator:
    """A request's token cost before it is sent, calibrated on actual usage."""

    def __init__(self, max_tokens: int | None, chars_per_token: float = 4.0) -> None:
        self.max_tokens = max_tokens
        self.tokens_per_char = 1.0 / chars_per_token
        self.mean_completion = 64.0
        self.samples = 0

    def prompt_tokens(self, chars: int) -> float:
        return max(1.0, chars * self.tokens_per_char)

    def cost(self, chars: int, choices: int = 1) -> float:
        """Prompt estimate plus expected completion of each of ``choices`` (the API's ``n``);
        ``max_tokens`` bounds each completion when set."""
        expected = self.max_tokens if self.max_tokens is not None else self.mean_completion
        return self.prompt_tokens(chars) + expected * choices

    def observe(
        self,
        chars: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        choices: int = 1,
    ) -> None:
        """Calibrate on a response's usage (``completion_tokens`` cover all its choices)."""
        if prompt_tokens and chars:
            ratio = prompt_tokens / chars
            self.tokens_per_char = 0.9 * self.tokens_per_char + 0.1 * ratio
        if completion_tokens is not None:
            self.samples += 1
            weight = max(0.05, 1.0 / self.samples)
            per_choice = completion_tokens / max(choices, 1)
            self.mean_completion += weight * (per_choice - self.mean_completion)


class Budget:
    """Spend so far plus what requests in flight could still spend, against the caps.

    ``reserve`` admits a request only if its worst case (estimated prompt + ``max_tokens``, or
    the mean completion when ``max_tokens`` is unset) cannot cross ``max_cost`` or
    ``max_tokens``; ``settle`` swaps the reservation for the actual figures.
    """

    def __init__(
        self,
        *,
        max_cost: float | None,
        max_tokens: int | None,
        spent_cost: float = 0.0,
        spent_tokens: int = 0,
    ) -> None:
        self.max_cost = max_cost
        self.max_tokens = max_tokens
        self.spent_cost = spent_cost
        self.spent_tokens = float(spent_tokens)
        self.reserved_cost = 0.0
        self.reserved_tokens = 0.0

    @property
    def active(self) -> bool:
        return self.max_cost is not None or self.max_tokens is not None

    def reserve(self, cost: float, tokens: float) -> bool:
        if self.max_cost is not None and (
            self.spent_cost + self.reserved_cost + cost > self.max_cost
        ):
            return False
        if self.max_tokens is not None and (
            self.spent_tokens + self.reserved_tokens + tokens > self.max_tokens
        ):
            return False
        self.reserved_cost += cost
        self.reserved_tokens += tokens
        return True

    def settle(self, reserved: tuple[float, float], cost: float, tokens: float) -> None:
        self.reserved_cost -= reserved[0]
        self.reserved_tokens -= reserved[1]
        self.spent_cost += cost
        self.spent_tokens += tokens

    def describe(self) -> str:
        parts = []
        if self.max_cost is not None:
            parts.append(f"${self.spent_cost:.4f} of --max-cost ${self.max_cost:g} spent")
        if self.max_tokens is not None:
            parts.append(f"{int(self.spent_tokens)} of --max-total-tokens {self.max_tokens} used")
        return "; ".join(parts)


class Limits:
    """All meters of one run, composed: ``start`` before a request, ``finish`` after it."""

    def __init__(
        self,
        *,
        concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        max_tokens: int | None = None,
        adaptive: bool = True,
        max_pause: float = 120.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.clock = clock
        self.max_pause = max_pause
        self.concurrency = AdaptiveConcurrency(concurrency)
        self.last_decrease = float("-inf")
        self.adaptive = adaptive
        self.gate = PauseGate(clock=clock, sleep=sleep)
        # burst of ~1 s for requests: even pacing, no start-up spike against the server's window
        self.requests = (
            RateMeter(rpm / 60.0, burst=max(1.0, rpm / 60.0), clock=clock, sleep=sleep)
            if rpm
            else None
        )
        if self.requests is not None:
            # start with one request, not a full second's burst: the server's own bucket
            # may already be partly used, and a start-up burst is where 429s came from
            self.requests.level = 1.0
        self.tokens = (
            RateMeter(tpm / 60.0, burst=max(1.0, tpm / 60.0), clock=clock, sleep=sleep)
            if tpm
            else None
        )
        self.header_requests = HeaderPacer(clock=clock, sleep=sleep)
        self.header_tokens = HeaderPacer(clock=clock, sleep=sleep)
        self.estimator = TokenEstimator(max_tokens)
        self.rate_limited = 0

    async def start(self, chars: int, choices: int = 1) -> tuple[float, float]:
        """Wait until a request of ``chars`` prompt characters and ``choices`` may go.

        Returns (token cost estimate, start time) to hand back to ``finish``.
        """
        cost = self.estimator.cost(chars, choices)
        if self.gate.until > self.clock():
            await self.gate.wait()
        await self.concurrency.acquire()
        try:
            if self.requests is not None:
                await self.requests.acquire(1)
            if self.tokens is not None:
                await self.tokens.acquire(cost)
            if self.header_requests.active:
                await self.header_requests.acquire(1)
            if self.header_tokens.active:
                await self.header_tokens.acquire(cost)
            if self.gate.until > self.clock():
                await self.gate.wait()
        except BaseException:
            await self.concurrency.release()
            raise
        return cost, self.clock()

    async def finish(
        self,
        *,
        chars: int,
        cost: float,
        started: float,
        headers: Mapping[str, str] | None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        rate_limited: bool = False,
        retry_after: float | None = None,
        choices: int = 1,
    ) -> None:
        """Account for a finished attempt: correct token use, read headers, adapt."""
        await self.concurrency.release()
        if headers:
            in_flight = self.concurrency.in_flight
            bucket = read_bucket(headers, "requests")
            if bucket is not None:
                self.header_requests.observe(bucket, in_flight)
            bucket = read_bucket(headers, "tokens")
            if bucket is not None:
                self.header_tokens.observe(bucket, in_flight * cost)
        if prompt_tokens is not None or completion_tokens is not None:
            self.estimator.observe(chars, prompt_tokens, completion_tokens, choices)
            if self.tokens is not None:
                actual = (prompt_tokens or 0) + (completion_tokens or 0)
                self.tokens.charge(actual - cost)
        elif self.tokens is not None and not rate_limited:
            self.tokens.refund(cost)  # nothing was generated: give the estimate back
        if rate_limited:
            self.rate_limited += 1
            self.gate.pause(min(retry_after if retry_after is not None else 1.0, self.max_pause))
            # One decrease per congestion event: 429s of requests that started before the
            # last decrease are echoes of the same overload.
            if self.adaptive and started > self.last_decrease:
                self.concurrency.on_rate_limited()
                self.last_decrease = self.clock()
        elif prompt_tokens is not None and self.adaptive:
            self.concurrency.on_success()
