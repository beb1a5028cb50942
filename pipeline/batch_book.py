"""The simulator's batch ledger: batches of every dialect, their lazy timeline and line results.

This module owns what a simulated batch *is*, whatever dialect created it: its lines, its
timeline (a pure function of ``created_at``, the clock and ``BatchSimConfig``; no threads),
the per-line outcome (answered, HTTP error, expired, canceled), the line scripting and faults,
the enqueued-token estimate and the counters tests read. It does not own HTTP: routing,
request parsing and the exact JSON objects of each dialect live in ``pipeline.batch_service``
(OpenAI Files + Batches) and ``pipeline.batch_messages`` (Anthropic Message Batches).

Timeline of a batch created at ``t0`` with ``S = config.batch_seconds``::

    [t0, t0 + 0.1 S)            validating   (OpenAI only; a file that fails validation
                                              becomes ``failed`` at t0 + 0.1 S)
    [t0 + 0.1 S, t0 + 0.9 S)    in_progress  line k of n (in finish order) finishes at
                                              t0 + 0.1 S + (k + 1) / n * 0.8 S
    [t0 + 0.9 S, t0 + S)        finalizing
    t0 + S                      completed, or expired when some line expired

With ``S = 0`` every batch is terminal when created. A cancel at ``c`` (only while validating
or in progress) keeps the lines finished by ``c``; the batch is ``cancelling`` until
``c + cancel_seconds``, then ``cancelled``. Time is compressed: ``S`` stands for the 24 h
window, so ``expired_at`` is ``t0 + S`` while ``expires_at`` shows the nominal ``t0 + 24 h``.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: What ``answer(chat_body)`` returns: the HTTP status and the JSON response of a chat request.
Answer = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]

DAY = 86_400
VALIDATING_SHARE = 0.1
FINALIZING_SHARE = 0.1

# Line outcomes.
OK, HTTP_ERROR, EXPIRED, CANCELED = "ok", "http_error", "expired", "canceled"

_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
_ERROR_TYPES = {
    400: ("invalid_request_error", "Simulated invalid request."),
    401: ("invalid_request_error", "Incorrect API key provided."),
    404: ("invalid_request_error", "The requested resource does not exist."),
    429: ("rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
}


@dataclass(frozen=True, slots=True)
class BatchSimConfig:
    """How the simulated Batch APIs behave.

    Attributes:
        batch_seconds: S; a batch reaches its terminal state S seconds after it is created
            (0: at once). See the module docstring for the phases inside S.
        cancel_seconds: how long a cancelled batch stays ``cancelling`` / ``canceling``.
        max_requests: lines a batch may hold (OpenAI ``too_many_tasks`` above it).
        shuffle_seed: when set, lines finish (and are written) in an order shuffled by this
            seed and the batch id; when None, in input order.
        expire_fraction: the share of lines that never finish and expire (chosen by a hash
            of the batch id and the line number, so reproducible).
        fail_all: every line ends as an HTTP 500 error line.
        drop_create_responses: the first N batch creates (either dialect) commit the batch
            but get no reply: ``handle`` returns ``DROPPED`` and the server closes the
            connection without a response.
        enqueued_token_limit: per model, the estimated prompt tokens of its non-terminal
            batches; a create that would pass it is refused with "Enqueued token limit
            reached for <model> ..." (OpenAI: 400, code ``token_limit_exceeded``; Anthropic:
            429 ``rate_limit_error``). None: no limit.

    Per-line scripting, by text anywhere in the line's request body (the prompt, usually):
    ``[batch:expire]`` (the line expires) and ``[batch:httpNNN]`` (the line is an HTTP NNN
    error line, NNN in 400..599).
    """

    batch_seconds: float = 0.0
    cancel_seconds: float = 0.0
    max_requests: int = 50_000
    shuffle_seed: int | None = None
    expire_fraction: float = 0.0
    fail_all: bool = False
    drop_create_responses: int = 0
    enqueued_token_limit: int | None = None


@dataclass(slots=True)
class SimLine:
    """One request of a batch: its custom_id and the chat body it stands for."""

    custom_id: str
    body: dict[str, Any]
    text: str  # the raw request text, searched for line scripting


@dataclass(slots=True)
class SimBatch:
    """One batch of either dialect. Status is never stored: it is computed from the clock."""

    id: str
    dialect: str  # "openai" | "anthropic" | "aimlapi"
    created_at: float
    lines: list[SimLine]
    model: str
    tokens: int
    finish_order: list[int]  # line indexes in the order they finish
    finish_rank: list[int]  # line index -> position in finish order
    expiring: frozenset[int]
    endpoint: str = ""
    input_file_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors (OpenAI)
    cancel_at: float | None = None
    outcomes: dict[int, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    files: tuple[str | None, str | None] | None = None  # (output, error) once terminal
    final: list[tuple[int, str, int, dict[str, Any]]] | None = None  # outcomes once terminal


@dataclass(frozen=True, slots=True)
class Phase:
    """Where a batch is at one instant, dialect-neutral."""

    status: str  # validating|failed|in_progress|finalizing|completed|expired|cancelling|cancelled
    since: float  # when this status began
    done_by: float  # lines whose finish time is <= this have finished
    terminal: bool


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens as the simulator counts them: whitespace words over the message texts."""
    total = 0
    texts: list[Any] = [body.get("system")]
    for message in body.get("messages") or []:
        texts.append(message.get("content") if isinstance(message, dict) else None)
    for content in texts:
        if isinstance(content, str):
            total += len(content.split()) or (1 if content else 0)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
    return total


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """The OpenAI error body an HTTP-error line carries: ``{"error": {message, type, ...}}``."""
    kind, default = _ERROR_TYPES.get(
        status,
        (
            "server_error",
            "The server had an error while processing your request. Sorry about that!",
        ),
    )
    code = "rate_limit_exceeded" if status == 429 else None
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


