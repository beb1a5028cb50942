"""Result lines of a batch -> one ``Outcome`` per ``custom_id``.

Both files are read whenever present: the output file (answers) and the error file. Each
line is matched by ``custom_id`` only (the order is the provider's). The shapes accepted:

- an answer: ``response.status_code == 200``, the chat completion in ``response.body``;
- an HTTP error: ``response.status_code != 200`` with ``response.body.error`` (OpenAI puts
  it there and leaves the top-level ``error`` null) or, from ``vllm run-batch``, a null body
  and ``error`` as a string or an object;
- a line that never ran: ``response: null`` and ``error.code`` such as ``batch_expired``.

Expired, cancelled and timed-out lines, 429s and 5xx may be sent again (``retryable``);
other errors are the row's result. Lines of unknown or repeated ids are counted and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..asks import RequestShape
from ..client import completion_from, error_from_response
from ..errors import RequestError, RetryableError
from ..records import Completion, Cost, RowResult
from .parts import key_of

RETRY_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a batch says of one line."""

    key: int
    completion: Completion | None = None  # set for an answer
    status: int | None = None  # the line's HTTP status, when it ran
    error_type: str | None = None
    message: str | None = None
    retryable: bool = False


@dataclass
class Parsed:
    outcomes: dict[int, Outcome]
    unknown: int = 0  # lines whose custom_id is not one of ours
    repeated: int = 0  # lines of an id already seen (the first wins)


def parse_results(
    chunks: Iterable[bytes], read: Callable[[int, dict[str, Any]], Outcome] | None = None
) -> Parsed:
    """Every line of the output and error files (in any order) -> outcomes by key; ``read``
    makes a line's ``Outcome`` (by default the OpenAI line shapes, ``outcome``)."""
    parsed = Parsed({})
    for key, found in iter_results(chunks, read, parsed):
        if key in parsed.outcomes:
            parsed.repeated += 1
        else:
            parsed.outcomes[key] = found
    return parsed


def iter_results(
    chunks: Iterable[bytes],
    read: Callable[[int, dict[str, Any]], Outcome] | None = None,
    counts: Parsed | None = None,
) -> Iterator[tuple[int, Outcome]]:
    """(key, outcome) of each line of the result files, in their order, one at a time (a
    part's 50,000 outcomes are never held together); lines that are not ours are counted in
    ``counts.unknown``."""
    read = read or outcome
    for chunk in chunks:
        for raw in chunk.splitlines():
            if not raw.strip():
                continue
            line = _json_line(raw)
            key = key_of(str(line.get("custom_id", ""))) if isinstance(line, dict) else None
            if key is None or line is None:
                if counts is not None:
                    counts.unknown += 1
                continue
            yield key, read(key, line)


def _json_line(raw: bytes) -> Any:
    """One JSON line, or None where it is not JSON (decoding first: json.loads(bytes)
    sniffs the encoding, a third of the time of a line)."""
    try:
        return json.loads(raw.decode())
    except ValueError:  # not UTF-8, or not JSON
        try:  # what json.loads(bytes) also accepts: a BOM, UTF-16/32
            return json.loads(raw)
        except ValueError:
            return None


def outcome(key: int, line: dict[str, Any]) -> Outcome:
    response = line.get("response")
    error = line.get("error")
    if not isinstance(response, dict):
        code, message = _error_fields(error)
        return Outcome(
            key, error_type=code or "BatchLineError", message=message, retryable=code in RETRY_CODES
        )
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 and isinstance(body, dict):
        try:
            return Outcome(key, completion=completion_from(body), status=200)
        except RequestError as exc:
            return Outcome(key, status=200, error_type=exc.kind, message=exc.message)
    if not isinstance(status, int):
        code, message = _error_fields(error)
        return Outcome(key, error_type=code or "BatchLineError", message=message)
    if isinstance(body, dict):
        content = json.dumps(body).encode()
    else:  # vllm run-batch: a null body, the error in ``error`` (a string or an object)
        code, message = _error_fields(error)
        content = json.dumps({"error": {"message": message, "code": code}}).encode()
    # the same error, kind and message as an online request answered with this status
    error_like = error_from_response(status, content, httpx.Headers())
    return Outcome(
        key,
        status=status,
        error_type=error_like.kind,
        message=error_like.message,
        retryable=isinstance(error_like, RetryableError),
    )


def _error_fields(error: Any) -> tuple[str | None, str | None]:
    """(code, message) of an error object or string."""
    if isinstance(error, str):
        return None, error
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = error.get("message")
        return (str(code) if code else None), (str(message) if message else None)
    return None, None


def row_result(outcome: Outcome, *, attempts: int, cost: Cost, shape: RequestShape) -> RowResult:
    """The result of a line that ran: an answer (checked against the schema or labels; a
    batch cannot re-ask) or the line's error."""
    completion = outcome.completion
    if completion is None:
        return RowResult(
            key=outcome.key,
            status="error",
            error_type=outcome.error_type,
            error_message=outcome.message,
            http_status=outcome.status,
            attempts=attempts,
        )
    text, finish_reason = completion.text, completion.finish_reason
    parsed = shape.check(text, finish_reason)
    invalid = parsed is not None and not parsed.ok
    return RowResult(
        key=outcome.key,
        status="invalid" if invalid else "ok",
        completion=text,
        finish_reason=finish_reason,
        usage=completion.usage,
        response_model=completion.model,
        response_id=completion.response_id,
        http_status=200,
        attempts=attempts,
        cost_usd=cost.usd,
        cost_source=cost.source,
        error_type=(
            ("TruncatedAnswer" if parsed.truncated else "InvalidAnswer")
            if invalid and parsed is not None
            else None
        ),
        error_message=parsed.error if invalid and parsed is not None else None,
    )


def given_up(key: int, outcome: Outcome | None, rounds: int) -> RowResult:
    """The error row of a line still missing or refused after ``rounds`` submissions."""
    why = "missing from the batch's output and error files"
    if outcome is not None:
        why = f"{outcome.error_type}: {outcome.message}"
    return RowResult(
        key=key,
        status="error",
        error_type=outcome.error_type if outcome is not None else "BatchLineMissing",
        error_message=f"{why} (after {rounds} batch submissions)",
        http_status=outcome.status if outcome is not None else None,
        attempts=rounds,
    )


def validation_failure(batch_id: str | None, file: str, errors: list[Any]) -> str:
    """What a batch that failed validation says: its id, part file and first five errors."""
    described = "; ".join(
        f"line {e.get('line')}: {e.get('code')}: {e.get('message')}"
        for e in errors[:5]
        if isinstance(e, dict)
    )
    return f"batch {batch_id} (part file {file}) failed validation: {described or 'no details'}"


def validation_failed(
    key: int, batch_id: str | None, file: str, errors: list[Any], rounds: int
) -> RowResult:
    """The error row of a line in a batch that failed validation."""
    return RowResult(
        key=key,
        status="error",
        error_type="BatchValidationFailed",
        error_message=validation_failure(batch_id, file, errors),
        attempts=rounds,
    )
