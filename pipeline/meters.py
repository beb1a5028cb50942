"""The meters that pace requests, each separately testable with an injectable clock and sleep.

- ``AdaptiveConcurrency``: at most ``limit`` requests in flight; it starts at 8 and opens
  by one per answer (slow start) up to ``--concurrency``.
- ``RateMeter``: a token bucket (``rate`` units per second, ``burst`` capacity) for requests
  per minute (``--rpm``) or tokens per minute (``--tpm``); ``refund``/``charge`` correct it
  when the actual usage of a response differs from the estimate.
- ``RowGate``: at most ``--concurrency`` rows in progress, not counting rows waiting out a
  retry (their place goes to the next row).
- ``HeaderPacer``: reads ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and mirrors
  the server's bucket in a ``RateMeter`` (its refill rate estimated from limit, remaining and
  reset), so that sending slows down before remaining reaches zero.
- ``TokenEstimator``: a request's token cost before sending (prompt characters scaled by a
  ratio calibrated on actual usage, plus ``max_tokens`` or the running mean completion).

The rate controller (``rate_control``) and their composition (``limits.Limits``) live apart.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .durations import parse_duration

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
# requests in flight at the start of a run: the number then doubles per round trip
SLOW_START = 8


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


class AdaptiveConcurrency:
    """A limit on requests in flight that starts small and opens up (slow start).

    It starts at ``initial`` and every answered request adds one place, up to ``maximum``:
    the number in flight doubles per round trip, as in TCP's slow start. The first requests
    of a run so never arrive as a burst of ``--concurrency`` at a server whose limit is
    unknown (64 requests at once against a bucket of 5 would be 59 429s). It never shrinks:
    the request rate, not the number in flight, is what ``RateController`` adjusts.
    """

    def __init__(self, maximum: int, *, initial: int | None = None) -> None:
        self.maximum = maximum
        self.limit = maximum if initial is None else max(1, min(initial, maximum))
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        # First come, first served: a freed place is handed to the longest waiter, never
        # taken by a newcomer (rows go out in input order, which the checkpoint relies on).
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release_nowait()  # the place was handed over as we were cancelled
            elif waiter in self._waiters:  # release may have dropped it already
                self._waiters.remove(waiter)
            raise

    async def release(self) -> None:
        self.release_nowait()

    def release_nowait(self) -> None:
        """Give the place back: to the longest waiter, or free."""
        while self._waiters and self.in_flight <= self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place passes on: in_flight is unchanged
                return
        self.in_flight -= 1

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def on_success(self) -> None:
        if self.limit < self.maximum:
            self.limit += 1
            self._wake()


class RowGate:
    """At most ``limit`` rows in progress, not counting rows waiting out a retry.

    A row waiting out its Retry-After (or backoff) is parked: its place goes to the next
    row, as a plain client's retry waits outside its semaphore. Rows enter first come,
    first served.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.parked_rows = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        if self.active - self.parked_rows < self.limit and not self._waiters:
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the place was handed over as we were cancelled
            elif waiter in self._waiters:  # _wake may have dropped it already
                self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active - self.parked_rows < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    def parked(self, sleep: Sleep) -> Sleep:
        """``sleep`` for retry waits: the row is parked while it sleeps."""

        async def parked_sleep(seconds: float) -> None:
            self.parked_rows += 1
            self._wake()
            try:
                await sleep(seconds)
            finally:
                self.parked_rows -= 1

        return parked_sleep


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
            # remaining is a whole number, the bucket's level is not: on average half a unit
            # more is left than it says (a bucket of 5 at 20/s was estimated at ~23/s)
            estimate = (used - 0.5) / bucket.reset
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
