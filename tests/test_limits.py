"""The pacing meters, each alone, on a fake clock; then stacked, with a spy that counts in flight."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from conftest import FakeTime

from pipeline.durations import parse_duration
from pipeline.limits import (
    AdaptiveConcurrency,
    HeaderPacer,
    Limits,
    Outcome,
    RateController,
    RateMeter,
    RowGate,
    Ticket,
    TokenEstimator,
    read_bucket,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("20", 20.0),
        ("0s", 0.0),
    ],
)
def test_reset_durations_parse_like_go(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5 s", "1x", "s"])
def test_unreadable_durations_are_none(text: str) -> None:
    assert parse_duration(text) is None


def test_rate_meter_spaces_requests_at_the_rate_after_its_burst() -> None:
    t = FakeTime()
    starts: list[float] = []

    async def main() -> None:
        meter = RateMeter(rate=10.0, burst=1.0, clock=t.clock, sleep=t.sleep)
        for _ in range(21):
            await meter.acquire()
            starts.append(t.now)

    asyncio.run(main())
    assert starts[0] == 0.0
    assert starts[-1] == pytest.approx(2.0)  # 20 intervals of 0.1 s
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g == pytest.approx(0.1) for g in gaps)


def test_rate_meter_under_many_concurrent_waiters_never_exceeds_the_rate() -> None:
    t = FakeTime()
    starts: list[float] = []

    async def worker(meter: RateMeter) -> None:
        for _ in range(10):
            await meter.acquire()
            starts.append(t.now)

    async def main() -> None:
        meter = RateMeter(rate=50.0, burst=5.0, clock=t.clock, sleep=t.sleep)
        await asyncio.gather(*(worker(meter) for _ in range(20)))

    asyncio.run(main())
    assert len(starts) == 200
    # in any 1-second window at most rate + burst starts
    for s in starts:
        in_window = sum(1 for x in starts if s <= x < s + 1.0)
        assert in_window <= 55
    assert max(starts) == pytest.approx((200 - 5) / 50.0, rel=0.01)


def test_token_meter_corrections_change_when_the_next_request_may_go() -> None:
    t = FakeTime()

    async def main() -> list[float]:
        meter = RateMeter(rate=100.0, burst=100.0, clock=t.clock, sleep=t.sleep)
        await meter.acquire(100)  # estimate: the whole bucket
        meter.refund(60)  # actual use was 40
        await meter.acquire(60)
        first = t.now
        meter.charge(50)  # a response used 50 more than estimated: bucket goes negative
        await meter.acquire(10)
        return [first, t.now]

    first, second = asyncio.run(main())
    assert first == 0.0
    assert second == pytest.approx(0.6)  # -50 -> +10 at 100/s


def test_concurrency_starts_small_and_opens_by_one_per_answer() -> None:
    limit = AdaptiveConcurrency(32, initial=8)
    assert limit.limit == 8
    for _ in range(5):
        limit.on_success()
    assert limit.limit == 13
    for _ in range(1000):
        limit.on_success()
    assert limit.limit == 32  # never above the configured maximum


def test_in_flight_never_exceeds_the_adaptive_limit() -> None:
    in_flight = 0
    peak = 0

    async def task(limit: AdaptiveConcurrency) -> None:
        nonlocal in_flight, peak
        await limit.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        await limit.release()

    async def main() -> None:
        limit = AdaptiveConcurrency(10, initial=5)
        await asyncio.gather(*(task(limit) for _ in range(100)))

    asyncio.run(main())
    assert peak == 5


def test_header_pacer_estimates_the_refill_rate_and_slows_before_zero() -> None:
    t = FakeTime()
    pacer = HeaderPacer(clock=t.clock, sleep=t.sleep)
    # server: bucket of 100, 90 used, full again in 9 s -> refills 10/s
    bucket = read_bucket(
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "10",
            "x-ratelimit-reset-requests": "9s",
        },
        "requests",
    )
    assert bucket is not None
    pacer.observe(bucket, in_flight=0)
    # 10 left means 10 to 11: 89.5 used on average, refilled in 9 s
    assert pacer.rate == pytest.approx(89.5 / 9)

    async def main() -> list[float]:
        starts = []
        for _ in range(30):
            await pacer.acquire(1)
            starts.append(t.now)
        return starts

    starts = asyncio.run(main())
    assert starts[9] == 0.0  # the 10 left go at once
    assert starts[-1] == pytest.approx(20 / (89.5 / 9))  # then ~10/s


def test_requests_waiting_on_a_pacer_are_not_counted_as_sent_against_the_servers_bucket() -> None:
    """The margin kept below the server's ``remaining`` is for requests on their way, not
    for those still waiting here: counting those clamped a bucket of 5 at 20/s to 1.8/s."""
    t = FakeTime()

    def told(remaining: int, reset: str) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": "5",
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": reset,
        }

    async def main() -> float:
        limits = Limits(concurrency=16, adaptive=False, clock=t.clock, sleep=t.sleep)
        async with limits.slot(limits.ticket(10)) as slot:  # 4.5 used, full in 225 ms: 20/s
            slot.done(Outcome(headers=told(0, "225ms"), answered=True))
        for _ in range(10):  # places held by requests still waiting on a pacer
            await limits.concurrency.acquire()
        async with limits.slot(limits.ticket(10)) as slot:
            slot.done(Outcome(headers=told(5, "0s"), answered=True))
        before = t.now
        async with limits.slot(limits.ticket(10)):
            return t.now - before

    assert asyncio.run(main()) <= 1 / 20 + 1e-9  # the server's pace, not (10 - 5 + 1) / 20


def test_header_pacer_without_a_rate_waits_for_reset_when_nothing_is_left() -> None:
    t = FakeTime()
    pacer = HeaderPacer(clock=t.clock, sleep=t.sleep)
    bucket = read_bucket(
        {
            "x-ratelimit-limit-requests": "1",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1.5s",
        },
        "requests",
    )
    assert bucket is not None
    pacer.observe(bucket, in_flight=0)
    asyncio.run(pacer.acquire(1))
    assert t.now == pytest.approx(1.5)


def test_missing_or_partial_headers_are_ignored() -> None:
    assert read_bucket({}, "requests") is None
    assert read_bucket({"x-ratelimit-limit-tokens": "10"}, "tokens") is None
    assert (
        read_bucket(
            {"x-ratelimit-limit-tokens": "x", "x-ratelimit-remaining-tokens": "1"}, "tokens"
        )
        is None
    )


def test_token_estimate_uses_max_tokens_as_bound_and_calibrates_on_usage() -> None:
    bounded = TokenEstimator(max_tokens=100)
    assert bounded.cost(400) == pytest.approx(200.0)  # 400 chars / 4 + 100
    free = TokenEstimator(max_tokens=None)
    for _ in range(200):
        free.observe(chars=300, prompt_tokens=100, completion_tokens=20)
    assert free.prompt_tokens(300) == pytest.approx(100, rel=0.02)  # 3 chars per token here
    assert free.mean_completion == pytest.approx(20, rel=0.05)


def test_a_429_does_not_hold_back_the_other_requests() -> None:
    """A scattered 429 is its row's business: the others start at once (no global pause)."""
    t = FakeTime()

    async def main() -> list[float]:
        limits = Limits(concurrency=16, clock=t.clock, sleep=t.sleep)
        async with limits.slot(limits.ticket(10)) as slot:
            slot.done(Outcome(rate_limited=True, retry_after=30.0))
        starts = []
        for _ in range(3):
            async with limits.slot(limits.ticket(10)) as slot:
                starts.append(t.now)
                slot.done(Outcome(prompt_tokens=3, answered=True))
        return starts

    assert asyncio.run(main())[0] == 0.0


