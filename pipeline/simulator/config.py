"""The simulator's configuration (``SimulatorConfig``), its constants and small helpers
(token counts, the rps schedule, Go-style durations, a token bucket). No I/O."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.batch_service import BatchSimConfig

log = logging.getLogger("pipeline.simulator")

try:  # orjson is optional: about 3x faster serialisation, which matters in benchmarks only
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS = ("gpt-3.5-turbo", "gpt-3.5-turbo-0125", "gpt-3.5-turbo-1106")
ANSWER_PREFIX = "Simulated answer to: "
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
# aimlapi silently drops an X-Client-Request-Id outside this alphabet instead of echoing it.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A directive's items may hold a single "]" (JSON in label= or wrong_kind= never does, but a
# stray one then makes a loud 400 instead of a silently ignored directive).
DIRECTIVE = re.compile(r"\[\[sim:((?:[^\]]|\](?!\]))*)\]\]")
# answer=TEXT: the last item of a directive, running to the last "]]" of its message.
ANSWER_DIRECTIVE = re.compile(r"\[\[sim:(?P<items>[^\]]*?,)?[ \t]*answer=")
# The texts pipeline.structured sends; kept in step with it by tests/test_structured.py.
SCHEMA_PROMPT_MARKER = "Answer with a JSON object that conforms to this JSON Schema:"
LABELS_LINE = re.compile(r"^Labels:[ \t]*(.+?)[ \t]*$", re.MULTILINE)
WRONG_TEXT = "I do not know."
WRONG_JSON_TEXT = "Sorry, I cannot answer that."
WRONG_KINDS = ("invalid", "different")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator behaves. Rates are probabilities in [0, 1], drawn per chat request.

    Fields:
        latency_ms: delay before every chat reply (non-blocking).
        latency_jitter_ms: the delay varies uniformly by up to this much either way (floored at 0).
        rate_429: 429 rate_limit_exceeded with Retry-After ``retry_after_s``.
        retry_after_s: the Retry-After of ``rate_429`` (fractions are sent as such).
        rate_500, rate_503: that server error with an OpenAI body.
        rate_timeout: never answer that request (the connection stays open).
        rate_drop: close the connection without a response.
        rate_malformed: 200 with a truncated JSON body.
        rate_length: finish_reason "length" with the answer cut in half.
        rps_limit: requests/s token bucket (burst: one second's worth); excess gets 429.
        rps_burst: the capacity of that bucket, when not one second's worth.
        rps_schedule: (seconds since the first chat request, requests/s) pairs that change
            the request limit during a run; the first applies from the start.
        tpm_limit: tokens/min token bucket charged with prompt + completion tokens.
        rate_limit_headers: send the x-ratelimit-* headers on chat replies.
        require_api_key: when set, anything but ``Authorization: Bearer <key>`` gets 401.
        seed: seeds the fault and jitter draws; None means a fresh random seed.
        record: keep every chat request in ``Simulator.requests``.
        request_log: append one JSON line per chat request to this path, flushed per line.
        wrong_rate: probability that an answer (each choice) is wrong; see "Answers".
        wrong_kind: ``"invalid"`` (the format rejects it) or ``"different"`` (well-formed,
            not the right answer).
        ignore_n: answer every request with one choice, ignoring ``n`` (see "Samples").
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    rate_malformed: float = 0.0
    rate_length: float = 0.0
    rps_limit: float | None = None
    rps_burst: float | None = None
    rps_schedule: tuple[tuple[float, float], ...] = ()
    tpm_limit: int | None = None
    rate_limit_headers: bool = False
    require_api_key: str | None = None
    seed: int | None = None
    record: bool = True
    request_log: str | None = None
    wrong_rate: float = 0.0
    wrong_kind: str = "invalid"
    ignore_n: bool = False
    batch: BatchSimConfig = field(default_factory=BatchSimConfig)

    def __post_init__(self) -> None:
        for name in (*_RATE_FIELDS, "wrong_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"SimulatorConfig.{name}={value!r} must be a probability in [0, 1]"
                )
        for name, value in (("latency_ms", self.latency_ms), ("retry_after_s", self.retry_after_s)):
            if value < 0:
                raise ValueError(f"SimulatorConfig.{name}={value!r} must be >= 0")
        for at, rate in self.rps_schedule:
            if at < 0 or rate <= 0:
                raise ValueError(
                    f"SimulatorConfig.rps_schedule has ({at!r}, {rate!r}): "
                    "times must be >= 0 and rates > 0"
                )
        limits = (
            ("rps_limit", self.rps_limit),
            ("rps_burst", self.rps_burst),
            ("tpm_limit", self.tpm_limit),
        )
        for name, limit in limits:
            if limit is not None and limit <= 0:
                raise ValueError(f"SimulatorConfig.{name}={limit!r} must be > 0 (or None)")
        if self.wrong_kind not in WRONG_KINDS:
            raise ValueError(
                f"SimulatorConfig.wrong_kind={self.wrong_kind!r} must be one of {WRONG_KINDS}"
            )


# In the order they share one draw per request; see "Random faults" above.
_RATE_FIELDS = (
    "rate_429",
    "rate_500",
    "rate_503",
    "rate_timeout",
    "rate_drop",
    "rate_malformed",
    "rate_length",
)

# A module constant rather than a call in each signature: one shared immutable default.
DEFAULT_CONFIG = SimulatorConfig()


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One chat request as received.

    Fields:
        time: ``time.time()`` at arrival.
        path: the request path without query string.
        headers: request headers, names lower-cased.
        body: the parsed JSON body, or None if it was not a JSON object.
    """

    time: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


def parse_rps_schedule(text: str) -> tuple[tuple[float, float], ...]:
    """``"0:40,10:10,20:40"`` -> ((0, 40), (10, 10), (20, 40)): seconds:requests per second."""
    steps = []
    for item in text.split(","):
        at, sep, rate = item.partition(":")
        try:
            step = (float(at), float(rate))
        except ValueError:
            step = (-1.0, 0.0)
        if not sep or step[0] < 0 or step[1] <= 0:
            raise ValueError(
                f"--rps-schedule {text!r}: {item!r} is not SECONDS:RATE; "
                "write it like 0:40,10:10,20:40"
            )
        steps.append(step)
    return tuple(sorted(steps))


def format_go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String`` at millisecond precision: 250ms, 1.5s, 6m0s."""
    millis = round(seconds * 1000)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def format_seconds(seconds: float) -> str:
    """Whole seconds as an integer string, anything else as a plain decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def count_tokens(text: str) -> int:
    """The simulator's token approximation: whitespace-separated words, at least 1 if non-empty."""
    if not text:
        return 0
    return max(1, len(text.split()))


def message_text(message: Any) -> str:
    """The text of one message: string content, or its text parts joined by a space."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return " ".join(parts)
    return ""


@dataclass(slots=True)
class TokenBucket:
    """A token bucket; the clock is passed in so that one loop time drives all decisions."""

    rate: float  # tokens added per second
    capacity: float
    tokens: float
    updated: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens and return 0, or take nothing and return seconds to wait."""
        self._refill(now)
        if amount <= self.tokens:
            self.tokens -= amount
            return 0.0
        if amount > self.capacity:
            # Can never fit: tell the client to wait for a full bucket, as good as it gets.
            return (self.capacity - self.tokens) / self.rate
        return (amount - self.tokens) / self.rate

    def seconds_to_full(self, now: float) -> float:
        self._refill(now)
        return (self.capacity - self.tokens) / self.rate
