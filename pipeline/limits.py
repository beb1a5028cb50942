"""Limits: the meters of one run composed behind one protocol.

Every meter (``Meter``) answers three calls: ``wait(ticket)`` before a request may start,
``started(ticket)`` as it goes, ``finished(ticket, outcome)`` after it, where a ``Ticket``
says what the request may cost and an ``Outcome`` what came back. ``Limits`` stacks them in
one list (aiometer's shape): in flight (``AdaptiveConcurrency``), ``--rpm`` and ``--tpm``
buckets, the pacers that mirror ``x-ratelimit-*`` headers, the token estimator and the
adaptive ``RateController``; a new meter is one class. The engine holds a place with
``async with limits.slot(ticket) as slot`` and says how it ended with ``slot.done(outcome)``.
It knows nothing of HTTP bodies or retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .budget import Budget
from .meters import (
    SLOW_START,
    AdaptiveConcurrency,
    Clock,
    HeaderPacer,
    RateMeter,
    RowGate,
    Sleep,
    TokenEstimator,
    read_bucket,
)
from .rate_control import FAIR_SHARE_FLOOR, RateController, RateView

__all__ = [
    "FAIR_SHARE_FLOOR",
    "SLOW_START",
    "AdaptiveConcurrency",
    "Bucket",
    "BucketFactory",
    "Budget",
    "HeaderPacer",
    "Limits",
    "Meter",
    "Outcome",
    "RateController",
    "RateMeter",
    "RateView",
    "RowGate",
    "Ticket",
    "TokenEstimator",
    "read_bucket",
]


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request as the meters see it before it goes: its prompt size, the completions it
    asks for, its token cost estimate; ``started`` is set when it may go."""

    chars: int
    choices: int
    tokens: float
    started: float = 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as the meters need it (not the answer itself)."""

    headers: Mapping[str, str] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answered: bool = False  # a 200
    rate_limited: bool = False  # a 429
    retry_after: float | None = None


NOTHING = Outcome()  # no answer at all (cancelled, an exception of ours)


class Meter(Protocol):
    """One limit on requests (see the module docstring). ``waits`` and ``starts`` say
    whether ``wait`` and ``started`` do anything now (skipped otherwise: a few microseconds
    a request that a meter with nothing to do should not cost)."""

    @property
    def waits(self) -> bool: ...

    @property
    def starts(self) -> bool: ...

    async def wait(self, ticket: Ticket) -> None:
        """Return when ``ticket``'s request may start as far as this meter is concerned."""
        ...

    def started(self, ticket: Ticket) -> None: ...

    def finished(self, ticket: Ticket, outcome: Outcome) -> None: ...


class _InFlight:
    """``AdaptiveConcurrency`` as a meter: a place held from ``wait`` to ``finished``."""

    waits, starts = True, False

    def __init__(self, limit: AdaptiveConcurrency, adaptive: bool) -> None:
        self.limit = limit
        self.adaptive = adaptive

    async def wait(self, ticket: Ticket) -> None:
        await self.limit.acquire()

    def started(self, ticket: Ticket) -> None:
        pass

    def finished(self, ticket: Ticket, outcome: Outcome) -> None:
        self.limit.release_nowait()
        if outcome.answered and self.adaptive:
            self.limit.on_success()


class Bucket(Protocol):
    """A rate limit's bucket as ``--rpm``/``--tpm`` use it: ``RateMeter`` in one process;
    one shared by the processes of a job (``pipeline.ray``'s ``SharedBuckets``) where a
    seam gives one."""

    async def acquire(self, amount: float = 1.0) -> None: ...

    def charge(self, amount: float) -> None: ...

    def refund(self, amount: float) -> None: ...


class BucketFactory(Protocol):
    """Buckets shared by the processes of a job (``Seams.buckets``). Called with ``kind``
    ("requests" or "tokens") and the user's limit in units per second for ``--rpm``/``--tpm``;
    ``announced`` when a process learns the server's refill rate from its headers (the
    job then paces that kind at that rate, all processes together)."""

    def __call__(self, kind: str, per_second: float) -> Bucket: ...

    def announced(self, kind: str, per_second: float) -> Bucket: ...