def test_rpm_and_tpm_stack_the_slower_one_wins() -> None:
    t = FakeTime()

    async def main() -> list[float]:
        # 600 rpm = 10/s; 6000 tpm = 100 tokens/s with requests costing ~50 -> 2/s
        limits = Limits(
            concurrency=4, rpm=600, tpm=6000, max_tokens=25, clock=t.clock, sleep=t.sleep
        )
        starts = []
        for _ in range(11):
            async with limits.slot(limits.ticket(100)) as slot:  # 25 prompt + 25 completion
                starts.append(t.now)
                slot.done(Outcome(prompt_tokens=25, completion_tokens=25, answered=True))
        return starts

    starts = asyncio.run(main())
    # the request meter starts with one request (no start-up burst); the token budget banked
    # at the start lets the second go as soon as the request rate allows
    assert starts[:2] == pytest.approx([0.0, 0.1])
    steady = starts[2:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert rate == pytest.approx(2.0, rel=0.1)


def test_rpm_does_not_burst_at_start_up() -> None:
    t = FakeTime()

    async def main() -> list[float]:
        limits = Limits(concurrency=64, rpm=6000, clock=t.clock, sleep=t.sleep)  # 100/s
        starts = []
        for _ in range(5):
            async with limits.slot(limits.ticket(10)) as slot:
                starts.append(t.now)
                slot.done(Outcome(prompt_tokens=1, completion_tokens=1, answered=True))
        return starts

    assert asyncio.run(main()) == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])


