"""The simulator's Batch APIs: routing, the OpenAI Files + Batches dialect, and its exact objects.

This module owns ``BatchService``, which the simulator's request handler calls for every
request before its own routes: ``handle`` answers ``/v1/files*`` and ``/v1/batches*``
(OpenAI) itself, hands ``/v1/messages/batches*`` (Anthropic) to ``pipeline.batch_messages``
and returns None for any other path. It parses multipart uploads and renders Batch, File
and list objects and the output / error file lines. It does not own the checks of creates
and input files (``pipeline.batch_input``), the batch timeline, line outcomes, faults or
counters (``pipeline.batch_book``) nor any socket: the simulator turns the returned
``(status, headers, body)`` into an HTTP response, and ``DROPPED`` into a connection closed
without a reply.

OpenAI endpoints: ``POST /v1/files`` (multipart: ``purpose``, ``file``), ``GET /v1/files``
(``?purpose=``), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE
/v1/files/{id}``, ``POST /v1/batches``, ``GET /v1/batches`` (``?limit=&after=``, newest
first), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``. An unknown file or
batch is 404. A create with a bad body is 400; an input file that fails validation makes a
batch that ends ``failed`` with ``errors.data`` (see ``pipeline.batch_input``). The AI/ML
API's variant of Message Batches shares ``/v1/batches``: a create whose body has inline
``requests``, ``GET /v1/batches?batch_id=`` and ``POST /v1/batches/cancel/{id}`` go to
``pipeline.batch_messages``.

Output lines: success in the output file; HTTP errors in the error file with
``response.body.error`` and top-level ``error`` null (the documented discrepancy); expired
lines ``response: null, error: {code: "batch_expired"}``. Lines a cancel stopped appear in
neither file. A file is null when it would be empty (so an all-failed batch has
``output_file_id`` null). ``request_counts``: ``total`` is 0 while validating,
``completed`` counts success lines, ``failed`` HTTP-error and expired lines.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.batch_book import (
    DAY,
    EXPIRED,
    OK,
    Answer,
    BatchBook,
    BatchSimConfig,
    SimBatch,
    SimLine,
    estimate_tokens,
)
from pipeline.batch_input import create_problem, read_input
from pipeline.batch_messages import MessageBatches

__all__ = ["DROPPED", "BatchService", "BatchSimConfig", "Reply"]

Reply = tuple[int, list[tuple[str, str]], bytes]
#: The reply of a create whose response is lost: close the connection without answering.
DROPPED: Reply = (0, [], b"")

FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_JSON = [("content-type", "application/json")]
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def json_reply(status: int, obj: Any) -> Reply:
    return status, list(_JSON), json.dumps(obj).encode()


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> Reply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json_reply(
        status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
    )


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes).

    Split on the boundary; only each part's header block goes through the email package
    (which splits a whole body into lines: 0.7 s for a 50,000-line part file).
    """
    head = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode()
    )
    boundary = head.get_param("boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    if head.get_content_maintype() != "multipart" or not isinstance(boundary, str):
        return fields
    delimiter = b"--" + boundary.encode("latin-1")
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        headers, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        part = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(
            headers.lstrip(b"\r\n") + b"\r\n\r\n"
        )
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            filename = part.get_param("filename", header="content-disposition")
            payload = payload.removesuffix(b"\r\n")  # the CRLF before the next delimiter
            fields[name] = (filename if isinstance(filename, str) else None, payload)
    return fields


class BatchService:
    """The simulated Batch APIs of every dialect, answering through ``answer``.

    ``answer(chat_body) -> (status, response_json)`` answers one chat request the way the
    simulator answers it online; ``clock()`` is the time in seconds (tests pass a fake one).
    Counters for tests: ``counters`` and ``batches_by_tag`` (see ``BatchBook``).
    """

    def __init__(
        self, answer: Answer, clock: Callable[[], float], config: BatchSimConfig | None = None
    ) -> None:
        self.book = BatchBook(answer, clock, config or BatchSimConfig())
        self.files: dict[str, dict[str, Any]] = {}  # id -> File object + "_content"
        self.messages = MessageBatches(self.book)

    @property
    def config(self) -> BatchSimConfig:
        """The behaviour in force; may be replaced at any time (read per request)."""
        return self.book.config

    @config.setter
    def config(self, config: BatchSimConfig) -> None:
        self.book.config = config

    @property
    def counters(self) -> Any:
        return self.book.counters

    @property
    def batches_by_tag(self) -> Any:
        return self.book.batches_by_tag

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Reply | None:
        """The reply to one request, or None when ``target`` is not a batch or file path."""
        split = urlsplit(target)
        path = split.path.rstrip("/")
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        headers = {key.lower(): value for key, value in headers.items()}
        if path.startswith("/v1/messages/batches"):
            return self.messages.handle(method, path, query, headers, body)
        parts = path.split("/")[1:]  # "v1", "files" | "batches", ...
        if parts[:2] == ["v1", "files"]:
            return self._files(method, parts[2:], query, headers, body)
        if parts[:2] == ["v1", "batches"]:
            return self._batches(method, parts[2:], query, body)
        return None

    # -- files ------------------------------------------------------------------------------

    def _files(
        self,
        method: str,
        rest: list[str],
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> Reply:
        if not rest:
            if method == "POST":
                return self._upload(headers.get("content-type", ""), body)
            if method == "GET":
                purpose = query.get("purpose")
                data = [
                    self._file_object(f)
                    for f in reversed(self.files.values())
                    if purpose is None or f["purpose"] == purpose
                ]
                return json_reply(200, _page(data, has_more=False))
            return openai_error(405, f"Method {method} not allowed on /v1/files")
        found = self.files.get(rest[0])
        if found is None:
            return openai_error(404, f"No such File object: {rest[0]}", param="id")
        if len(rest) == 2 and rest[1] == "content" and method == "GET":
            return 200, [("content-type", "application/octet-stream")], found["_content"]
        if len(rest) == 1 and method == "GET":
            return json_reply(200, self._file_object(found))
        if len(rest) == 1 and method == "DELETE":
            del self.files[rest[0]]
            return json_reply(200, {"id": rest[0], "object": "file", "deleted": True})
        return openai_error(404, f"Invalid URL ({method} /v1/files/{'/'.join(rest)})")

    def _upload(self, content_type: str, body: bytes) -> Reply:
        if not content_type.startswith("multipart/form-data"):
            return openai_error(400, "Expected multipart/form-data with fields purpose and file.")
        fields = parse_multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace").strip()
        if purpose not in FILE_PURPOSES:
            message = f"'{purpose}' is not one of {sorted(FILE_PURPOSES)} - 'purpose'"
            return openai_error(400, message, param="purpose")
        if "file" not in fields:
            return openai_error(400, "Missing required parameter: 'file'.", param="file")
        filename, content = fields["file"]
        self.book.counters["files_uploaded"] += 1
        record = self._store(filename or "upload.jsonl", purpose, content)
        return json_reply(200, self._file_object(record))

    def _store(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        file_id = self.book.next_id("file-sim")
        record = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(self.book.clock()),
            "expires_at": None,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "_content": content,
        }
        self.files[file_id] = record
        return record

    @staticmethod
    def _file_object(record: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in record.items() if not key.startswith("_")}

    # -- batches ----------------------------------------------------------------------------

    def _batches(self, method: str, rest: list[str], query: dict[str, str], body: bytes) -> Reply:
        if not rest:
            if method == "POST":
                if b'"requests"' in body and b'"input_file_id"' not in body:  # the AI/ML API
                    return self.messages.aiml_create(body)
                return self._create(body)
            if method == "GET":
                if "batch_id" in query:
                    return self.messages.aiml_status(query["batch_id"])
                return self._list(query)
            return openai_error(405, f"Method {method} not allowed on /v1/batches")
        if rest[0] == "cancel" and len(rest) == 2 and method == "POST":
            return self.messages.aiml_cancel(rest[1])
        batch = self.book.batches.get(rest[0])
        if batch is None or batch.dialect != "openai":
            return openai_error(404, f"No batch found with id '{rest[0]}'.", param="batch_id")
        if len(rest) == 1 and method == "GET":
            return json_reply(200, self._batch_object(batch))
        if rest[1:] == ["cancel"] and method == "POST":
            status = self.book.phase(batch, self.book.clock()).status
            if status in ("validating", "in_progress"):
                batch.cancel_at = self.book.clock()
            elif status not in ("cancelling", "cancelled"):
                return openai_error(409, f"Cannot cancel a batch with status '{status}'.")
            return json_reply(200, self._batch_object(batch))
        return openai_error(404, f"Invalid URL ({method} /v1/batches/{'/'.join(rest)})")

    def _create(self, body: bytes) -> Reply:
        try:
            request = json.loads(body)
        except ValueError:
            return openai_error(400, "We could not parse the JSON body of your request.")
        if not isinstance(request, dict):
            return openai_error(400, "The body must be a JSON object.")
        problem = create_problem(request)
        if problem is not None:
            return openai_error(400, problem[1], param=problem[0])
        record = self.files.get(request["input_file_id"])
        if record is None:
            message = f"No such File object: {request['input_file_id']}"
            return openai_error(404, message, param="input_file_id")
        if record["purpose"] != "batch":
            message = f"File {record['id']} has purpose '{record['purpose']}'; it must be 'batch'."
            return openai_error(400, message, param="input_file_id")
        lines, errors = read_input(
            record["_content"], request["endpoint"], self.book.config.max_requests
        )
        if lines and not errors:
            refusal = self.book.refusal(str(lines[0].body.get("model")), _tokens(lines))
            if refusal is not None:
                return openai_error(400, refusal, code="token_limit_exceeded")
        batch = self.book.add(
            self.book.next_id("batch_sim"),
            "openai",
            [] if errors else lines,
            endpoint=request["endpoint"],
            input_file_id=record["id"],
            metadata=dict(request.get("metadata") or {}),
            errors=errors,
        )
        if self.book.drop_this_create():
            return DROPPED
        return json_reply(200, self._batch_object(batch))

    def _list(self, query: dict[str, str]) -> Reply:
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            return openai_error(400, "limit must be an integer.", param="limit")
        if not 1 <= limit <= 100:
            return openai_error(400, "limit must be between 1 and 100.", param="limit")
        newest = [b for b in reversed(self.book.batches.values()) if b.dialect == "openai"]
        after = query.get("after")
        if after is not None:
            ids = [b.id for b in newest]
            if after not in ids:
                return openai_error(404, f"No batch found with id '{after}'.", param="after")
            newest = newest[ids.index(after) + 1 :]
        page = [self._batch_object(b) for b in newest[:limit]]
        return json_reply(200, _page(page, has_more=len(newest) > limit))

    def _batch_object(self, batch: SimBatch) -> dict[str, Any]:
        """The spec Batch object at this instant (writes the result files once terminal)."""
        book = self.book
        now = book.clock()
        phase = book.phase(batch, now)
        outcomes = book.outcomes(batch, now)
        if phase.terminal and batch.files is None and phase.status != "failed":
            batch.files = self._write_results(batch, outcomes)
        t0 = int(batch.created_at)
        stamps = dict.fromkeys(
            (
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        )
        validated = int(batch.created_at + 0.1 * book.config.batch_seconds)
        if phase.status not in ("validating", "failed") and not (
            batch.cancel_at is not None and batch.cancel_at < validated
        ):
            stamps["in_progress_at"] = validated
        key = {"finalizing": "finalizing_at", "completed": "completed_at", "failed": "failed_at"}
        if phase.status in key:
            stamps[key[phase.status]] = int(phase.since)
        if phase.status == "completed":
            stamps["finalizing_at"] = int(batch.created_at + 0.9 * book.config.batch_seconds)
        if phase.status == "expired":
            stamps["expired_at"] = int(phase.since)
        if batch.cancel_at is not None:
            stamps["cancelling_at"] = int(batch.cancel_at)
            if phase.status == "cancelled":
                stamps["cancelled_at"] = int(phase.since)
        ok = [o for o in outcomes if o[1] == OK]
        failed = [o for o in outcomes if o[1] != OK and o[1] != "canceled"]
        total = 0 if phase.status in ("validating", "failed") else len(batch.lines)
        output_id, error_id = batch.files or (None, None)
        errors = {"object": "list", "data": batch.errors} if batch.errors else None
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model or None,
            "errors": errors,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": phase.status,
            "output_file_id": output_id,
            "error_file_id": error_id,
            "created_at": t0,
            "expires_at": t0 + DAY,
            **stamps,
            "request_counts": {"total": total, "completed": len(ok), "failed": len(failed)},
            "usage": _usage([o[3] for o in ok]),
            "metadata": batch.metadata or None,
        }

    def _write_results(
        self, batch: SimBatch, outcomes: list[tuple[int, str, int, dict[str, Any]]]
    ) -> tuple[str | None, str | None]:
        output: list[bytes] = []
        failures: list[bytes] = []
        for index, kind, status, payload in outcomes:
            line: dict[str, Any] = {
                "id": f"batch_req_{batch.id}_{index}",
                "custom_id": batch.lines[index].custom_id,
                "response": None,
                "error": None,
            }
            if kind == EXPIRED:
                line["error"] = {"code": "batch_expired", "message": _EXPIRED_MESSAGE}
            elif kind == "canceled":
                continue
            else:
                request_id = f"req_sim_{batch.id}_{index}"
                line["response"] = {
                    "status_code": status,
                    "request_id": request_id,
                    "body": payload,
                }
            (output if kind == OK else failures).append(json.dumps(line).encode() + b"\n")
        files: list[str | None] = []
        for suffix, chunk in (("output", output), ("error", failures)):
            if not chunk:
                files.append(None)
                continue
            name = f"{batch.id}_{suffix}.jsonl"
            files.append(self._store(name, "batch_output", b"".join(chunk))["id"])
        return files[0], files[1]


def _page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _tokens(lines: list[SimLine]) -> int:
    return sum(estimate_tokens(line.body) for line in lines)


def _usage(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    prompt = sum(int((b.get("usage") or {}).get("prompt_tokens") or 0) for b in bodies)
    completion = sum(int((b.get("usage") or {}).get("completion_tokens") or 0) for b in bodies)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
