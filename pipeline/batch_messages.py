"""The simulator's Anthropic Message Batches dialect (also the AI/ML API's Claude batches).

This module owns ``MessageBatches``: the ``/v1/messages/batches*`` routes, validation of the
inline ``requests[{custom_id, params}]``, the MessageBatch object (``processing_status``
``in_progress`` / ``canceling`` / ``ended``, ``request_counts``, RFC 3339 timestamps) and the
results JSONL (``{custom_id, result: {type: succeeded|errored|canceled|expired, ...}}``),
with answers in Anthropic Message shape built from the same chat ``answer`` as online
replies. It does not own the timeline, line outcomes, faults or counters
(``pipeline.batch_book``) nor the routing of other paths (``pipeline.batch_service``).

Endpoints: ``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (``?limit=
&after_id=``, newest first), ``GET /v1/messages/batches/{id}``, ``POST
/v1/messages/batches/{id}/cancel``, ``GET /v1/messages/batches/{id}/results`` (400 until
the batch has ended). An unknown batch is 404 with Anthropic's error body.

The AI/ML API's variant (BATCH-API.md section 3), routed here by ``pipeline.batch_service``:
``POST /v1/batches`` with inline ``requests`` (``aiml_create``), ``GET
/v1/batches?batch_id=ID`` (``aiml_status``: ``[{id, status: "generating"}]`` while it runs,
the batch object with ``status: "cancelled"`` once cancelled, the result JSONL once ended)
and ``POST /v1/batches/cancel/{id}`` (``aiml_cancel``: 400 once it has ended).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from pipeline.batch_book import (
    CANCELED,
    DAY,
    EXPIRED,
    OK,
    BatchBook,
    SimBatch,
    SimLine,
    estimate_tokens,
)

Reply = tuple[int, list[tuple[str, str]], bytes]
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_REQUESTS = 100_000
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


def anthropic_error(status: int, message: str) -> Reply:
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return status, [("content-type", "application/json")], json.dumps(body).encode()


def _stamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def chat_body(params: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body an Anthropic ``params`` object stands for."""
    messages = list(params.get("messages") or [])
    system = params.get("system")
    if isinstance(system, list):
        system = " ".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": params.get("model"), "messages": messages}
    if params.get("max_tokens") is not None:
        body["max_tokens"] = params["max_tokens"]
    return body