def test_a_freed_place_goes_to_the_longest_waiter_not_a_newcomer() -> None:
    order: list[int] = []

    async def main() -> None:
        limit = AdaptiveConcurrency(1)
        await limit.acquire()

        async def row(i: int) -> None:
            await limit.acquire()
            order.append(i)
            await limit.release()

        waiting = [asyncio.ensure_future(row(i)) for i in range(3)]
        await asyncio.sleep(0)
        await limit.release()
        late = asyncio.ensure_future(row(99))  # arrives as the place frees: it queues
        await asyncio.gather(*waiting, late)

    asyncio.run(main())
    assert order == [0, 1, 2, 99]


def test_a_row_waiting_to_retry_leaves_its_place_to_the_next_row() -> None:
    async def main() -> list[str]:
        gate = RowGate(1)
        second_started = asyncio.Event()
        events: list[str] = []

        async def until_second_started(_seconds: float) -> None:
            await second_started.wait()

        parked_sleep = gate.parked(until_second_started)

        async def first() -> None:
            await gate.enter()
            events.append("first sent, waits to retry")
            await parked_sleep(30.0)  # ends only once the second row got the place
            events.append("first retried")
            gate.leave()

        async def second() -> None:
            await gate.enter()
            events.append("second sent")
            second_started.set()
            gate.leave()

        await asyncio.wait_for(asyncio.gather(first(), second()), timeout=5)
        return events

    assert asyncio.run(main()) == ["first sent, waits to retry", "second sent", "first retried"]


def test_noise_undoes_every_cut_it_caused_not_only_the_last() -> None:
    """Scattered 429s can slip past one trial (too few of them by chance); when the next
    trial recognises them as noise, the controller goes back to where it was before the
    first of those cuts (here: not pacing at all), not to the rate after the first cut."""
    t = FakeTime()
    controller = RateController(clock=t.clock, sleep=t.sleep)

    def answer(refused: bool) -> None:
        t.now += 0.002
        controller.observe(started=t.now, refused=refused)

    for _ in range(4):  # few answers yet (a 429 in 5 is no scatter): cut at once, not watched
        answer(False)
    answer(True)  # the first 429: a cut, then a trial
    assert controller.rate is not None
    answer(True)  # one 429 in the trial, too few: judged a real limit (wrongly)
    for _ in range(500):
        if controller.trial is None:
            break
        answer(False)
    assert controller.trial is None and controller.noise == 0
    answer(True)  # another 429: a second cut, a second trial
    assert controller.cuts == 2
    for i in range(200):  # a full trial (150 answers)
        answer(i % 12 == 0)  # 429s at the same share whatever the rate: noise
        if controller.trial is None:
            break
    assert controller.noise > 0
    assert controller.rate is None


def test_scattered_429s_after_many_answers_never_slow_the_run_down() -> None:
    """A first 429 among many answers is watched, not cut: at a steady small share it is
    noise and the rate was never held (before: a cut to 85% of what got through, and ~2 s
    at a fraction of the server's speed until a trial undid it)."""
    t = FakeTime()
    controller = RateController(clock=t.clock, sleep=t.sleep)
    for i in range(400):
        t.now += 0.002
        controller.observe(started=t.now, refused=i > 40 and i % 16 == 0)
        assert controller.rate is None, f"held a rate after answer {i}"
    assert controller.cuts == 0 and controller.noise > 0


def test_a_first_429_watched_is_cut_once_the_429s_climb() -> None:
    """Watching a first 429 does not hide a limit: when the share climbs, the trial cuts."""
    t = FakeTime()
    controller = RateController(clock=t.clock, sleep=t.sleep)
    for _ in range(40):
        t.now += 0.002
        controller.observe(started=t.now, refused=False)
    t.now += 0.002
    controller.observe(started=t.now, refused=True)
    assert controller.trial is not None and controller.rate is None  # watching
    for i in range(12):
        t.now += 0.002
        controller.observe(started=t.now, refused=i % 2 == 0)  # half refused: a limit
    assert controller.cuts >= 1 and controller.rate is not None