class _Bucket:
    """``--rpm`` (a request each) or ``--tpm`` (the ticket's tokens, corrected by usage)."""

    waits, starts = True, False

    def __init__(self, meter: Bucket, per_token: bool) -> None:
        self.meter = meter
        self.per_token = per_token

    async def wait(self, ticket: Ticket) -> None:
        await self.meter.acquire(ticket.tokens if self.per_token else 1)

    def started(self, ticket: Ticket) -> None:
        pass

    def finished(self, ticket: Ticket, outcome: Outcome) -> None:
        if not self.per_token:
            return
        if outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
            actual = (outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0)
            self.meter.charge(actual - ticket.tokens)
        elif not outcome.rate_limited:
            self.meter.refund(ticket.tokens)  # nothing was generated: give the estimate back


class _Sent:
    """How many requests have passed every meter and not yet ended: on their way to the
    server, or answered and being read. (Places in flight count the requests still waiting
    on a pacer too: a bucket mirrored with that margin was clamped by requests that had not
    gone, and a server bucket of 5 at 20/s was paced at 1.8 requests/s.)"""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class _Headers:
    """The server's ``x-ratelimit-*-{requests,tokens}`` bucket mirrored (once announced)."""

    starts = False

    @property
    def waits(self) -> bool:
        return self.pacer.active

    def __init__(
        self, pacer: HeaderPacer, kind: str, sent: _Sent, shared: BucketFactory | None = None
    ) -> None:
        self.pacer = pacer
        self.kind = kind
        self.sent = sent  # the margin is for requests on their way, not those still waiting
        self.shared = shared  # other processes send on the same key (pipeline.ray)
        self.job: Bucket | None = None  # the job's bucket at the announced rate
        self.announced = 0.0

    async def wait(self, ticket: Ticket) -> None:
        if self.pacer.active:
            amount = ticket.tokens if self.kind == "tokens" else 1
            await self.pacer.acquire(amount)
            if self.job is not None:  # each process's mirror would take the whole rate
                await self.job.acquire(amount)

    def started(self, ticket: Ticket) -> None:
        pass

    def finished(self, ticket: Ticket, outcome: Outcome) -> None:
        if not outcome.headers:
            return
        bucket = read_bucket(outcome.headers, self.kind)
        if bucket is not None:
            each = ticket.tokens if self.kind == "tokens" else 1.0
            self.pacer.observe(bucket, self.sent.count * each)
            rate = self.pacer.rate
            if self.shared is not None and rate and abs(rate - self.announced) > 0.05 * rate:
                self.job, self.announced = self.shared.announced(self.kind, rate), rate


class _Estimates:
    """Calibrates the token estimator on actual usage."""

    waits, starts = False, False

    def __init__(self, estimator: TokenEstimator) -> None:
        self.estimator = estimator

    async def wait(self, ticket: Ticket) -> None:
        pass

    def started(self, ticket: Ticket) -> None:
        pass

    def finished(self, ticket: Ticket, outcome: Outcome) -> None:
        if outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
            self.estimator.observe(
                ticket.chars, outcome.prompt_tokens, outcome.completion_tokens, ticket.choices
            )


class _Adaptive:
    """The rate controller, for a run whose limit nobody announces; it counts every 429 and
    the long Retry-Afters that say "come back later"."""

    starts = False

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.controller = limits.controller

    def _on(self) -> bool:
        return self.limits.adaptive and not self.limits.announced

    @property
    def waits(self) -> bool:
        return self._on()

    async def wait(self, ticket: Ticket) -> None:
        if self._on():
            await self.controller.acquire()

    def started(self, ticket: Ticket) -> None:
        pass

    def finished(self, ticket: Ticket, outcome: Outcome) -> None:
        limits, refused = self.limits, outcome.rate_limited
        if refused and outcome.retry_after is not None and outcome.retry_after > limits.max_pause:
            limits.long_refusals += 1
            self.controller.long_waits += 1
        if self._on() and (refused or outcome.answered):
            self.controller.observe(started=ticket.started, refused=refused)
        elif refused:
            self.controller.rate_limited += 1  # counted for progress and the summary
        if outcome.answered:
            limits.long_refusals = 0