def to_message(custom_id: str, completion: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Message from a chat completion (its first choice and usage)."""
    choice = (completion.get("choices") or [{}])[0]
    usage = completion.get("usage") or {}
    content = (choice.get("message") or {}).get("content") or ""
    return {
        "id": f"msg_sim_{custom_id}",
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": [{"type": "text", "text": content}],
        "stop_reason": "max_tokens" if choice.get("finish_reason") == "length" else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "service_tier": "batch",
        },
    }


def _request_problem(requests: Any) -> str | None:
    if not isinstance(requests, list) or not requests:
        return "requests: must be a non-empty list"
    if len(requests) > _MAX_REQUESTS:
        return f"requests: at most {_MAX_REQUESTS} items, got {len(requests)}"
    seen: set[str] = set()
    for number, item in enumerate(requests):
        if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
            return f"requests.{number}: must be an object with custom_id and params"
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
            return f"requests.{number}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$"
        if custom_id in seen:
            return f"requests.{number}.custom_id: duplicate custom_id '{custom_id}'"
        seen.add(custom_id)
        params = item["params"]
        for name in ("model", "max_tokens", "messages"):
            if name not in params:
                return f"requests.{number}.params.{name}: Field required"
    return None


class MessageBatches:
    """The Anthropic-style batch routes over the shared ``BatchBook``."""

    def __init__(self, book: BatchBook) -> None:
        self.book = book

    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> Reply:
        rest = path.split("/")[4:]  # after "", "v1", "messages", "batches"
        if not rest:
            if method == "POST":
                return self._create(body)
            if method == "GET":
                return self._list(query, headers)
            return anthropic_error(405, f"Method {method} not allowed")
        batch = self.book.batches.get(rest[0])
        if batch is None or batch.dialect != "anthropic":
            return anthropic_error(404, f"No message batch found with id '{rest[0]}'.")
        if len(rest) == 1 and method == "GET":
            return self._reply(self._object(batch, headers))
        if rest[1:] == ["cancel"] and method == "POST":
            if not self.book.phase(batch, self.book.clock()).terminal and batch.cancel_at is None:
                batch.cancel_at = self.book.clock()
            return self._reply(self._object(batch, headers))
        if rest[1:] == ["results"] and method == "GET":
            return self._results(batch)
        return anthropic_error(404, f"Invalid URL ({method} {path})")

    @staticmethod
    def _reply(obj: Any) -> Reply:
        return 200, [("content-type", "application/json")], json.dumps(obj).encode()

    def aiml_create(self, body: bytes) -> Reply:
        return self._create(body, "aimlapi")

    def aiml_status(self, batch_id: str) -> Reply:
        batch = self.book.batches.get(batch_id)
        if batch is None or batch.dialect != "aimlapi":
            return anthropic_error(404, f"No batch found with id '{batch_id}'.")
        if batch.cancel_at is not None:
            cancelled = {**self._object(batch, {}), "results_url": None, "status": "cancelled"}
            return self._reply(cancelled)
        if not self.book.phase(batch, self.book.clock()).terminal:
            return self._reply([{"id": batch.id, "status": "generating"}])
        return self._results(batch)

    def aiml_cancel(self, batch_id: str) -> Reply:
        batch = self.book.batches.get(batch_id)
        if batch is None or batch.dialect != "aimlapi":
            return anthropic_error(404, f"No batch found with id '{batch_id}'.")
        if self.book.phase(batch, self.book.clock()).terminal:
            return anthropic_error(400, f"Batch {batch_id} has already finished processing.")
        if batch.cancel_at is None:
            batch.cancel_at = self.book.clock()
        return self._reply(self._object(batch, {}))

    def _create(self, body: bytes, dialect: str = "anthropic") -> Reply:
        try:
            request = json.loads(body)
        except ValueError:
            return anthropic_error(400, "The request body is not valid JSON.")
        requests = request.get("requests") if isinstance(request, dict) else None
        problem = _request_problem(requests)
        if problem is not None:
            return anthropic_error(400, problem)
        assert isinstance(requests, list)
        lines = [
            SimLine(item["custom_id"], chat_body(item["params"]), json.dumps(item))
            for item in requests
        ]
        model = str(lines[0].body.get("model"))
        refusal = self.book.refusal(model, sum(estimate_tokens(line.body) for line in lines))
        if refusal is not None:  # Anthropic's batch queue limits are rate limits: 429
            return anthropic_error(429, refusal)
        prefix = "msgbatch_sim" if dialect == "anthropic" else "aimlbatch"
        batch = self.book.add(self.book.next_id(prefix), dialect, lines)
        if self.book.drop_this_create():
            return 0, [], b""
        return self._reply(self._object(batch, {}))

    def _status(self, batch: SimBatch) -> str:
        phase = self.book.phase(batch, self.book.clock())
        if phase.terminal:
            return "ended"
        return "canceling" if phase.status == "cancelling" else "in_progress"

    def _object(self, batch: SimBatch, headers: dict[str, str]) -> dict[str, Any]:
        book = self.book
        now = book.clock()
        phase = book.phase(batch, now)
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        for _, kind, _, _ in book.outcomes(batch, now):
            key = {OK: "succeeded", EXPIRED: "expired", CANCELED: "canceled"}.get(kind, "errored")
            counts[key] += 1
        counts["processing"] = len(batch.lines) - sum(counts.values())
        status = self._status(batch)
        results_url = None
        if status == "ended":
            host = headers.get("host", "127.0.0.1")
            results_url = f"http://{host}/v1/messages/batches/{batch.id}/results"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _stamp(phase.since) if status == "ended" else None,
            "created_at": _stamp(batch.created_at),
            "expires_at": _stamp(batch.created_at + DAY),
            "archived_at": None,
            "cancel_initiated_at": _stamp(batch.cancel_at),
            "results_url": results_url,
        }

    def _results(self, batch: SimBatch) -> Reply:
        if self._status(batch) != "ended":
            return anthropic_error(400, f"Batch {batch.id} is still processing; no results yet.")
        out: list[bytes] = []
        for index, kind, status, payload in self.book.outcomes(batch, self.book.clock()):
            custom_id = batch.lines[index].custom_id
            result: dict[str, Any]
            if kind == OK:
                result = {"type": "succeeded", "message": to_message(custom_id, payload)}
            elif kind in (EXPIRED, CANCELED):
                result = {"type": kind}
            else:
                detail = (payload.get("error") or {}) if isinstance(payload, dict) else {}
                message = str(detail.get("message") or f"HTTP {status}")
                _, _, error = anthropic_error(status, message)
                result = {"type": "errored", "error": json.loads(error)}
            out.append(json.dumps({"custom_id": custom_id, "result": result}).encode() + b"\n")
        return 200, [("content-type", "application/x-jsonl")], b"".join(out)

    def _list(self, query: dict[str, str], headers: dict[str, str]) -> Reply:
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            return anthropic_error(400, "limit: must be an integer")
        if not 1 <= limit <= 1000:
            return anthropic_error(400, "limit: must be between 1 and 1000")
        newest = [b for b in reversed(self.book.batches.values()) if b.dialect == "anthropic"]
        after = query.get("after_id")
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        data = [self._object(b, headers) for b in newest[:limit]]
        page = {
            "data": data,
            "has_more": len(newest) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
        return self._reply(page)
