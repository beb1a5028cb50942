"""The rate controller against scripted servers, in virtual time (no real waiting).

Each scripted server is a token bucket and/or a share of random 429s, decided at the moment
a request arrives; clients are asyncio tasks that go through ``Limits`` like the runner does
(start, a round trip, finish) and retry a refused row on its own. Time is virtual: a task
that sleeps is woken when every task is blocked and its time is the earliest, so a
minute of traffic runs in well under a second and every figure is exact and repeatable.
"""

from __future__ import annotations

import asyncio
import heapq
import io
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from pipeline import RunAborted, build_config, run_batch
from pipeline.errors import EXIT_RETRY_LATER
from pipeline.limits import Limits, Outcome
from pipeline.progress import Reporter
from pipeline.records import RunSummary
from pipeline.runner import Seams
from pipeline.simulator import SimulatorThread, parse_rps_schedule


class VirtualTime:
    """A clock and sleep for several tasks: time jumps to the next wake-up when all wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (self.now + max(seconds, 0.0), next(self._order), future))
        await future

    async def run(self, *tasks: asyncio.Task[None]) -> None:
        """Drive virtual time until every task is done (bounded: at most 2M wake-ups)."""
        for _ in range(2_000_000):
            for _ in range(4):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if all(task.done() for task in tasks):
                break
            if not self._queue:
                raise AssertionError("every task waits on something that is not time")
            when, _, future = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            future.set_result(None)
        for task in tasks:
            task.result()  # re-raise what a client raised


@dataclass
class ScriptedServer:
    """A token bucket of ``rate(t)`` requests/s holding ``burst``, plus ``noise`` random 429s."""

    rate: Callable[[float], float | None]
    burst: float = 5.0
    noise: float = 0.0
    seed: int = 1
    tokens: float = 5.0
    updated: float = 0.0
    arrivals: list[tuple[float, bool, int]] = field(default_factory=list)  # (t, ok, client)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.random = random.Random(self.seed)

    def answer(self, now: float, client: int = 0) -> bool:
        """True: 200; False: 429."""
        rate = self.rate(now)
        ok = True
        if rate is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
            else:
                ok = False
        if ok and self.noise and self.random.random() < self.noise:
            ok = False
        self.arrivals.append((now, ok, client))
        return ok

    def rate_between(self, start: float, end: float, client: int | None = None) -> float:
        """Answers (200) per second in [start, end)."""
        n = sum(
            1
            for t, ok, c in self.arrivals
            if ok and start <= t < end and (client is None or c == client)
        )
        return n / (end - start)

    def refused_share(self, start: float = 0.0, end: float = float("inf")) -> float:
        window = [ok for t, ok, _ in self.arrivals if start <= t < end]
        return window.count(False) / max(1, len(window))


async def _client(
    vt: VirtualTime,
    server: ScriptedServer,
    limits: Limits,
    rows: int,
    *,
    concurrency: int = 64,
    round_trip: float = 0.01,
    client: int = 0,
) -> None:
    """``rows`` rows through ``limits``, ``concurrency`` workers; a refused row waits 1 s."""
    todo = iter(range(rows))

    async def worker() -> None:
        for _ in todo:
            for _attempt in range(1000):
                async with limits.slot(limits.ticket(10)) as slot:
                    ok = server.answer(vt.now, client)
                    await vt.sleep(round_trip)
                    slot.done(
                        Outcome(
                            prompt_tokens=3 if ok else None,
                            completion_tokens=2 if ok else None,
                            rate_limited=not ok,
                            retry_after=None if ok else 1.0,
                            answered=ok,
                        )
                    )
                if ok:
                    break
                await vt.sleep(1.0)  # the row's own Retry-After, holding no slot
            else:
                raise AssertionError("a row was refused 1000 times")

    # like the runner: more workers than slots, so that a row waiting to retry holds no slot
    await asyncio.gather(*(worker() for _ in range(3 * concurrency)))


def _run(server: ScriptedServer, rows: int, *, adaptive: bool = True) -> Limits:
    vt = VirtualTime()

    async def main() -> Limits:
        limits = Limits(concurrency=64, adaptive=adaptive, clock=vt.clock, sleep=vt.sleep)
        task = asyncio.ensure_future(_client(vt, server, limits, rows))
        await vt.run(task)
        return limits

    return asyncio.run(main())


def test_an_unknown_limit_is_found_and_held_with_few_429s() -> None:
    server = ScriptedServer(rate=lambda t: 20.0, burst=5)
    limits = _run(server, 1200)
    end = server.arrivals[-1][0]
    assert 1200 / end >= 0.9 * 20  # the whole run, start-up included
    assert server.refused_share() <= 0.05
    assert server.refused_share(10.0) < 0.02
    assert limits.view().limit_found == pytest.approx(20, rel=0.25)


def test_scattered_429s_are_noise_not_a_reason_to_slow_down() -> None:
    # no limit at all, 5% of requests refused at random: as fast as with no controller
    blind = ScriptedServer(rate=lambda t: None, noise=0.05)
    _run(blind, 6000, adaptive=False)
    server = ScriptedServer(rate=lambda t: None, noise=0.05)
    limits = _run(server, 6000)
    assert server.arrivals[-1][0] <= 1.25 * blind.arrivals[-1][0]
    view = limits.view()
    assert view.rate is None  # it does not hold the rate back
    assert view.noise == pytest.approx(0.05, abs=0.03)


def test_a_limit_that_changes_is_followed_both_ways() -> None:
    def schedule(t: float) -> float:
        return 40.0 if t < 10 or t >= 20 else 10.0

    server = ScriptedServer(rate=schedule, burst=5)
    _run(server, 1400)
    assert server.rate_between(15, 20) == pytest.approx(10, rel=0.2)
    # within 5 s of each change, within 20% of the new limit
    assert server.rate_between(14, 15) == pytest.approx(10, rel=0.2)
    assert server.rate_between(25, 26) >= 0.8 * 40
    assert server.rate_between(25, 30) >= 0.8 * 40


def run_two(server: ScriptedServer, late: float, round_trip: float, rows: int = 600) -> float:
    """Two processes (client 0 and 1, ``rows`` each) on ``server``, the second starting
    ``late`` seconds after the first; returns when both have finished: the time the first
    of them did (the end of the span where both ran)."""
    vt = VirtualTime()

    async def main() -> None:
        first = Limits(concurrency=64, clock=vt.clock, sleep=vt.sleep)
        second = Limits(concurrency=64, clock=vt.clock, sleep=vt.sleep)

        async def second_client() -> None:
            await vt.sleep(late)
            await _client(vt, server, second, rows, client=1, round_trip=round_trip)

        await vt.run(
            asyncio.ensure_future(_client(vt, server, first, rows, round_trip=round_trip)),
            asyncio.ensure_future(second_client()),
        )

    asyncio.run(main())
    return min(max(t for t, _, c in server.arrivals if c == k) for k in (0, 1))


@pytest.mark.parametrize(("late", "round_trip"), [(0.0, 0.01), (5.0, 0.05)])
def test_two_processes_on_one_limit_share_it_without_starving(
    late: float, round_trip: float
) -> None:
    """Two processes on one unannounced limit, the second starting ``late`` seconds after
    the first has found it. Before: a late second process stayed at a fifth of the total
    (the growth was in proportion to each one's rate, so the larger gained more after every
    shared cut), and the first took the late one's 429s for noise and stopped yielding."""
    server = ScriptedServer(rate=lambda t: 20.0, burst=5)
    both_running = run_two(server, late, round_trip)
    total = server.rate_between(late + 5, both_running)
    assert total >= 0.85 * 20
    for k in (0, 1):
        assert server.rate_between(late + 5, both_running, client=k) >= total / 3
    assert server.refused_share(late) <= 0.10


