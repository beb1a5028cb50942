"""The ``[[sim:...]]`` directives a prompt may carry (their grammar, see the package
docstring) and the HTTP replies the simulator builds: error bodies in OpenAI's and the
AI/ML API's shapes, a response's bytes. No I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from .config import ANSWER_DIRECTIVE, DIRECTIVE, WRONG_KINDS, dumps


class DirectiveError(ValueError):
    """A ``[[sim:...]]`` directive that the simulator cannot obey."""


@dataclass(frozen=True, slots=True)
class Directives:
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
        raise DirectiveError(f"{key}={value!r} is not an integer status") from None
    if not 400 <= status <= 599:
        raise DirectiveError(f"{key}={status} must be an error status in 400..599")
    return status


def _number_value(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DirectiveError(f"{key}={value!r} is not a number") from None
    if not number >= 0:
        raise DirectiveError(f"{key}={value!r} must be >= 0")
    return number


def _directive_items(texts: list[str]) -> dict[str, str]:
    """Every ``key=value`` of every ``[[sim:...]]`` in ``texts`` (an ``answer=`` verbatim)."""
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
        found = ANSWER_DIRECTIVE.search(text)
        end = text.rfind("]]")
        if found is not None and end >= found.end():
            answer = text[found.end() : end]
            text = text[: found.start()]  # directives before it; its own items follow
        for match in DIRECTIVE.finditer(text):
            add_items(match.group(1))
        if answer is not None and found is not None:
            add_items(found.group("items") or "")
            items["answer"] = answer  # verbatim: surrounding spaces are part of the answer
    return items


def parse_directives(texts: list[str]) -> Directives | None:
    """Merge every ``[[sim:...]]`` found in ``texts``; None if there is none."""
    items = _directive_items(texts)
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
                raise DirectiveError("label= needs a value, e.g. label=positive")
            fields["answer"] = value
        elif key == "answer":
            fields["answer"] = value
        elif key == "wrong":
            fields["wrong"] = True
            if value:
                fields["wrong_first"] = int(_number_value(key, value))
        elif key == "wrong_kind":
            if value not in WRONG_KINDS:
                raise DirectiveError(f"wrong_kind={value!r} must be one of {WRONG_KINDS}")
            fields["wrong_kind"] = value
        else:
            raise DirectiveError(f"unknown key {key!r}")
    if "label" in items and "answer" in items:
        raise DirectiveError("conflicting answers label= and answer=; use one")
    if len(faults) > 1:
        raise DirectiveError(f"conflicting faults {faults}; use one per request")
    if fields.get("context_length") and not faults:
        faults.append("status")
        status = 400 if "status" not in items else status
    if faults:
        fault = faults[0]
    elif "fail" in fields:
        fault = "status"  # fail=N alone: the first N attempts get a 503
    if fields.get("retry_after_date") and "retry_after" not in fields:
        raise DirectiveError("retry_after_date needs retry_after=SECONDS")
    return Directives(fault=fault, status=status, **fields)


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
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
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


def openai_error_body(
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
    return dumps({"error": error})


def aimlapi_error_body(status: int, path: str, message: str | None = None) -> bytes:
    return dumps(
        {
            "message": message or _AIMLAPI_MESSAGES.get(status, _reason(status)),
            "path": path,
            "requestId": str(uuid.uuid4()),
            "statusCode": status,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )


def http_response(
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
WRITE, DROP, STALL = 0, 1, 2


@dataclass(slots=True)
class Reply:
    ready_at: float  # loop time
    action: int
    data: bytes = b""
    close: bool = False
