"""One ``--rpm``/``--tpm`` for a whole job: a bucket in a Ray actor that every actor paces by.

``RateKeeper`` (one named actor per job, no CPU of its own) holds a token bucket per kind
(requests, tokens) in its own clock. ``reserve(kind, amount)`` takes ``amount`` at once,
letting the level go below zero, and answers how long the caller must wait before it may
send: the waits of reservations from every actor queue up in the order the keeper received
them, so the job as a whole sends at the rate and never faster, whichever actors are
running (one that is done or dead takes nothing). The bucket starts with one unit at the
first reservation. Requests bank nothing (one at a time, evenly spaced: the actors of
``complete`` idle between batches, and a second's worth banked then went out as one burst
that drew 429s from a server with a small burst); tokens bank up to ~1 s of rate, as a
local run's ``RateMeter`` does (a request's tokens come at once). ``adjust`` corrects a
token reservation by the usage the answer reported.

The server's limits are shared the same way: an actor that reads a refill rate from the
``x-ratelimit-*`` headers announces it (``announce``), and from then on every actor's
requests of that kind also reserve from the keeper at that rate (each actor's own mirror of
the server's bucket would otherwise take the whole rate: 2 actors sent 39 requests/s
against a server announcing 20, and 272 of 565 requests drew 429s).

``SharedBuckets(keeper)`` is the engine's side (``Seams.buckets``): a ``Bucket`` per kind
that asks the keeper, then sleeps here. One round trip to the keeper per request (about a
millisecond on one machine), which the keeper serves for thousands of requests a second:
far above any key's limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from ..limits import Bucket


@ray.remote(num_cpus=0, max_restarts=0)
class RateKeeper:
    """The job's buckets (see the module docstring); ``rates`` maps kind -> units/s."""

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates = {kind: rate for kind, rate in rates.items() if rate > 0}  # --rpm/--tpm
        self.level: dict[str, float] = {}
        self.updated: dict[str, float] = {}

    def announce(self, kind: str, rate: float) -> None:
        """A server's refill rate, read from its headers by an actor, for the bucket ``kind``
        ("server requests" or "server tokens": apart from the user's, so that a request
        under both takes from each once)."""
        if rate > 0:
            if kind in self.rates:
                self._refill(kind)
            self.rates[kind] = rate

    def _burst(self, kind: str) -> float:
        return 1.0 if kind.endswith("requests") else max(1.0, self.rates[kind])

    def _refill(self, kind: str) -> float:
        rate, now = self.rates[kind], time.monotonic()
        if kind not in self.level:  # the first reservation: one unit, nothing banked
            self.level[kind], self.updated[kind] = 1.0, now
        level = self.level[kind] + (now - self.updated[kind]) * rate
        self.level[kind] = min(self._burst(kind), level)
        self.updated[kind] = now
        return rate

    def reserve(self, kind: str, amount: float) -> float:
        """Take ``amount`` of ``kind``; the seconds the caller waits before it goes."""
        if kind not in self.rates:
            return 0.0
        rate = self._refill(kind)
        amount = min(amount, self._burst(kind))  # larger than the bucket still goes
        self.level[kind] -= amount
        return max(0.0, -self.level[kind] / rate)

    def adjust(self, kind: str, amount: float) -> None:
        """Take ``amount`` more (negative: give it back, up to the bucket's size)."""
        if kind in self.rates:
            self._refill(kind)
            self.level[kind] = min(self._burst(kind), self.level[kind] - amount)

    def rates_per_second(self) -> dict[str, float]:
        return dict(self.rates)


class _SharedBucket:
    """One kind of the keeper's buckets, as ``limits.Bucket``."""

    def __init__(self, keeper: Any, kind: str) -> None:
        self.keeper = keeper
        self.kind = kind

    async def acquire(self, amount: float = 1.0) -> None:
        reply = self.keeper.reserve.remote(self.kind, amount)
        wait = await asyncio.wrap_future(reply.future())
        if wait > 0:
            await asyncio.sleep(wait)

    def charge(self, amount: float) -> None:
        self.keeper.adjust.remote(self.kind, amount)

    def refund(self, amount: float) -> None:
        self.keeper.adjust.remote(self.kind, -amount)


class SharedBuckets:
    """``Seams.buckets`` for a run in a Ray actor: the keeper's bucket of each kind (the
    run's own ``--rpm``/``--tpm`` only switch the bucket on; the keeper's rate is the job's)."""

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper

    def __call__(self, kind: str, per_second: float) -> Bucket:
        return _SharedBucket(self.keeper, kind)

    def announced(self, kind: str, per_second: float) -> Bucket:
        self.keeper.announce.remote(f"server {kind}", per_second)
        return _SharedBucket(self.keeper, f"server {kind}")


def start_keeper(rpm: float | None, tpm: float | None) -> Any:
    """The job's keeper (owned by this process: it ends with it): the user's limits, and
    those the server announces in its headers once an actor reads them."""
    rates = {"requests": (rpm or 0) / 60.0, "tokens": (tpm or 0) / 60.0}
    return RateKeeper.remote(rates)  # type: ignore[attr-defined]
