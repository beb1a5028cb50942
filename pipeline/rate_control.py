"""``RateController``: finds and holds a request-rate limit that nobody announces, from 429s
alone, and tells scattered 429s (noise) from overload (see its docstring). ``RateView`` is
what it believes, for progress lines and the summary.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .meters import Clock, RateMeter, Sleep

# requests/s the growth schedule applies to near the rate that got through (additive
# increase), plus the rate itself below FAR_BELOW x it (see RateController._grow)
FAIR_SHARE_FLOOR = 5.0
FAR_BELOW = 0.5
# the highest 429 share a trial after a cut may call noise: beyond it, it is a limit
# (another process on the same limit keeps our share up when we slow down)
NOISE_AFTER_CUT_MAX = 0.1
# past BEYOND x the rate that last got through, still without a 429, the probe doubles
# BEYOND_DOUBLING times as often, up to BEYOND_MAX times the usual most: a limit that went
# up is followed within seconds, while under a steady limit a 429 comes before the rate gets
# that far (tuned in virtual time: 40 -> 10 -> 40 req/s back within 20% in 5 s instead of 7,
# the 429 share at a steady 20 req/s unchanged)
BEYOND = 1.2
BEYOND_DOUBLING = 0.4
BEYOND_MAX = 3.0


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
    first_refused: float | None = None  # when its first 429 came


class _Window:
    """The last ``size`` answers (True: a 429) and how many of them are 429s, kept as they
    come (read at every answer)."""

    def __init__(self, size: int) -> None:
        self.answers: deque[bool] = deque(maxlen=size)
        self.refused = 0

    def add(self, refused: bool) -> None:
        answers = self.answers
        if len(answers) == answers.maxlen and answers[0]:
            self.refused -= 1  # the oldest leaves the window
        answers.append(refused)
        self.refused += refused

    def share(self) -> float:
        return self.refused / len(self.answers)


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


SHORT_WINDOW = 50  # answers: the quick check that 429s are still the noise's share
NOISE_TRACKING = 0.0005  # per answer (~2,000 answers): slow beside the 300-answer window, so
# the window's share outruns the floor it is compared with when a limit brings 429s


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
      come at the same share whatever the rate. After a cut, the answers to requests sent
      after it (``trial_answers`` or ``trial_seconds``, whichever comes first) decide: if the
      share of 429s among them has not fallen (at least 3 and at least ``same_share`` of the
      share before), is at most ``NOISE_AFTER_CUT_MAX`` and began in the trial's first half,
      the cut is undone and that share becomes the noise floor. (Another process on the same
      limit also keeps our share up when we slow down: the cap and the "first half" keep its
      arrival from being taken for noise.) From then on a 429 counts only when the last
      ``SHORT_WINDOW`` answers hold more 429s than the noise explains (3 sigma); a trial
      without any 429 where the noise would have brought three halves the floor. A 429 while
      sending above 1.05 x the rate that last got through needs no trial (probing explains
      it). After a small overshoot the server's bucket is still empty for a moment: answers
      to the next ~4 requests' worth of time after a cut are echoes too, and echoes are kept
      out of the shares.
    - **Probe up, slowly then faster.** Between cuts the rate grows by ``probe`` per second,
      and that growth doubles every ``probe_doubling`` seconds without a cut (capped at
      ``probe_max`` per second): it stays near the rate that worked for a few seconds, and
      follows a limit that went up within seconds; faster still once past 1.2 x the rate
      that last got through without a 429 (see ``BEYOND``). It grows at the slowest
      ``probe`` while a trial runs, never beyond twice the rate requests are actually
      asking to start at. Near the rate that got through the growth is additive (it applies
      to ``FAIR_SHARE_FLOOR`` requests/s whatever the rate): processes sharing a limit gain
      alike and each shared cut takes more from the larger, so their shares converge, as in
      TCP's AIMD (about 15% of the gap closes per cut). Below ``FAR_BELOW`` x that rate
      (after a start-up storm) it applies to the rate too, so the climb back is quick.
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
        self.recent = _Window(window)  # the last answers (echoes left out)
        self.lately = _Window(SHORT_WINDOW)  # the last few of them
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
        if refused:
            self.rate_limited += 1
        else:
            self.accepted.append(now)
            self._trim(self.accepted, now)
        if started < self.settled:
            # an echo of the event that caused the last cut, or a request sent while the
            # server's bucket was still empty from it
            return
        self.recent.add(refused)
        self.lately.add(refused)
        trial = self.trial
        if trial is not None:
            trial.answers += 1
            trial.refused += refused
            if refused and trial.first_refused is None:
                trial.first_refused = now
            if trial.refused >= 3 and trial.refused >= 0.3 * trial.answers:
                self._cut(now, trial.refused / trial.answers, "still refused after slowing down")
            elif trial.answers >= self.trial_answers or now - trial.began >= self.trial_seconds:
                self._judge(now, trial)
            return
        share = self.recent.share()
        if self.noise > 0.0 and share <= 2 * self.noise + 0.02:
            # while the share stays in the noise's range the floor follows it slowly (~2,000
            # answers): a first estimate comes from a small sample. Above the range it holds
            # still, so a limit's 429s cannot drag it up (they are cut instead).
            self.noise += NOISE_TRACKING * (refused - self.noise)
        if refused:
            if self._first_and_scattered(share):
                # watch before slowing down: scattered 429s keep this share at any rate,
                # a limit's climb as we go on (then the trial cuts)
                self.trial = _Trial(self.rate, self.found, share, now, watching=True)
                self._tell("a few scattered 429s: watching before slowing down", force=True)
            elif self.noise == 0.0 or self._beyond_noise_lately():
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
        doubling, most = self.probe_doubling, self.probe_max
        if self.found is not None and self.rate > BEYOND * self.found:
            # past the rate that last got through, and no 429 yet: the limit went up
            doubling, most = doubling * BEYOND_DOUBLING, most * BEYOND_MAX
        growth = min(most, self.probe * 2 ** (quiet / doubling))
        if self.trial is not None:
            growth = self.probe  # while a trial runs, only the slowest probe
        # near the rate that got through, the growth is additive (FAIR_SHARE_FLOOR req/s
        # scaled by the schedule, whatever the rate): processes sharing a limit then gain
        # alike and each cut takes more from the larger, so their shares converge (AIMD).
        # Far below it (after a start-up storm), it grows in proportion to the rate.
        scale = FAIR_SHARE_FLOOR
        if self.found is None or self.rate < FAR_BELOW * self.found:
            scale += self.rate
        self._set_rate(self.rate + scale * math.expm1(growth * elapsed))
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

    def _beyond_noise_lately(self) -> bool:
        """More 429s among the last answers than the noise explains (3 sigma): a limit
        come back, or noise wrongly believed in (a limit shared with another process looks
        like noise to one trial), caught within ``SHORT_WINDOW`` answers."""
        n = len(self.lately.answers)
        if n < SHORT_WINDOW:
            return False
        noise = self.noise
        expected = noise * n
        return self.lately.refused > expected + 3 * math.sqrt(expected * (1 - noise)) + 1

    def _first_and_scattered(self, share: float) -> bool:
        """A first 429 among many answers, before any cut or noise verdict: as likely
        noise as a limit, and slowing down for noise is what costs (a limit answers a
        burst of 429s at once, which is cut at once)."""
        return (
            self.cuts == 0
            and self.noise == 0.0
            and self.rate is None
            and len(self.recent.answers) >= self.watch_after
            and share < self.watch_share
        )

    def _looks_like_noise(self, trial: _Trial, now: float) -> bool:
        share = trial.refused / max(trial.answers, 1)
        # about the same share as before the cut: not fewer (a limit left behind), and not
        # many more either (a limit that just came down)
        # (not fewer counts only after a cut: while watching, fewer 429s say "no limit" too)
        lowest = 0.0 if trial.watching else self.same_share * trial.share_before
        highest = 3 * trial.share_before + 0.05
        if trial.watching:  # nothing was cut: a share above watch_share is a limit's
            highest = min(highest, self.watch_share)
        else:  # after a cut, another process's 429s on a shared limit look alike: a
            # share above NOISE_AFTER_CUT_MAX is not taken for noise
            highest = min(highest, NOISE_AFTER_CUT_MAX)
        # noise comes all along; 429s that all came late in the trial came with something
        # new (another process starting on the same limit)
        first = trial.first_refused
        spread = first is not None and first - trial.began <= 0.5 * (now - trial.began)
        return (
            trial.share_before < 0.3
            and trial.refused >= 3
            and lowest <= share <= highest
            and spread
        )

    def _judge(self, now: float, trial: _Trial) -> None:
        self.trial = None
        share = trial.refused / max(trial.answers, 1)
        if self._looks_like_noise(trial, now):
            # as many 429s at the lower rate: they were not about our rate
            if trial.watching:  # nothing was cut: every recent answer saw the same noise
                share = self.recent.share()
            self.noise = share if self.noise == 0.0 else 0.7 * self.noise + 0.3 * share
            self.found = trial.previous_found
            self._set_rate(trial.previous_rate)
            self._tell(
                f"{share:.0%} of answers are 429 whatever the rate: noise, not a limit", force=True
            )
        elif trial.refused == 0 and trial.answers * self.noise >= 3:
            # no 429 where the noise would have brought three: less noise than believed
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
