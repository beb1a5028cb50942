"""Pacing: how many requests may be in flight, and when the next one may start.

Small meters that stack, each separately testable with an injectable clock and sleep:

- ``AdaptiveConcurrency``: at most ``limit`` requests in flight; it starts at 8 and opens
  by one per answer (slow start) up to ``--concurrency``.
- ``RateMeter``: a token bucket (``rate`` units per second, ``burst`` capacity) for requests
  per minute (``--rpm``) or tokens per minute (``--tpm``); ``refund``/``charge`` correct it
  when the actual usage of a response differs from the estimate.
- ``RateController``: finds a request-rate limit that nobody announces from 429s alone and
  holds sending near it; tells scattered 429s (noise) from overload (see its docstring).
- ``RowGate``: at most ``--concurrency`` rows in progress, not counting rows waiting out a
  retry (their place goes to the next row).
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
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .config import parse_duration

Clock = Callable[[], float]
# requests in flight at the start of a run: the number then doubles per round trip
SLOW_START = 8
# requests/s added to the rate when its growth is computed (see RateController._grow)
FAIR_SHARE_FLOOR = 5.0
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
                await self.release()  # the place was handed over as we were cancelled
            elif waiter in self._waiters:  # release may have dropped it already
                self._waiters.remove(waiter)
            raise

    async def release(self) -> None:
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


@dataclass(slots=True)
class _Trial:
    """The responses to requests sent after a cut, which tell overload from noise."""

    previous_rate: float | None
    previous_found: float | None
    share_before: float
    began: float
    answers: int = 0
    refused: int = 0
    watching: bool = False  # no cut came before it (see RateController, "watch")


@dataclass(frozen=True, slots=True)
class RateView:
    """What the rate controller believes, for progress lines and the summary.

    Fields: ``rate`` (requests/s it sends at, None while it has no reason to hold back),
    ``limit_found`` (the request rate the server accepted when it last refused more),
    ``noise`` (share of 429s that come whatever the rate), ``rate_limited`` (429s seen),
    ``cuts`` (times it slowed down), ``long_waits`` (429s asking for more than the longest
    wait a row may take).
    """

    rate: float | None
    limit_found: float | None
    noise: float
    rate_limited: int
    cuts: int
    long_waits: int

    def describe(self) -> str:
        parts = [
            f"sending at {self.rate:.1f} req/s" if self.rate is not None else "not rate-limited"
        ]
        if self.limit_found is not None:
            parts.append(f"limit found ~{self.limit_found:.1f} req/s")
        parts.append(f"{self.rate_limited} 429s, {self.cuts} slow-downs")
        if self.noise:
            parts.append(f"{self.noise:.0%} of answers 429 whatever the rate (treated as noise)")
        if self.long_waits:
            parts.append(f"{self.long_waits} 429s asking to come back much later")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "rate_rps": None if self.rate is None else round(self.rate, 2),
            "limit_found_rps": None if self.limit_found is None else round(self.limit_found, 2),
            "noise_429_share": round(self.noise, 4),
            "rate_limited": self.rate_limited,
            "cuts": self.cuts,
            "long_waits": self.long_waits,
        }


NOISE_TRACKING = 0.002  # per answer: how fast the noise floor follows the share of 429s


class RateController:
    """Finds and holds a request-rate limit the server enforces but does not announce.

    It sees only answers (200) and refusals (429) with the time their request started; 5xx
    and transport errors say nothing about our rate and are left to the per-row retries.

    - **Free until refused.** With no 429 seen it does not pace at all.
    - **Watch a first scattered 429.** A first 429 after at least ``watch_after`` answers,
      at a share under ``watch_share``, starts a trial without a cut: if the share holds
      it is noise (no slow-down at all), if it climbs the trial cuts (a limit answers a
      burst of 429s at once, and that is cut at once).
    - **A cut per congestion event.** A 429 that counts (see noise) sets the rate to
      ``backoff`` x what the server accepted over the last ``accept_window`` seconds (capped
      by the rate it was sending at): under a real limit, what gets through *is* the limit.
      429s of requests that started before the cut are echoes of the same event and are
      not counted again.
    - **Overload or noise.** A limit answers fewer 429s once we slow down; scattered 429s
      come at the same share whatever the rate. After a cut, the next ``trial_answers``
      answers to requests sent after it decide: if the share of 429s among them has not
      fallen (at least 3 and at least ``same_share`` of the share before), the cut is undone
      and that share becomes the noise floor; from then on a 429 counts only when the share
      over the last ``window`` (300) answers exceeds twice the floor plus 2 points. A 429 while
      sending above 1.05 x the rate that last got through needs no trial (probing explains
      it). After a small overshoot the server's bucket is still empty for a moment: answers
      to the next ~4 requests' worth of time after a cut are echoes too.
    - **Probe up, slowly then faster.** Between cuts the rate grows by ``probe`` per second,
      and that growth doubles every ``probe_doubling`` seconds without a cut (capped at
      ``probe_max`` per second): it stays near the rate that worked for a few seconds, and
      follows a limit that went up within seconds. It grows at the slowest ``probe`` while a
      trial runs, never beyond twice the rate requests are actually asking to start at, and
      applies to the rate plus ``FAIR_SHARE_FLOOR``: processes sharing a limit then gain
      alike in absolute terms and the smaller catches up (as in AIMD).
    """

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_change: Callable[[str, RateView], None] | None = None,
        backoff: float = 0.85,
        probe: float = 0.01,
        probe_doubling: float = 1.25,
        probe_max: float = 1.0,
        window: int = 300,
        accept_window: float = 2.0,
        trial_answers: int = 150,
        trial_seconds: float = 3.0,
        same_share: float = 0.6,
        minimum_rate: float = 0.05,
        watch_share: float = 0.2,
        watch_after: int = 5,
    ) -> None:
        self.clock = clock
        self.on_change = on_change
        self.backoff = backoff
        self.probe = probe
        self.probe_doubling = probe_doubling
        self.probe_max = probe_max
        self.accept_window = accept_window
        self.trial_answers = trial_answers
        self.trial_seconds = trial_seconds
        self.same_share = same_share
        self.minimum_rate = minimum_rate
        self.watch_share = watch_share
        self.watch_after = watch_after
        self.meter = RateMeter(1.0, burst=1.0, clock=clock, sleep=sleep)
        self.rate: float | None = None
        self.found: float | None = None
        self.noise = 0.0
        self.rate_limited = 0
        self.cuts = 0
        self.long_waits = 0
        self.last_cut = self.settled = float("-inf")
        self.overloaded = False  # a cut did not stop the 429s: a real limit was met
        self.probe_since = clock()
        self.grown_at = clock()
        self.first_seen: float | None = None
        self.trial: _Trial | None = None
        self.recent: deque[bool] = deque(maxlen=window)  # True: a 429
        self.accepted: deque[float] = deque()  # times of answers, the last accept_window s
        self.asked: deque[float] = deque()  # times requests asked to start, same window
        self._told_rate: float | None = None

    def view(self) -> RateView:
        return RateView(
            self.rate, self.found, self.noise, self.rate_limited, self.cuts, self.long_waits
        )

    async def acquire(self) -> None:
        """Wait until one more request may start at the held rate (at once when free)."""
        now = self.clock()
        self.asked.append(now)
        self._trim(self.asked, now)
        if self.rate is None:
            return
        self._grow(now)
        await self.meter.acquire(1.0)

    def observe(self, *, started: float, refused: bool) -> None:
        """An answer (``refused`` False) or a 429 to a request that started at ``started``."""
        now = self.clock()
        if self.first_seen is None:
            self.first_seen = now
        self.recent.append(refused)
        if refused:
            self.rate_limited += 1
        else:
            self.accepted.append(now)
            self._trim(self.accepted, now)
        if started < self.settled:
            # an echo of the event that caused the last cut, or a request sent while the
            # server's bucket was still empty from it
            return
        trial = self.trial
        if trial is not None:
            trial.answers += 1
            trial.refused += refused
            if trial.refused >= 3 and trial.refused >= 0.3 * trial.answers:
                self._cut(now, trial.refused / trial.answers, "still refused after slowing down")
            elif (
                trial.answers >= self.trial_answers
                or now - trial.began >= self.trial_seconds
                # a watch costs nothing (no cut): it waits for the full sample
                or (trial.answers >= 20 and not trial.watching and self._looks_like_noise(trial))
            ):
                self._judge(now, trial)
            return
        if self.noise > 0.0:
            # the floor follows the noise slowly (~500 answers): a first estimate is from a
            # small sample, and a limit's climb outpaces it (the window is 300 answers)
            self.noise += NOISE_TRACKING * (refused - self.noise)
        if refused:
            share = sum(self.recent) / len(self.recent)
            if self._first_and_scattered(share):
                # watch before slowing down: scattered 429s keep this share at any rate,
                # a limit's climb as we go on (then the trial cuts)
                self.trial = _Trial(self.rate, self.found, share, now, watching=True)
                self._tell("a few scattered 429s: watching before slowing down", force=True)
            elif self.noise == 0.0 or share > 2 * self.noise + 0.02:
                self._cut(now, share, "429 beyond the noise")

    # -- internals ----------------------------------------------------------------------------

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] < now - self.accept_window:
            times.popleft()

    def _span(self, now: float) -> float:
        """Seconds the accept/ask counts cover: the window, or less at the start of a run."""
        seen = now - (self.first_seen if self.first_seen is not None else now)
        return max(0.1, min(self.accept_window, seen))

    def _through(self, now: float) -> float:
        """Answers per second lately: over the window, or its last half if more (a limit
        that just went up), at least one answer's worth (a 429 before any answer must not
        stop sending), scaled up by the noise (those 429s were not the limit's)."""
        self._trim(self.accepted, now)
        span = self._span(now)
        recent = sum(1 for t in self.accepted if t >= now - span / 2) / (span / 2)
        through = max(len(self.accepted) / span, recent, 1.0 / span)
        return through / max(0.5, 1.0 - self.noise)

    def _set_rate(self, rate: float | None) -> None:
        self.rate = rate
        if rate is not None:
            self.meter._refill()
            self.meter.rate = rate
            self.meter.level = min(self.meter.level, 1.0)

    def _grow(self, now: float) -> None:
        if self.rate is None:
            self.grown_at = now
            return
        elapsed = now - self.grown_at
        if elapsed <= 0:
            return
        self.grown_at = now
        self._trim(self.asked, now)
        asking = len(self.asked) / self._span(now)
        if self.rate > 2 * asking:
            return  # the held rate is not what slows us: growing it would mean nothing
        quiet = now - self.probe_since
        growth = min(self.probe_max, self.probe * 2 ** (quiet / self.probe_doubling))
        if self.trial is not None:
            growth = self.probe  # while a trial runs, only the slowest probe
        # growth of rate + FAIR_SHARE_FLOOR, not of the rate alone: two processes on one
        # limit then gain alike in absolute terms, and the smaller catches up (as in AIMD)
        floor = FAIR_SHARE_FLOOR
        self._set_rate((self.rate + floor) * math.exp(growth * elapsed) - floor)
        self._tell("probing up")

    def _cut(self, now: float, share: float, why: str) -> None:
        through = self._through(now)
        anchor = through if self.rate is None else min(self.rate, through)
        trial = self.trial
        if trial is not None and self.rate is not None:
            # sent at ``rate`` since the last cut, a share got through: that is the limit
            got_through = (trial.answers - trial.refused + 1) / (trial.answers + 1)
            anchor = min(anchor, self.rate * got_through)
        self.overloaded = self.overloaded or share >= 0.3
        # what noise would undo: back to not pacing at all while no overload was ever seen
        # (a first trial may have missed scattered 429s by chance), else the last rate
        undo_rate, undo_found = (self.rate, self.found) if self.overloaded else (None, None)
        if self.trial is None:
            # probing above the rate that last got through explains a 429: no need to ask
            # whether it is noise
            beyond = self.found is not None and (self.rate or 0.0) > 1.05 * self.found
            self.trial = _Trial(undo_rate, undo_found, 1.0 if beyond else share, now)
        else:  # still overloaded: the trial restarts from here
            self.overloaded = True
            self.trial = _Trial(self.trial.previous_rate, self.trial.previous_found, 1.0, now)
        self.found = max(through, self.minimum_rate)
        self._set_rate(max(self.minimum_rate, self.backoff * anchor))
        self.last_cut = self.probe_since = self.grown_at = now
        assert self.rate is not None
        # a small overshoot leaves the server's bucket empty for a moment: answers to the
        # next few requests say nothing new (after a storm, they count at once)
        small = self.trial.share_before < 0.3
        self.settled = now + (min(1.0, 4.0 / self.rate) if small else 0.0)
        self.cuts += 1
        self._tell(why, force=self.cuts == 1)

    def _first_and_scattered(self, share: float) -> bool:
        """A first 429 among many answers, before any cut or noise verdict: as likely
        noise as a limit, and slowing down for noise is what costs (a limit answers a
        burst of 429s at once, which is cut at once)."""
        return (
            self.cuts == 0
            and self.noise == 0.0
            and self.rate is None
            and len(self.recent) >= self.watch_after
            and share < self.watch_share
        )

    def _looks_like_noise(self, trial: _Trial) -> bool:
        share = trial.refused / max(trial.answers, 1)
        # about the same share as before the cut: not fewer (a limit left behind), and not
        # many more either (a limit that just came down)
        # (not fewer counts only after a cut: while watching, fewer 429s say "no limit" too)
        lowest = 0.0 if trial.watching else self.same_share * trial.share_before
        highest = 3 * trial.share_before + 0.05
        if trial.watching:  # nothing was cut: a share above watch_share is a limit's
            highest = min(highest, self.watch_share)
        return trial.share_before < 0.3 and trial.refused >= 3 and lowest <= share <= highest

    def _judge(self, now: float, trial: _Trial) -> None:
        self.trial = None
        share = trial.refused / max(trial.answers, 1)
        if self._looks_like_noise(trial):
            # as many 429s at the lower rate: they were not about our rate
            if trial.watching:  # nothing was cut: every recent answer saw the same noise
                share = sum(self.recent) / len(self.recent)
            self.noise = share if self.noise == 0.0 else 0.7 * self.noise + 0.3 * share
            self.found = trial.previous_found
            self._set_rate(trial.previous_rate)
            self._tell(
                f"{share:.0%} of answers are 429 whatever the rate: noise, not a limit", force=True
            )
        elif trial.refused == 0:
            self.noise *= 0.5

    def _tell(self, why: str, *, force: bool = False) -> None:
        """Log a change of mind: a new kind of decision, or the rate moved by 25%."""
        told = self._told_rate
        rate = self.rate
        moved = (rate is None) != (told is None) or (
            rate is not None and told is not None and abs(rate - told) > 0.25 * told
        )
        if not (force or moved):
            return
        self._told_rate = rate
        if self.on_change is not None:
            self.on_change(why, self.view())


class Limits:
    """All meters of one run, composed: ``start`` before a request, ``finish`` after it.

    The adaptive ``RateController`` paces only when no limit is announced: with ``--rpm`` /
    ``--tpm`` or ``x-ratelimit-*`` headers those are followed exactly, as the server states
    them. A 429 never pauses the other requests: its row waits out its own Retry-After.
    """

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
        on_change: Callable[[str, RateView], None] | None = None,
    ) -> None:
        self.clock = clock
        self.max_pause = max_pause
        self.adaptive = adaptive
        self.concurrency = AdaptiveConcurrency(
            concurrency, initial=SLOW_START if adaptive else None
        )
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
        self.controller = RateController(clock=clock, sleep=sleep, on_change=on_change)
        self.long_refusals = 0  # 429s in a row asking for more than max_pause

    @property
    def rate_limited(self) -> int:
        return self.controller.rate_limited

    @property
    def announced(self) -> bool:
        """True when the user or the server states a limit (then it is followed as stated)."""
        return (
            self.requests is not None
            or self.tokens is not None
            or self.header_requests.active
            or self.header_tokens.active
        )

    @property
    def come_back_later(self) -> bool:
        """Three 429s in a row, without an answer between, asked for more than ``max_pause``:
        the server is closed for longer than a row may wait."""
        return self.long_refusals >= 3

    def view(self) -> RateView:
        return self.controller.view()

    async def start(self, chars: int, choices: int = 1) -> tuple[float, float]:
        """Wait until a request of ``chars`` prompt characters and ``choices`` may go.

        Returns (token cost estimate, start time) to hand back to ``finish``.
        """
        cost = self.estimator.cost(chars, choices)
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
            if self.adaptive and not self.announced:
                await self.controller.acquire()
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
        answered: bool | None = None,
    ) -> None:
        """Account for a finished attempt: correct token use, read headers, adapt.

        ``answered`` says the server answered (200); by default, when usage came back.
        """
        await self.concurrency.release()
        if answered is None:
            answered = prompt_tokens is not None
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
        if rate_limited and retry_after is not None and retry_after > self.max_pause:
            self.long_refusals += 1
            self.controller.long_waits += 1
        if self.adaptive and not self.announced and (rate_limited or answered):
            self.controller.observe(started=started, refused=rate_limited)
        elif rate_limited:
            self.controller.rate_limited += 1  # counted for progress and the summary
        if answered:
            self.long_refusals = 0
            if self.adaptive:
                self.concurrency.on_success()
