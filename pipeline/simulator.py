"""A local OpenAI-compatible chat-completions server for the demo, the tests and the benchmarks.

This module owns the simulator: a small HTTP/1.1 server written directly on
``asyncio.Protocol`` (no web framework, so it is never the bottleneck of a throughput
benchmark), its configuration, its fault injection and its recording of what it received.
It does not own any client code; the pipeline talks to it over real HTTP like to any provider.
Run it with ``SimulatorThread`` (sync tests: a daemon thread with its own loop),
``Simulator.start()`` (inside a running loop) or ``run_simulator`` (blocking, for the CLI).

Endpoints
---------
- ``POST /v1/chat/completions`` and ``POST /chat/completions``: a non-streaming chat completion.
- ``GET /v1/models`` (also ``/models``): a tiny model list. ``GET /health``: ``200 ok``.
- Anything else: 404 with an OpenAI error body.

Answers
-------
Answers are deterministic. The request picks one of four answer modes, first match wins:

- **schema**: ``response_format`` is ``{"type": "json_schema", "json_schema": {"schema": S}}``,
  or ``{"type": "json_object"}`` with a message containing ``SCHEMA_PROMPT_MARKER``
  (``"Answer with a JSON object that conforms to this JSON Schema:"``, the text
  ``pipeline.structured`` sends in prompt mode) followed by the schema as JSON. The answer
  is a JSON object (``json.dumps`` spacing, so it has several "tokens") with every property
  of S: strings ``"x"``, integers and numbers ``1``, booleans ``true``, ``null`` for null,
  enums and ``const`` their first value, arrays one item, objects recursively; ``anyOf`` /
  ``oneOf`` take the first non-null branch, local ``$ref`` is followed, ``minimum`` /
  ``maximum`` / ``minLength`` / ``maxLength`` / ``minItems`` / ``maxItems`` are respected.
- **json_object**: ``{"type": "json_object"}`` without that marker: ``{"answer": "<text>"}``
  where <text> is the text-mode answer.
- **labels**: a system (or developer) message has a line ``Labels: a | b | c`` (the line
  ``pipeline.labels.label_instruction`` ends with). The answer is one label, chosen
  by a hash of the conversation.
- **text**: ``"Simulated answer to: "`` plus the first 200 characters of the last user message
  (string content or its text parts joined by a space).

Samples. With a ``seed`` in the body, a text answer ends in `` (seed S)``, and the label and
schema values are drawn from a hash of the conversation, the seed and the choice index, so K
requests with distinct seeds give distinct samples. With ``n`` the reply has n choices: in
text and json_object modes choice i > 0 ends in `` (choice i)``, in label and schema modes
each choice is its own draw; each choice is billed and cut at the token limit by itself.
Without a seed, choice 0 of a schema answer uses the plain values above. With ``ignore_n``
the simulator behaves like servers that do not implement ``n`` (llama.cpp, some vLLM and
Ollama setups): every reply has exactly one choice, whatever ``n`` asks. The "conversation"
is the messages before the first assistant message, so a re-ask (original messages + the
answer + feedback) is the same conversation as the request it corrects.

Wrong answers. With probability ``wrong_rate`` per choice (a separate draw from the fault
draw, made only when ``wrong_rate > 0`` so seeded fault sequences are unchanged), or when a
``wrong`` directive says so, the answer is wrong, of kind ``wrong_kind``:

- ``invalid`` (default): what the request's format rejects: in schema mode either prose
  (``"Sorry, I cannot answer that."``) or the object without its first required property
  (half each; prose when nothing is required); in labels mode ``"I do not know."``, which
  is no label; in json_object mode that prose.
- ``different``: well-formed but not the right answer: the schema object with other values
  (next enum value, ``"x1"``, ``2``, ``false``, ...), the next label, ``{"answer": "I do not
  know."}``.

In text mode both kinds answer ``"I do not know."``.

Token counting is a documented approximation, not a tokenizer: a text has one token per
whitespace-separated word, and at least 1 if it is non-empty. ``prompt_tokens`` sums that over
the text of every message; ``completion_tokens`` counts the answer of every choice. When
``max_completion_tokens`` / ``max_tokens`` (the smaller, if both) is below the answer's count,
the answer keeps that many words and ``finish_reason`` is ``"length"``.

Order of checks for a chat request: record it; ``401`` if ``require_api_key`` does not match;
``400`` (aimlapi flat body) if the body is not a JSON object with ``model`` and ``messages``
(``400`` too for ``stream: true``, which the simulator does not implement);
``429`` from the request-rate limiter; prompt directives; random faults; the answer; ``429``
from the token limiter. ``latency_ms`` (+ jitter + ``sleep_ms``) delays every chat reply,
errors included. Pipelined requests on one connection are answered in order.

Rate limiting
-------------
``rps_limit`` is a token bucket that refills at ``rps_limit`` requests/s and holds at most
``rps_burst`` (default ``max(1, rps_limit)``, a burst of one second's worth).
``rps_schedule`` changes that rate during a run: ``((0, 40), (10, 10), (20, 40))`` is 40
requests/s from the first chat request, 10 from 10 s after it, 40 again from 20 s (the
bucket keeps its level across a change; the CLI spells it ``--rps-schedule 0:40,10:10,20:40``).
Without ``rate_limit_headers`` such a limit is unannounced: only 429s tell it.
``tpm_limit`` is a token bucket of ``tpm_limit`` tokens refilling at ``tpm_limit / 60`` per
second, charged with prompt + completion tokens of each successful answer (an answer larger
than the whole bucket always gets 429, as on OpenAI). A limited request gets 429
``rate_limit_exceeded`` with ``retry-after`` (whole seconds, rounded up, at least 1) and
``retry-after-ms`` (exact).
With ``rate_limit_headers`` every chat reply carries
``x-ratelimit-{limit,remaining,reset}-requests`` (bucket size, whole tokens left, time until
the bucket is full, as a Go duration like ``250ms``, ``1.5s`` or ``6m0s``; a nominal
``10000/10000/0s`` without ``rps_limit``) and, when ``tpm_limit`` is set, the same trio for
``-tokens``.

Random faults
-------------
Per chat request one number ``u`` is drawn from ``random.Random(seed)``; the fault rates are
laid end to end in this order and the first interval containing ``u`` fires: ``rate_429``,
``rate_500``, ``rate_503``, ``rate_timeout``, ``rate_drop``, ``rate_malformed``,
``rate_length``. So each rate is exact as long as their sum is at most 1.

Prompt directives
-----------------
Any message text may carry ``[[sim:ITEM,ITEM,...]]``; an ITEM is ``key=value`` or a bare flag.
Several directives in one request merge, later keys win. An unknown key or a bad value
answers 400 with a message naming it, so a typo in a test never passes silently.

Faults (at most one per request)::

    status=S            answer HTTP S (400..599) with an OpenAI error body
                        (400 invalid_request_error, 401 invalid_api_key, 429 rate_limit_exceeded,
                        5xx server_error, ...)
    context_length      400 (or status=S) with code context_length_exceeded, param messages
    aimlapi_status=S    answer HTTP S with the aimlapi flat body
                        {"message", "path", "requestId", "statusCode": S, "timestamp"}
                        (403 says "out of credits")
    quota               429 insufficient_quota (OpenAI body), no Retry-After
    timeout             never answer; the connection stays open until the client leaves
    drop                close the connection without a response
    malformed           200 whose JSON body is cut in half

Modifiers::

    fail=N              only the first N requests carrying the same prompt (all message texts
                        together) get the fault; later ones succeed. Alone it means status=503.
    retry_after=SECS    add Retry-After: SECS and retry-after-ms to the error
    retry_after_date=1  send Retry-After as an HTTP date instead, and no retry-after-ms
                        (which clients would prefer); needs retry_after
    sleep_ms=N          add N ms of latency to this request
    length              answer normally but cut it in half with finish_reason "length"

Answers (see "Answers" above)::

    label=X             the right answer is exactly X (X cannot contain a comma)
    answer=TEXT         the right answer is exactly TEXT, which may hold commas, braces and
                        brackets: it must be the last item of the last directive in its
                        message and runs to the last "]]" of that message
                        (``[[sim:answer={"tags": ["a", "b"]}]]`` answers that JSON)
    wrong               every answer to this conversation is wrong
    wrong=N             the first N answers to this conversation are wrong (re-asks count
                        as the same conversation, so wrong=1 then a re-ask gets it right)
    wrong_kind=K        invalid | different: overrides the config's wrong_kind

Examples: ``[[sim:status=400]]``, ``[[sim:aimlapi_status=403]]``, ``[[sim:quota]]``,
``[[sim:fail=2,status=429,retry_after=1]]``, ``[[sim:fail=1,drop]]``, ``[[sim:sleep_ms=300]]``,
``[[sim:label=positive]]``, ``[[sim:wrong=1,wrong_kind=different,label=negative]]``.

Statistics
----------
``Simulator.stats`` counts ``connections`` (TCP connections accepted), ``http_requests``
(every request), ``requests`` (chat requests), and outcomes of chat requests: ``ok`` (a
well-formed 200 completion), ``length`` (those of them cut short), ``wrong`` (wrong choices
in them), ``timeout``, ``drop``, ``malformed``, and one key per error status, e.g.
``"429"``, ``"503"`` (unknown paths count as ``"404"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import math
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import IO, Any, cast

from pipeline.batch_service import DROPPED, BatchService, BatchSimConfig

__all__ = [
    "RecordedRequest",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
    "format_go_duration",
    "run_simulator",
]

log = logging.getLogger(__name__)

try:  # orjson is optional: about 3x faster serialisation, which matters in benchmarks only
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    _loads = json.loads


CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS = ("gpt-3.5-turbo", "gpt-3.5-turbo-0125", "gpt-3.5-turbo-1106")
ANSWER_PREFIX = "Simulated answer to: "
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 32 * 1024 * 1024
# aimlapi silently drops an X-Client-Request-Id outside this alphabet instead of echoing it.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A directive's items may hold a single "]" (JSON in label= or wrong_kind= never does, but a
# stray one then makes a loud 400 instead of a silently ignored directive).
_DIRECTIVE = re.compile(r"\[\[sim:((?:[^\]]|\](?!\]))*)\]\]")
# answer=TEXT: the last item of a directive, running to the last "]]" of its message.
_ANSWER_DIRECTIVE = re.compile(r"\[\[sim:(?P<items>[^\]]*?,)?[ \t]*answer=")
# The texts pipeline.structured sends; kept in step with it by tests/test_structured.py.
SCHEMA_PROMPT_MARKER = "Answer with a JSON object that conforms to this JSON Schema:"
_LABELS_LINE = re.compile(r"^Labels:[ \t]*(.+?)[ \t]*$", re.MULTILINE)
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


def _format_seconds(seconds: float) -> str:
    """Whole seconds as an integer string, anything else as a plain decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _count_tokens(text: str) -> int:
    """The simulator's token approximation: whitespace-separated words, at least 1 if non-empty."""
    if not text:
        return 0
    return max(1, len(text.split()))