class Slot:
    """A request's place (``Limits.slot``): ``async with`` waits for every meter, and on
    leaving tells each how the request ended (``done``; nothing when the block raised
    before saying). A plain class, not a generator: it runs once per request."""

    __slots__ = ("clock", "meters", "outcome", "sent", "ticket")

    def __init__(self, meters: list[Meter], ticket: Ticket, clock: Clock, sent: _Sent) -> None:
        self.meters = meters
        self.ticket = ticket
        self.clock = clock
        self.sent = sent
        self.outcome = NOTHING

    def done(self, outcome: Outcome) -> None:
        self.outcome = outcome

    async def __aenter__(self) -> Slot:
        ticket, waited = self.ticket, 0
        try:
            for meter in self.meters:
                if meter.waits:
                    await meter.wait(ticket)
                waited += 1
        except BaseException:
            for meter in self.meters[:waited]:
                meter.finished(ticket, NOTHING)
            raise
        self.ticket = ticket = Ticket(ticket.chars, ticket.choices, ticket.tokens, self.clock())
        self.sent.count += 1
        for meter in self.meters:
            if meter.starts:
                meter.started(ticket)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.sent.count -= 1
        ticket, outcome = self.ticket, self.outcome
        for meter in self.meters:
            meter.finished(ticket, outcome)


class Limits:
    """All meters of one run, stacked (see the module docstring).

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
        buckets: BucketFactory | None = None,
    ) -> None:
        self.clock = clock
        self.max_pause = max_pause
        self.adaptive = adaptive
        self.concurrency = AdaptiveConcurrency(
            concurrency, initial=SLOW_START if adaptive else None
        )
        self.requests = _bucket("requests", rpm, clock, sleep, buckets)
        if isinstance(self.requests, RateMeter):
            # start with one request, not a full second's burst: the server's own bucket
            # may already be partly used, and a start-up burst is where 429s came from
            self.requests.level = 1.0
        self.tokens = _bucket("tokens", tpm, clock, sleep, buckets)
        self.header_requests = HeaderPacer(clock=clock, sleep=sleep)
        self.header_tokens = HeaderPacer(clock=clock, sleep=sleep)
        self.estimator = TokenEstimator(max_tokens)
        self.controller = RateController(clock=clock, sleep=sleep, on_change=on_change)
        self.long_refusals = 0  # 429s in a row asking for more than max_pause
        self.sent = _Sent()
        self.meters: list[Meter] = [_InFlight(self.concurrency, adaptive)]
        if self.requests is not None:
            self.meters.append(_Bucket(self.requests, per_token=False))
        if self.tokens is not None:
            self.meters.append(_Bucket(self.tokens, per_token=True))
        self.meters += [
            _Headers(self.header_requests, "requests", self.sent, buckets),
            _Headers(self.header_tokens, "tokens", self.sent, buckets),
            _Estimates(self.estimator),
            _Adaptive(self),
        ]

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

    def ticket(self, chars: int, choices: int = 1) -> Ticket:
        """A request of ``chars`` prompt characters asking for ``choices`` completions."""
        return Ticket(chars, choices, self.estimator.cost(chars, choices))

    def slot(self, ticket: Ticket) -> Slot:
        """``async with limits.slot(ticket) as slot``: see ``Slot``."""
        return Slot(self.meters, ticket, self.clock, self.sent)


def _bucket(
    kind: str, per_minute: float | None, clock: Clock, sleep: Sleep, shared: BucketFactory | None
) -> Bucket | None:
    """A bucket for ``--rpm``/``--tpm``: the shared one where the run has a factory, else a
    ``RateMeter`` with a burst of ~1 s (even pacing, no start-up spike against the server's
    window)."""
    if not per_minute:
        return None
    per_second = per_minute / 60.0
    if shared is not None:
        return shared(kind, per_second)
    return RateMeter(per_second, burst=max(1.0, per_second), clock=clock, sleep=sleep)