def _scripted_status(text: str) -> int | None:
    start = text.find("[batch:http")
    if start < 0:
        return None
    digits = text[start + 11 : start + 14]
    if digits.isdigit() and 400 <= int(digits) <= 599 and text[start + 14 : start + 15] == "]":
        return int(digits)
    return None


class BatchBook:
    """Every batch and file the simulator holds, with ids, counters and the shared faults.

    Attributes:
        counters: ``files_uploaded``, ``batches_created``, ``lines_answered``,
            ``creates_dropped``, ``creates_refused``; missing keys read as 0.
        batches_by_tag: batches created per metadata tag (the sorted metadata pairs);
            a client that never pays twice keeps every count at 1.
    """

    def __init__(self, answer: Answer, clock: Callable[[], float], config: BatchSimConfig):
        self.answer = answer
        self.clock = clock
        self.config = config
        self.batches: dict[str, SimBatch] = {}
        self.counters: Counter[str] = Counter()
        self.batches_by_tag: Counter[tuple[tuple[str, str], ...]] = Counter()
        self._serial = 0

    def next_id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:06d}"

    # -- creating ---------------------------------------------------------------------------

    def refusal(self, model: str, tokens: int) -> str | None:
        """The enqueued-token-limit message if a batch of ``tokens`` must be refused."""
        limit = self.config.enqueued_token_limit
        if limit is None:
            return None
        now = self.clock()
        queued = sum(
            batch.tokens
            for batch in self.batches.values()
            if batch.model == model and not self.phase(batch, now).terminal
        )
        if queued + tokens <= limit:
            return None
        self.counters["creates_refused"] += 1
        return (
            f"Enqueued token limit reached for {model} in organization org-sim. "
            f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
            "batches have been completed."
        )

    def add(self, batch_id: str, dialect: str, lines: list[SimLine], **fields: Any) -> SimBatch:
        """Record a new batch created now; returns it."""
        config = self.config
        count = len(lines)
        order = list(range(count))
        if config.shuffle_seed is not None:
            random.Random(f"{config.shuffle_seed}:{batch_id}").shuffle(order)
        rank = [0] * count
        for position, index in enumerate(order):
            rank[index] = position
        expiring = frozenset(
            index
            for index, line in enumerate(lines)
            if "[batch:expire]" in line.text
            or zlib.crc32(f"{batch_id}:{index}".encode()) / 2**32 < config.expire_fraction
        )
        model = str(lines[0].body.get("model", "")) if lines else ""
        tokens = sum(estimate_tokens(line.body) for line in lines)
        now = self.clock()
        batch = SimBatch(
            batch_id, dialect, now, lines, model, tokens, order, rank, expiring, **fields
        )
        self.batches[batch_id] = batch
        self.counters["batches_created"] += 1
        self.batches_by_tag[tuple(sorted(batch.metadata.items()))] += 1
        return batch

    def drop_this_create(self) -> bool:
        """True for the first ``drop_create_responses`` creates (the reply is lost)."""
        if self.counters["creates_dropped"] < self.config.drop_create_responses:
            self.counters["creates_dropped"] += 1
            return True
        return False

    # -- the lazy timeline ------------------------------------------------------------------

    def phase(self, batch: SimBatch, now: float) -> Phase:
        """The batch's status at ``now``, computed from its timeline (see module docstring)."""
        span = self.config.batch_seconds
        t0 = batch.created_at
        validated = t0 + VALIDATING_SHARE * span
        finalizing = t0 + (1 - FINALIZING_SHARE) * span
        end = t0 + span
        if now < validated and batch.cancel_at is None:
            return Phase("validating", t0, now, False)
        if batch.cancel_at is not None:  # only ever set while validating or in progress
            over = batch.cancel_at + self.config.cancel_seconds
            if now < over:
                return Phase("cancelling", batch.cancel_at, batch.cancel_at, False)
            return Phase("cancelled", over, batch.cancel_at, True)
        if batch.errors:
            return Phase("failed", validated, validated, True)
        if now < finalizing:
            return Phase("in_progress", validated, now, False)
        if batch.expiring:
            if now < end:
                return Phase("in_progress", validated, now, False)
            return Phase("expired", end, end, True)
        if now < end:
            return Phase("finalizing", finalizing, end, False)
        return Phase("completed", end, end, True)

    def finish_time(self, batch: SimBatch, index: int) -> float | None:
        """When line ``index`` finishes, or None if it never does (it expires)."""
        if index in batch.expiring:
            return None
        span = self.config.batch_seconds
        start = batch.created_at + VALIDATING_SHARE * span
        run = (1 - VALIDATING_SHARE - FINALIZING_SHARE) * span
        return start + (batch.finish_rank[index] + 1) / len(batch.lines) * run

    def outcomes(self, batch: SimBatch, now: float) -> list[tuple[int, str, int, dict[str, Any]]]:
        """``(index, kind, status, payload)`` of every line with an outcome, in finish order.

        Finished lines are answered (once: results are memoized); at a terminal state the
        lines that did not finish are ``expired`` (expired batch) or ``canceled`` (cancelled).
        """
        if batch.final is not None:
            return batch.final
        phase = self.phase(batch, now)
        if phase.status in ("validating", "failed"):
            return []
        found: list[tuple[int, str, int, dict[str, Any]]] = []
        for index in batch.finish_order:
            at = self.finish_time(batch, index)
            if at is not None and at <= phase.done_by:
                found.append((index, *self._result(batch, index)))
            elif phase.status == "expired":
                found.append((index, EXPIRED, 0, {}))
            elif phase.status == "cancelled":
                found.append((index, CANCELED, 0, {}))
        if phase.terminal:
            batch.final = found  # a terminal batch never changes: later reads are O(1)
        return found

    def _result(self, batch: SimBatch, index: int) -> tuple[str, int, dict[str, Any]]:
        known = batch.outcomes.get(index)
        if known is not None:
            return known
        line = batch.lines[index]
        scripted = 500 if self.config.fail_all else _scripted_status(line.text)
        if scripted is not None:
            status, payload = scripted, error_body(scripted)
        else:
            status, payload = self.answer(line.body)
        kind = OK if status == 200 else HTTP_ERROR
        batch.outcomes[index] = (kind, status, payload)
        self.counters["lines_answered"] += 1
        return kind, status, payload