@pytest.mark.parametrize("gate", ["in flight", "rows"])
def test_a_waiter_cancelled_as_its_place_frees_up_is_just_cancelled(gate: str) -> None:
    # Before: the freed place dropped the cancelled waiter from the queue, the waiter then
    # tried to remove itself and raised ValueError, which a worker took for its row's
    # error (73 rows of a stopped run ended as "ValueError" instead of pending).
    from pipeline.limits import AdaptiveConcurrency, RowGate

    async def scenario() -> BaseException | None:
        if gate == "in flight":
            limiter = AdaptiveConcurrency(1)
            enter, leave = limiter.acquire, limiter.release
        else:
            rows = RowGate(1)

            async def leave_rows() -> None:
                rows.leave()

            enter, leave = rows.enter, leave_rows
        await enter()
        waiting = asyncio.ensure_future(enter())
        await asyncio.sleep(0)  # it waits for the place
        waiting.cancel()
        await leave()  # the place frees up before the cancelled waiter runs again
        try:
            await waiting
        except BaseException as exc:
            return exc
        return None

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


class SpyMeter:
    """A meter that only counts: requests between started and finished, and the outcomes."""

    waits, starts = False, True

    def __init__(self) -> None:
        self.going: set[int] = set()  # id() of the tickets started and not finished
        self.most = 0
        self.outcomes: list[Outcome] = []

    async def wait(self, ticket: Ticket) -> None:
        pass

    def started(self, ticket: Ticket) -> None:
        self.going.add(id(ticket))
        self.most = max(self.most, len(self.going))

    def finished(self, ticket: Ticket, outcome: Outcome) -> None:
        self.going.discard(id(ticket))
        self.outcomes.append(outcome)


def test_stacked_meters_hold_requests_in_flight_to_the_limit_and_see_every_outcome() -> None:
    """The meter protocol: one more meter is one object in ``Limits.meters``; it sees each
    request start and finish, with the outcome the engine gave (none for a request that
    raised), and never more in flight than the concurrency meter before it allows."""
    t = FakeTime()
    spy = SpyMeter()

    async def main() -> None:
        limits = Limits(concurrency=5, adaptive=False, clock=t.clock, sleep=t.sleep)
        limits.meters.append(spy)

        async def request(i: int) -> None:
            async with limits.slot(limits.ticket(10)) as slot:
                await asyncio.sleep(0)
                if i % 10 == 9:
                    raise ValueError("a request of ours that failed")
                slot.done(Outcome(answered=True, prompt_tokens=3))

        results = await asyncio.gather(*(request(i) for i in range(50)), return_exceptions=True)
        assert sum(isinstance(r, ValueError) for r in results) == 5

    asyncio.run(main())
    assert spy.most == 5 and not spy.going
    assert len(spy.outcomes) == 50
    assert sum(o.answered for o in spy.outcomes) == 45  # the 5 that raised: no outcome


def test_429s_that_all_come_late_in_a_trial_are_not_taken_for_noise() -> None:
    """After a cut, a trial whose 429s all came in its second half saw something new begin
    (another process starting on the same limit), not noise: the cut stands (before, such
    a trial was called noise, the rate restored, and the newcomer starved)."""
    t = FakeTime()
    controller = RateController(clock=t.clock, sleep=t.sleep)

    def answers(refused: list[bool]) -> None:
        for r in refused:
            t.now += 0.01
            controller.observe(started=t.now, refused=r)

    answers([False] * 20 + [True] * 4)  # a limit met: watched, then cut
    answers([False] * 150)  # its trial: clean, a real limit
    answers([True])  # a new 429: a cut and a trial
    assert controller.trial is not None and controller.cuts == 2
    held = controller.rate
    t.now += 1.0  # past the echoes of that cut
    answers([False] * 100 + [i % 10 == 0 for i in range(50)])  # 429s only in its last third
    assert controller.trial is None  # judged
    assert controller.noise == 0.0
    assert controller.rate is not None and held is not None
    assert controller.rate < 1.1 * held  # the cut stands