# -- end to end, over real HTTP against the simulator ---------------------------------------


def _pipeline(
    sim: SimulatorThread,
    tmp_path: Path,
    prompts: list[str],
    *,
    fake_time: bool = True,
    **options: object,
) -> tuple[RunSummary, str, list[float]]:
    """Run the prompts; (summary, log text, waits slept). Waits are recorded, not slept,
    unless ``fake_time`` is False (then real time, for the rate a server enforces)."""
    waits: list[float] = []
    now = [1000.0]

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        await asyncio.sleep(0)

    log = io.StringIO()
    reporter = Reporter(progress=False, stream=log)
    seams = (
        Seams(sleep=sleep, clock=lambda: now[0], reporter=reporter, handle_signals=False)
        if fake_time
        else Seams(reporter=reporter, handle_signals=False)
    )
    config = build_config(None, {"base_url": sim.base_url, "progress": False, **options})
    data = pd.DataFrame({"prompt": prompts})
    try:
        summary = run_batch(data, tmp_path / "out.parquet", config, seams)
    except RunAborted as exc:
        summary = exc.summary  # type: ignore[attr-defined]
    return summary, log.getvalue(), waits


def test_a_429_makes_only_its_own_row_wait(simulator: SimulatorThread, tmp_path: Path) -> None:
    prompts = ["slow [[sim:fail=1,status=429,retry_after=2]]"] + [f"row {i}" for i in range(40)]
    summary, _, _ = _pipeline(simulator, tmp_path, prompts, fake_time=False, concurrency=4)
    assert summary.ok == 41
    texts = [
        r.body["messages"][-1]["content"] if r.body else "" for r in simulator.simulator.requests
    ]
    first, retry = (i for i, text in enumerate(texts) if text.startswith("slow"))
    # while the refused row waited out its Retry-After, the other rows went on (at a pace
    # the controller keeps until it knows whether that 429 was noise; not paused: the old
    # global pause let only the 4 requests already in flight through)
    assert retry - first > 15