def _message_text(message: Any) -> str:
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
class _TokenBucket:
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


class _DirectiveError(ValueError):
    """A ``[[sim:...]]`` directive that the simulator cannot obey."""


@dataclass(frozen=True, slots=True)
class _Directive:
    """The merged ``[[sim:...]]`` items of one request."""

    fault: str | None = None  # status | aimlapi | quota | timeout | drop | malformed
    status: int = 503
    context_length: bool = False
    fail: int | None = None
    retry_after: float | None = None
    retry_after_date: bool = False
    sleep_ms: float = 0.0
    length: bool = False
    answer: str | None = None  # label=X or answer=TEXT
    wrong: bool = False
    wrong_first: int | None = None  # wrong=N; None with wrong=True: every answer
    wrong_kind: str | None = None


def _status_value(key: str, value: str) -> int:
    try:
        status = int(value)
    except ValueError:
        raise _DirectiveError(f"{key}={value!r} is not an integer status") from None
    if not 400 <= status <= 599:
        raise _DirectiveError(f"{key}={status} must be an error status in 400..599")
    return status


def _number_value(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _DirectiveError(f"{key}={value!r} is not a number") from None
    if not number >= 0:
        raise _DirectiveError(f"{key}={value!r} must be >= 0")
    return number


def _parse_directives(texts: list[str]) -> _Directive | None:
    """Merge every ``[[sim:...]]`` found in ``texts``; None if there is none."""
    items: dict[str, str] = {}

    def add_items(content: str) -> None:
        for raw_item in content.split(","):
            key, _, value = raw_item.strip().partition("=")
            if key:
                items[key.strip()] = value.strip()

    for text in texts:
        if "[[sim:" not in text:
            continue
        answer: str | None = None
        found = _ANSWER_DIRECTIVE.search(text)
        end = text.rfind("]]")
        if found is not None and end >= found.end():
            answer = text[found.end() : end]
            text = text[: found.start()]  # directives before it; its own items follow
        for match in _DIRECTIVE.finditer(text):
            add_items(match.group(1))
        if answer is not None and found is not None:
            add_items(found.group("items") or "")
            items["answer"] = answer  # verbatim: surrounding spaces are part of the answer
    if not items:
        return None

    fault: str | None = None
    status = 503
    faults: list[str] = []
    fields: dict[str, Any] = {}
    for key, value in items.items():
        if key == "status":
            status = _status_value(key, value)
            faults.append("status")
        elif key == "aimlapi_status":
            status = _status_value(key, value)
            faults.append("aimlapi")
        elif key in ("quota", "timeout", "drop", "malformed"):
            faults.append(key)
        elif key == "context_length":
            fields["context_length"] = True
        elif key == "length":
            fields["length"] = True
        elif key == "fail":
            fields["fail"] = int(_number_value(key, value))
        elif key == "retry_after":
            fields["retry_after"] = _number_value(key, value)
        elif key == "retry_after_date":
            fields["retry_after_date"] = value not in ("", "0", "false")
        elif key == "sleep_ms":
            fields["sleep_ms"] = _number_value(key, value)
        elif key == "label":
            if not value:
                raise _DirectiveError("label= needs a value, e.g. label=positive")
            fields["answer"] = value
        elif key == "answer":
            fields["answer"] = value
        elif key == "wrong":
            fields["wrong"] = True
            if value:
                fields["wrong_first"] = int(_number_value(key, value))
        elif key == "wrong_kind":
            if value not in WRONG_KINDS:
                raise _DirectiveError(f"wrong_kind={value!r} must be one of {WRONG_KINDS}")
            fields["wrong_kind"] = value
        else:
            raise _DirectiveError(f"unknown key {key!r}")
    if "label" in items and "answer" in items:
        raise _DirectiveError("conflicting answers label= and answer=; use one")
    if len(faults) > 1:
        raise _DirectiveError(f"conflicting faults {faults}; use one per request")
    if fields.get("context_length") and not faults:
        faults.append("status")
        status = 400 if "status" not in items else status
    if faults:
        fault = faults[0]
    elif "fail" in fields:
        fault = "status"  # fail=N alone: the first N attempts get a 503
    if fields.get("retry_after_date") and "retry_after" not in fields:
        raise _DirectiveError("retry_after_date needs retry_after=SECONDS")
    return _Directive(fault=fault, status=status, **fields)


# OpenAI error (type, code, message) by status; other 4xx/5xx fall back by class.
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Simulated invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", None, "The requested resource does not exist."),
    429: (
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
_AIMLAPI_MESSAGES = {
    400: "Body validation error!",
    401: "Unauthorized: the API key is missing, expired or invalid.",
    403: "You are out of credits. Please top up your balance to continue.",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal server error. Please try again later.",
}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _openai_error_body(
    status: int,
    message: str | None = None,
    *,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    default_type, default_code, default_message = _OPENAI_ERRORS.get(
        status,
        (
            "server_error" if status >= 500 else "invalid_request_error",
            None,
            f"Simulated {status} {_reason(status)}.",
        ),
    )
    error = {
        "message": message or default_message,
        "type": error_type or default_type,
        "param": param,
        "code": code if code is not None else default_code,
    }
    return _dumps({"error": error})


def _aimlapi_error_body(status: int, path: str, message: str | None = None) -> bytes:
    return _dumps(
        {
            "message": message or _AIMLAPI_MESSAGES.get(status, _reason(status)),
            "path": path,
            "requestId": str(uuid.uuid4()),
            "statusCode": status,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )


def _http_response(
    status: int,
    body: bytes,
    headers: list[tuple[str, str]],
    *,
    keep_alive: bool,
    content_type: str = "application/json",
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_reason(status)}",
        f"content-type: {content_type}",
        f"content-length: {len(body)}",
    ]
    if not keep_alive:
        lines.append("connection: close")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# What a connection does with a reply when its turn comes.
_WRITE, _DROP, _STALL = 0, 1, 2


@dataclass(slots=True)
class _Reply:
    ready_at: float  # loop time
    action: int
    data: bytes = b""
    close: bool = False


class Simulator:
    """The simulator server. Start it on a running loop; all state lives on that loop.

    Attributes:
        config: the current behaviour; may be replaced at any time (read per request).
        requests: chat requests received, in arrival order (when ``config.record``).
        stats: counters, see the module docstring; missing keys read as 0.
    """

    def __init__(self, config: SimulatorConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self.requests: list[RecordedRequest] = []
        self.stats: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()  # fail=N bookkeeping per distinct prompt
        self._wrong_counts: Counter[str] = Counter()  # wrong=N bookkeeping per conversation
        self._rng = random.Random(config.seed)
        self._rps_bucket: _TokenBucket | None = None
        self._tpm_bucket: _TokenBucket | None = None
        self._first_chat: float | None = None  # loop time of the first chat request
        self._sequence = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()
        self._log_file: IO[str] | None = None
        self._log_path: str | None = None
        self.batches = BatchService(self.answer_chat, time.time, config.batch)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the bound port."""
        if self._server is not None:
            raise RuntimeError("Simulator is already started")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stop listening, cut every open connection and close the request log."""
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.abort()
            await self._server.wait_closed()
            self._server = None
            await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            self._log_path = None

    def reset(self) -> None:
        """Forget requests, stats, fail=N / wrong=N counters and limiter state; re-seed."""
        self.requests.clear()
        self.stats.clear()
        self._attempts.clear()
        self._wrong_counts.clear()
        self._rps_bucket = None
        self._tpm_bucket = None
        self._first_chat = None
        self._rng = random.Random(self.config.seed)
        self.batches = BatchService(self.answer_chat, time.time, self.config.batch)

    # -- request handling -------------------------------------------------------------------

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> _Reply:
        """Decide the reply to one parsed request (called by the connection, on the loop)."""
        self.stats["http_requests"] += 1
        assert self._loop is not None
        now = self._loop.time()
        target, path = path, path.split("?", 1)[0]
        config = self.config
        if config.request_log and not (path in CHAT_PATHS and method == "POST"):
            self._write_log(config.request_log, time.time(), None, None, method, path)
        self.batches.config = config.batch
        batch_reply = self.batches.handle(method, target, headers, body)
        if batch_reply is not None:
            status, reply_headers, payload = batch_reply
            if batch_reply == DROPPED:
                return _Reply(now, _DROP, b"", True)
            content_type = dict(reply_headers).get("content-type", "application/json")
            extra = [(k, v) for k, v in reply_headers if k != "content-type"]
            data = _http_response(
                status, payload, extra, keep_alive=keep_alive, content_type=content_type
            )
            return _Reply(now, _WRITE, data, not keep_alive)
        if path in CHAT_PATHS and method == "POST":
            return self._chat(path, headers, body, keep_alive, now)
        if method == "GET" and path == "/health":
            data = _http_response(200, b"ok", [], keep_alive=keep_alive, content_type="text/plain")
            return _Reply(now, _WRITE, data, not keep_alive)
        if method == "GET" and path in ("/v1/models", "/models"):
            models = {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 1677610602, "owned_by": "simulator"}
                    for name in MODELS
                ],
            }
            data = _http_response(200, _dumps(models), [], keep_alive=keep_alive)
            return _Reply(now, _WRITE, data, not keep_alive)
        self.stats["404"] += 1
        body_bytes = _openai_error_body(404, f"Invalid URL ({method} {path})")
        data = _http_response(404, body_bytes, [], keep_alive=keep_alive)
        return _Reply(now, _WRITE, data, not keep_alive)

    def _chat(
        self, path: str, headers: dict[str, str], raw: bytes, keep_alive: bool, now: float
    ) -> _Reply:
        config = self.config
        stats = self.stats
        stats["requests"] += 1
        self._sequence += 1
        sequence = self._sequence
        wall_time = time.time()

        body: dict[str, Any] | None
        try:
            parsed = _loads(raw)
            body = parsed if isinstance(parsed, dict) else None
        except ValueError:
            body = None
        client_request_id = headers.get("x-client-request-id")
        if config.record:
            self.requests.append(RecordedRequest(wall_time, path, headers, body))
        if config.request_log:
            self._write_log(config.request_log, wall_time, body, client_request_id, "POST", path)

        reply_headers = [("x-inference-id", f"sim-inference-{sequence}")]
        if client_request_id and _CLIENT_REQUEST_ID.fullmatch(client_request_id):
            reply_headers.append(("x-client-request-id", client_request_id))

        # Always one draw (two with jitter) per request, so a seed replays the same faults.
        roll = self._rng.random()
        delay_ms = config.latency_ms
        if config.latency_jitter_ms:
            delay_ms += self._rng.uniform(-config.latency_jitter_ms, config.latency_jitter_ms)

        def reply(
            status: int, payload: bytes, action: int = _WRITE, outcome: str | None = None
        ) -> _Reply:
            if config.rate_limit_headers:
                reply_headers.extend(self._rate_limit_headers(config, now))
            stats[outcome or ("ok" if status == 200 else str(status))] += 1
            data = _http_response(status, payload, reply_headers, keep_alive=keep_alive)
            return _Reply(now + max(0.0, delay_ms) / 1000, action, data, not keep_alive)

        def retry_after(seconds: float, *, as_date: bool = False, round_up: bool = False) -> None:
            if as_date:
                # Rounded up: an HTTP date has whole seconds and must not promise too early.
                value = email.utils.formatdate(math.ceil(wall_time + seconds), usegmt=True)
                reply_headers.append(("retry-after", value))
                return  # no retry-after-ms, which clients prefer, so the date form gets exercised
            value = str(max(1, math.ceil(seconds))) if round_up else _format_seconds(seconds)
            reply_headers.append(("retry-after", value))
            reply_headers.append(("retry-after-ms", _format_seconds(round(seconds * 1000, 3))))

        expected_auth = config.require_api_key
        if expected_auth is not None and headers.get("authorization") != f"Bearer {expected_auth}":
            message = (
                "You didn't provide an API key."
                if "authorization" not in headers
                else "Incorrect API key provided."
            )
            return reply(401, _openai_error_body(401, message))

        problem = _validation_problem(body)
        if problem is not None or body is None:
            return reply(400, _aimlapi_error_body(400, path, f"Body validation error! {problem}"))
        if body.get("stream") is True:
            message = "The simulator does not implement streaming; send stream=false."
            return reply(400, _openai_error_body(400, message, param="stream"))

        if self._first_chat is None:
            self._first_chat = now
        rps_limit = self._rps_limit(now)
        if rps_limit is not None:
            wait = self._rps(rps_limit, now).take(1, now)
            if wait > 0:
                retry_after(wait, round_up=True)
                message = (
                    f"Rate limit reached for requests per second: limit {rps_limit:g}. "
                    f"Please try again in {format_go_duration(wait)}."
                )
                return reply(429, _openai_error_body(429, message))

        messages: list[Any] = body["messages"]
        texts = [_message_text(message) for message in messages]
        try:
            directive = _parse_directives(texts)
        except _DirectiveError as exc:
            return reply(400, _openai_error_body(400, f"simulator directive: {exc}"))

        force_length = False
        if directive is not None:
            delay_ms += directive.sleep_ms
            force_length = directive.length
            fault = directive.fault
            if fault is not None and directive.fail is not None:
                prompt_key = "\x00".join(texts)
                self._attempts[prompt_key] += 1
                if self._attempts[prompt_key] > directive.fail:
                    fault = None
            if fault is not None:
                if directive.retry_after is not None:
                    retry_after(directive.retry_after, as_date=directive.retry_after_date)
                return self._directive_fault(directive, fault, path, reply)

        # Random faults: the rates laid end to end on one draw (see module docstring).
        threshold = config.rate_429
        if roll < threshold:
            retry_after(config.retry_after_s)
            return reply(429, _openai_error_body(429))
        threshold += config.rate_500
        if roll < threshold:
            return reply(500, _openai_error_body(500))
        threshold += config.rate_503
        if roll < threshold:
            return reply(503, _openai_error_body(503))
        threshold += config.rate_timeout
        if roll < threshold:
            return reply(200, b"", _STALL, "timeout")
        threshold += config.rate_drop
        if roll < threshold:
            return reply(200, b"", _DROP, "drop")
        threshold += config.rate_malformed
        malformed = roll < threshold
        threshold += config.rate_length
        force_length = force_length or (not malformed and roll < threshold)

        answers = self._answers(body, messages, texts, directive)
        completion, total_tokens = _completion(
            body, texts, answers, sequence, wall_time, force_length
        )

        if config.tpm_limit is not None:
            wait = self._tpm(config.tpm_limit, now).take(total_tokens, now)
            if wait > 0:
                retry_after(wait, round_up=True)
                message = (
                    f"Rate limit reached for tokens per min (TPM): limit {config.tpm_limit}, "
                    f"requested {total_tokens}. Please try again in {format_go_duration(wait)}."
                )
                return reply(429, _openai_error_body(429, message))

        payload = _dumps(completion)
        if malformed:
            # Any strict prefix of a JSON object is invalid JSON, yet the HTTP framing is valid.
            return reply(200, payload[: len(payload) // 2], _WRITE, "malformed")
        if completion["choices"][0]["finish_reason"] == "length":
            stats["length"] += 1
        return reply(200, payload)

    def answer_chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A batch line's answer: the online answer, without transport faults, limits or delay.

        Directive faults that are HTTP statuses (``status=S``, ``quota``, ``context_length``)
        answer that status and OpenAI error body; the transport ones (timeout, drop,
        malformed) cannot happen inside a batch and are ignored.
        """
        problem = _validation_problem(body)
        if problem is not None:
            return 400, _loads(_openai_error_body(400, f"Body validation error! {problem}"))
        messages: list[Any] = body["messages"]
        texts = [_message_text(message) for message in messages]
        try:
            directive = _parse_directives(texts)
        except _DirectiveError as exc:
            return 400, _loads(_openai_error_body(400, f"simulator directive: {exc}"))
        if directive is not None and directive.fault in ("status", "aimlapi", "quota"):
            replies: list[tuple[int, bytes]] = []

            def capture(status: int, payload: bytes, *_: Any, **__: Any) -> _Reply:
                replies.append((status, payload))
                return _Reply(0.0, _WRITE)

            self._directive_fault(directive, directive.fault, "/v1/chat/completions", capture)
            status, payload = replies[0]
            return status, _loads(payload)
        self._sequence += 1
        answers = self._answers(body, messages, texts, directive)
        length = directive is not None and directive.length
        completion, _ = _completion(body, texts, answers, self._sequence, time.time(), length)
        return 200, completion

    def _answers(
        self,
        body: dict[str, Any],
        messages: list[Any],
        texts: list[str],
        directive: _Directive | None,
    ) -> list[str]:
        """The content of each choice: right, or wrong as the config and directives say."""
        config = self.config
        mode = _answer_mode(body, messages, texts)
        choices = 1 if config.ignore_n else int(body.get("n") or 1)
        if mode is _TEXT_MODE and directive is None and config.wrong_rate == 0:
            # The hot path of throughput benchmarks: no hashing.
            source, seed = _last_user_text(messages, texts), body.get("seed")
            return [_right_answer(mode, None, source, seed, 0, c)[0] for c in range(choices)]

        conversation = _conversation_key(messages, texts)
        seed = body.get("seed")
        fixed = directive.answer if directive is not None else None
        kind = (directive.wrong_kind if directive is not None else None) or config.wrong_kind
        forced = False
        prose = False
        if directive is not None and directive.wrong:
            self._wrong_counts[conversation] += 1
            count = self._wrong_counts[conversation]
            forced = directive.wrong_first is None or count <= directive.wrong_first
            prose = count % 2 == 1
        source = _last_user_text(messages, texts)
        answers = []
        for choice in range(choices):
            draw = _draw(conversation, seed, choice)
            answer, variant = _right_answer(mode, fixed, source, seed, draw, choice)
            wrong, choice_prose = forced, prose
            if config.wrong_rate > 0:
                roll = self._rng.random()  # drawn for every choice, so a seed replays
                if not wrong and roll < config.wrong_rate:
                    wrong, choice_prose = True, roll < config.wrong_rate / 2
            if wrong:
                answer = _wrong_answer(mode, kind, answer, variant, choice_prose)
                self.stats["wrong"] += 1
            answers.append(answer)
        return answers

    def _directive_fault(
        self, directive: _Directive, fault: str, path: str, reply: Callable[..., _Reply]
    ) -> _Reply:
        status = directive.status
        if fault == "status":
            if directive.context_length:
                message = (
                    "This model's maximum context length is 16385 tokens. However, your "
                    "messages resulted in more tokens. Please reduce the length of the messages."
                )
                body = _openai_error_body(
                    status, message, code="context_length_exceeded", param="messages"
                )
            else:
                body = _openai_error_body(status)
            return reply(status, body)
        if fault == "aimlapi":
            return reply(status, _aimlapi_error_body(status, path))
        if fault == "quota":
            body = _openai_error_body(
                429, _QUOTA_MESSAGE, error_type="insufficient_quota", code="insufficient_quota"
            )
            return reply(429, body)
        if fault == "timeout":
            return reply(200, b"", _STALL, "timeout")
        if fault == "drop":
            return reply(200, b"", _DROP, "drop")
        data = b'{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"ind'
        return reply(200, data, _WRITE, "malformed")

    def _rps_limit(self, now: float) -> float | None:
        """The request limit in force: the schedule's latest step, else ``rps_limit``."""
        config = self.config
        limit = config.rps_limit
        since = now - (self._first_chat if self._first_chat is not None else now)
        for at, rate in config.rps_schedule:
            if since >= at:
                limit = rate
        return limit

    def _rps(self, limit: float, now: float) -> _TokenBucket:
        bucket = self._rps_bucket
        capacity = self.config.rps_burst or max(1.0, limit)
        if bucket is None:
            bucket = self._rps_bucket = _TokenBucket(limit, capacity, capacity, now)
        elif bucket.rate != limit or bucket.capacity != capacity:
            bucket._refill(now)  # what the old rate earned until now, then the new rate
            bucket.rate, bucket.capacity = limit, capacity
            bucket.tokens = min(bucket.tokens, capacity)
        return bucket

    def _tpm(self, limit: int, now: float) -> _TokenBucket:
        bucket = self._tpm_bucket
        if bucket is None or bucket.capacity != limit:
            bucket = self._tpm_bucket = _TokenBucket(limit / 60, limit, limit, now)
        return bucket

    def _rate_limit_headers(self, config: SimulatorConfig, now: float) -> list[tuple[str, str]]:
        rps_limit = self._rps_limit(now)
        if rps_limit is not None:
            bucket = self._rps(rps_limit, now)
            reset = bucket.seconds_to_full(now)
            limit, remaining = int(bucket.capacity), int(bucket.tokens)
        else:
            # Nothing is enforced; report a nominal, never-draining limit.
            limit, remaining, reset = 10000, 10000, 0.0
        headers = [
            ("x-ratelimit-limit-requests", str(limit)),
            ("x-ratelimit-remaining-requests", str(remaining)),
            ("x-ratelimit-reset-requests", format_go_duration(reset)),
        ]
        if config.tpm_limit is not None:
            tokens = self._tpm(config.tpm_limit, now)
            headers += [
                ("x-ratelimit-limit-tokens", str(config.tpm_limit)),
                ("x-ratelimit-remaining-tokens", str(int(tokens.tokens))),
                ("x-ratelimit-reset-tokens", format_go_duration(tokens.seconds_to_full(now))),
            ]
        return headers

    def _write_log(
        self,
        path: str,
        wall_time: float,
        body: dict[str, Any] | None,
        client_id: str | None,
        method: str,
        request_path: str,
    ) -> None:
        if self._log_path != path:
            if self._log_file is not None:
                self._log_file.close()
            self._log_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
            self._log_path = path
        assert self._log_file is not None
        record = {"t": wall_time, "method": method, "path": request_path, "body": body}
        line = _dumps(record | {"client_request_id": client_id})
        # Flushed per line: tests tail this file from another process while the run is live.
        self._log_file.write(line.decode() + "\n")
        self._log_file.flush()


def _last_user_text(messages: list[Any], texts: list[str]) -> str:
    """The text a plain answer quotes: the last user message (else the last message)."""
    for message, text in zip(reversed(messages), reversed(texts), strict=True):
        if isinstance(message, dict) and message.get("role") == "user":
            return text
    return texts[-1]


def _validation_problem(body: dict[str, Any] | None) -> str | None:
    """What makes ``body`` an invalid chat request, in aimlapi's words; None if it is fine."""
    if body is None:
        return "Expected a JSON object body."
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "'model': Required (expected a non-empty string)."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages': Required (expected a non-empty array)."
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"'messages[{index}]': Expected an object with a 'role'."
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 1
        ):
            return f"'{name}': Expected a number >= 1, received {value!r}."
    return None


@dataclass(frozen=True, slots=True)
class _AnswerMode:
    """How a request wants its answer: ``kind`` is text | json_object | schema | labels."""

    kind: str
    schema: dict[str, Any] | None = None
    labels: tuple[str, ...] = ()


_TEXT_MODE = _AnswerMode("text")
_JSON_OBJECT_MODE = _AnswerMode("json_object")


def _prompt_schema(text: str) -> dict[str, Any] | None:
    """The JSON Schema stated after ``SCHEMA_PROMPT_MARKER`` in ``text``, if any."""
    at = text.find(SCHEMA_PROMPT_MARKER)
    if at < 0:
        return None
    start = at + len(SCHEMA_PROMPT_MARKER)
    while start < len(text) and text[start].isspace():
        start += 1
    try:
        schema, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return schema if isinstance(schema, dict) else None


def _answer_mode(body: dict[str, Any], messages: list[Any], texts: list[str]) -> _AnswerMode:
    """The answer mode of a request; see "Answers" in the module docstring."""
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        assert isinstance(response_format, dict)
        block = response_format.get("json_schema")
        schema = block.get("schema") if isinstance(block, dict) else None
        return _AnswerMode("schema", schema if isinstance(schema, dict) else {})
    if kind == "json_object":
        for text in texts:
            stated = _prompt_schema(text)
            if stated is not None:
                return _AnswerMode("schema", stated)
        return _JSON_OBJECT_MODE
    for message, text in zip(messages, texts, strict=True):
        if "Labels:" in text and message.get("role") in ("system", "developer"):
            line = _LABELS_LINE.search(text)
            if line is not None:
                labels = tuple(label.strip() for label in line.group(1).split("|"))
                labels = tuple(label for label in labels if label)
                if labels:
                    return _AnswerMode("labels", labels=labels)
    return _TEXT_MODE


def _draw(*parts: object) -> int:
    """A stable 64-bit hash of ``parts`` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


_MAX_EXAMPLE_DEPTH = 8


def _resolve_ref(root: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _example(schema: Any, variant: int, root: dict[str, Any], depth: int = 0) -> Any:
    """A plausible value for ``schema``; variant 0 is the plain one ("x", 1, true, first enum)."""
    if not isinstance(schema, dict) or depth > _MAX_EXAMPLE_DEPTH:
        return "x" if variant == 0 else f"x{variant}"
    if isinstance(schema.get("$ref"), str):
        target = _resolve_ref(root, schema["$ref"])
        return _example(target, variant, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[variant % len(enum)]
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword)
        if isinstance(branches, list) and branches:
            usable = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            return _example((usable or branches)[0], variant, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for branch in schema["allOf"]:
            if isinstance(branch, dict):
                merged.update(branch)
        rest = {key: value for key, value in schema.items() if key != "allOf"}
        return _example({**merged, **rest}, variant, root, depth + 1)

    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), "null")
    if declared is None:
        declared = (
            "object" if "properties" in schema else "array" if "items" in schema else "string"
        )
    if declared == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        value = {name: _example(sub, variant, root, depth + 1) for name, sub in properties.items()}
        for name in schema.get("required", []):
            value.setdefault(name, "x")
        return value
    if declared == "array":
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [_example(sub, variant, root, depth + 1) for sub in prefix]
        count = max(1, int(schema.get("minItems", 1)))
        count = min(count, int(schema.get("maxItems", count)))
        return [_example(schema.get("items"), variant, root, depth + 1)] * count
    if declared in ("integer", "number"):
        number = 1 + variant
        if isinstance(schema.get("minimum"), int | float):
            number = max(number, math.ceil(schema["minimum"]))
        if isinstance(schema.get("exclusiveMinimum"), int | float):
            number = max(number, math.floor(schema["exclusiveMinimum"]) + 1)
        if isinstance(schema.get("maximum"), int | float):
            number = min(number, math.floor(schema["maximum"]))
        if isinstance(schema.get("exclusiveMaximum"), int | float):
            number = min(number, math.ceil(schema["exclusiveMaximum"]) - 1)
        return number
    if declared == "boolean":
        return variant % 2 == 0
    if declared == "null":
        return None
    formats = {"date": "2024-01-01", "date-time": "2024-01-01T00:00:00Z", "email": "x@example.com"}
    text = formats.get(schema.get("format", ""), "x" if variant == 0 else f"x{variant}")
    min_length = int(schema.get("minLength", 0))
    text = text.ljust(min_length, "x")
    if isinstance(schema.get("maxLength"), int):
        text = text[: schema["maxLength"]]
    return text


def _json_text(value: Any) -> str:
    # Spaced like json.dumps: a JSON answer is several "tokens", so the token limit cuts it.
    return json.dumps(value, ensure_ascii=False)


def _right_answer(
    mode: _AnswerMode, fixed: str | None, source: str, seed: Any, draw: int, choice: int
) -> tuple[str, int]:
    """The right answer of one choice, and the schema variant it used."""
    variant = 0 if seed is None and choice == 0 else 1 + draw % 997
    if fixed is not None:
        return fixed, 0
    if mode.kind == "labels":
        return mode.labels[draw % len(mode.labels)], 0
    if mode.kind == "schema":
        assert mode.schema is not None
        return _json_text(_example(mode.schema, variant, mode.schema)), variant
    text = ANSWER_PREFIX + source[:200]
    if seed is not None:
        text += f" (seed {seed})"
    if choice:
        text += f" (choice {choice})"
    if mode.kind == "json_object":
        return _dumps({"answer": text}).decode(), 0
    return text, 0


def _wrong_answer(mode: _AnswerMode, kind: str, right: str, variant: int, prose: bool) -> str:
    """A wrong answer of ``kind`` (invalid | different) in place of ``right``."""
    if mode.kind == "labels":
        if kind == "invalid":
            return WRONG_TEXT
        labels = mode.labels
        index = labels.index(right) if right in labels else -1
        return labels[(index + 1) % len(labels)]
    if mode.kind == "schema":
        assert mode.schema is not None
        if kind == "different":
            return _json_text(_example(mode.schema, variant + 1, mode.schema))
        required = [name for name in mode.schema.get("required", []) if isinstance(name, str)]
        value = _example(mode.schema, variant, mode.schema)
        if prose or not required or not isinstance(value, dict):
            return WRONG_JSON_TEXT
        value.pop(required[0], None)
        return _json_text(value)
    if mode.kind == "json_object":
        return WRONG_JSON_TEXT if kind == "invalid" else _dumps({"answer": WRONG_TEXT}).decode()
    return WRONG_TEXT


def _conversation_key(messages: list[Any], texts: list[str]) -> str:
    """The messages before the first assistant message: a re-ask's original request."""
    original: list[str] = []
    for message, text in zip(messages, texts, strict=True):
        if isinstance(message, dict) and message.get("role") == "assistant":
            break
        original.append(text)
    return "\x00".join(original)


def _completion(
    body: dict[str, Any],
    texts: list[str],
    answers: list[str],
    sequence: int,
    wall_time: float,
    force_length: bool,
) -> tuple[dict[str, Any], int]:
    """The 200 body for a valid request (one choice per answer) and its token total."""
    limits = [int(body[name]) for name in ("max_tokens", "max_completion_tokens") if body.get(name)]
    base_limit = min(limits) if limits else None
    choices = []
    completion_tokens = 0
    for index, answer in enumerate(answers):
        finish_reason = "stop"
        tokens = _count_tokens(answer)
        limit = base_limit
        if force_length:
            limit = min(limit or tokens, max(1, tokens // 2))
        if limit is not None and tokens > limit:
            answer = " ".join(answer.split()[:limit])
            tokens = _count_tokens(answer)
            finish_reason = "length"
        completion_tokens += tokens
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        )
    prompt_tokens = sum(_count_tokens(text) for text in texts)
    total_tokens = prompt_tokens + completion_tokens
    completion = {
        "id": f"chatcmpl-sim-{sequence}",
        "object": "chat.completion",
        "created": int(wall_time),
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    return completion, total_tokens


class _Connection(asyncio.Protocol):
    """One client connection: parses HTTP/1.1 requests and writes their replies in order.

    Replies wait in a queue so that a delayed reply never overtakes an earlier one
    (pipelining); a timer, not a task per request, releases the head when it is due,
    which keeps the zero-latency path free of any scheduling.
    """

    def __init__(self, simulator: Simulator) -> None:
        self._simulator = simulator
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: tuple[str, str, dict[str, str], int, bool] | None = None
        self._continue_sent = False
        self._replies: deque[_Reply] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._reading = True  # False once a reply that closes the connection is queued
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._simulator._connections.add(self)
        self._simulator.stats["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._reading = False
        self._replies.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._simulator._connections.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        buffer = self._buffer
        buffer += data
        # Loop: one read may hold several pipelined requests, or only part of one.
        while self._reading:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEADER_BYTES:
                        self._refuse(431, "Request headers are too large.")
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._head = self._parse_head(head)
                if self._head is None:
                    return
                self._continue_sent = False
            method, path, headers, length, keep_alive = self._head
            if len(buffer) < length:
                # curl and others hold back a large body until they see 100 Continue.
                if not self._continue_sent and headers.get("expect", "").lower() == "100-continue":
                    assert self._transport is not None
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self._continue_sent = True
                return
            body = bytes(buffer[:length])
            del buffer[:length]
            self._head = None
            try:
                reply = self._simulator._handle(method, path, headers, body, keep_alive)
            except Exception:
                log.exception("simulator failed on %s %s", method, path)
                error = _openai_error_body(500, "The simulator itself failed; see its log.")
                reply = _Reply(0.0, _WRITE, _http_response(500, error, [], keep_alive=False), True)
            self._enqueue(reply)

    def eof_received(self) -> bool | None:
        # The client half-closed: finish queued replies unless one of them never comes.
        self._reading = False
        if not self._replies or any(reply.action == _STALL for reply in self._replies):
            return None  # close now
        self._replies[-1].close = True
        return True

    def _parse_head(self, head: bytes) -> tuple[str, str, dict[str, str], int, bool] | None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._refuse(400, "Malformed HTTP request line.")
            return None
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                self._refuse(400, "Malformed HTTP header line.")
                return None
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            # Every client we serve sends Content-Length for a JSON body; chunked is not needed.
            self._refuse(
                411, "The simulator needs Content-Length; chunked bodies are not supported."
            )
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(400, "Invalid Content-Length.")
            return None
        if length > _MAX_BODY_BYTES:
            self._refuse(413, "Request body is too large.")
            return None
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        return method, target, headers, length, keep_alive

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request we cannot even parse, then close (after earlier replies)."""
        self._simulator.stats[str(status)] += 1
        body = _openai_error_body(status, message)
        self._enqueue(_Reply(0.0, _WRITE, _http_response(status, body, [], keep_alive=False), True))

    def _enqueue(self, reply: _Reply) -> None:
        if reply.close or reply.action == _DROP:
            self._reading = False
        self._replies.append(reply)
        if len(self._replies) == 1:
            self._pump()

    def _pump(self) -> None:
        """Write every reply at the head of the queue that is due; re-arm the timer for the rest."""
        self._timer = None
        replies = self._replies
        transport = self._transport
        loop = self._simulator._loop
        assert transport is not None and loop is not None
        while replies and not self._closed:
            reply = replies[0]
            if reply.action == _STALL:
                return  # never answered; anything pipelined behind it waits forever too
            if reply.ready_at > loop.time():
                self._timer = loop.call_at(reply.ready_at, self._pump)
                return
            replies.popleft()
            if reply.action == _WRITE:
                transport.write(reply.data)
            if reply.close or reply.action == _DROP:
                self._closed = True
                replies.clear()
                transport.close()  # flushes what was written before, then FIN
                return


class SimulatorThread:
    """Runs a :class:`Simulator` on its own event loop in a daemon thread (for sync tests).

    Attributes:
        simulator: the server; read ``.requests`` / ``.stats``, call ``.reset()``, swap ``.config``.
        host, port: where it listens; ``port`` is the bound port once started.
    """

    def __init__(
        self, config: SimulatorConfig = DEFAULT_CONFIG, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.simulator = Simulator(config)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start serving; returns once the port is bound (raises if binding failed)."""
        if self._thread is not None:
            raise RuntimeError("SimulatorThread is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                try:
                    self.port = loop.run_until_complete(self.simulator.start(self.host, self.port))
                except BaseException as exc:
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                loop.run_forever()
                loop.run_until_complete(self.simulator.stop())
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None


def run_simulator(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ready_message: bool = True,
) -> None:
    """Serve until SIGINT or SIGTERM (blocking), for ``pipeline simulate``.

    Prints ``simulator listening on http://HOST:PORT/v1`` once the port is bound.
    Uses uvloop when it is installed.
    """

    async def serve() -> None:
        simulator = Simulator(config)
        bound = await simulator.start(host, port)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available off the main thread or on Windows; Ctrl-C then still raises.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stopping.set)
        if ready_message:
            print(f"simulator listening on http://{host}:{bound}/v1", flush=True)
        try:
            await stopping.wait()
        finally:
            await simulator.stop()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(serve())