def test_a_long_retry_after_is_announced_in_the_text_log(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = ["x [[sim:fail=1,status=429,retry_after=3600]]"]
    summary, log, waits = _pipeline(simulator, tmp_path, prompts, max_retry_wait=120.0)
    assert summary.ok == 1
    assert waits == [120.0]
    assert "row 0: HTTP 429, retry 1 in 120 s (the server asked 3600 s)" in log


def test_a_server_that_says_come_back_in_an_hour_ends_the_run_cleanly(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(rate_429=1.0, retry_after_s=3600)
    summary, log, waits = _pipeline(sim, tmp_path, [f"row {i}" for i in range(8)], concurrency=2)
    assert summary.exit_code == EXIT_RETRY_LATER == 7
    assert summary.pending == 8 and summary.ok == 0 and summary.error == 0
    assert "come back in 3600 s" in log and "Rerun the same command" in log
    assert len(sim.simulator.requests) <= 6  # not a crawl of 120-s waits, request by request
    assert sum(waits) < 400


def test_an_unannounced_limit_is_found_with_few_429s(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    # 50 requests/s, a bucket of 5, 429 + Retry-After beyond it and no x-ratelimit headers
    sim = make_simulator(rps_limit=50, rps_burst=5, record=True)
    prompts = [f"row {i}" for i in range(200)]
    summary, log, _ = _pipeline(sim, tmp_path, prompts, fake_time=False, concurrency=64)
    assert summary.ok == 200
    refused = len(sim.simulator.requests) - 200
    assert refused <= 20  # a start-up burst and a few probes, not a storm
    assert "rate control:" in log and "limit found" in log


def test_the_simulator_schedule_changes_its_limit() -> None:
    assert parse_rps_schedule("0:40, 10:10,20:40") == ((0, 40), (10, 10), (20, 40))
    with pytest.raises(ValueError, match="0:40,10:10,20:40"):
        parse_rps_schedule("0:40,ten:10")


def test_a_limit_that_comes_down_after_noise_was_found_is_still_followed() -> None:
    """Scattered 429s first (a noise floor), then a limit drops under the sending rate: its
    429s are cut, not taken for more noise (a floor that followed every 429 ran away to 90%
    and sent at 1,000 req/s against a limit of 10)."""

    def schedule(t: float) -> float | None:
        return None if t < 0.5 else 10.0  # no limit for the first 3,000 or so answers

    server = ScriptedServer(rate=schedule, burst=5, noise=0.05)
    limits = _run(server, 3500)
    assert server.refused_share(0, 0.5) < 0.15  # the noise phase happened
    assert server.rate_between(10, 30) == pytest.approx(10, rel=0.2)
    assert limits.view().noise < 0.15
