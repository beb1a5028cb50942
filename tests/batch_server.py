"""A small OpenAI Files + Batches server on 127.0.0.1 for the batch-mode tests.

It answers each line as the simulator answers a chat request ("Simulated answer to: " +
the last message, usage counted in words), and can misbehave the ways the protocol note
(BATCH-API.md) lists: batches that stay running for a number of polls, a create that commits
the batch and then never answers, lines that expire, a batch whose every line fails, a
validation failure, shuffled output.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Faults:
    polls_running: int = 0  # GETs of a batch that still say in_progress
    hold_create: threading.Event | None = None  # create commits, then waits for this event
    drop_create: bool = False  # create commits, then closes the connection unanswered
    expire_prompts: set[str] = field(default_factory=set)  # expire once each
    fail_all: bool = False  # every line an HTTP 500 error (output_file_id null)
    invalid: bool = False  # validation fails (status failed, errors.data)
    delay: float = 0.0  # seconds before every answer (a slow provider: room to kill a client)
    create_delay: float = 0.0  # a create received is made (and listed) this much later
    polls_429: int = 0  # the next N polls (GET /batches*) answer 429 with Retry-After
    retry_after: float = 0.5


class BatchServer:
    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.creates: list[dict[str, str]] = []  # the metadata of every create received
        self.creates_received = 0  # creates whose request arrived (made or not yet)
        self.cancelled: list[str] = []  # the ids of the batches cancelled
        self.polls = {"list": 0, "get": 0}  # GET /batches and GET /batches/{id} received
        self.poll_times: list[tuple[float, int]] = []  # (monotonic time, status) of each poll
        self.lines_answered = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._expired: set[str] = set()
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # a killed client's broken pipe
        self.httpd = server
        self.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    def __enter__(self) -> BatchServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.faults.hold_create is not None:
            self.faults.hold_create.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- the protocol ---------------------------------------------------------------------

    def upload(self, content: bytes) -> dict[str, Any]:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = content
        return {"id": file_id, "object": "file", "purpose": "batch", "bytes": len(content)}

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        batch_id = f"batch_{next(self._ids)}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"],
            "status": "validating",
            "created_at": int(time.time()),
            "metadata": body.get("metadata") or {},
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "_polls": 0,
        }
        with self._lock:
            self.batches[batch_id] = batch
            self.creates.append(dict(batch["metadata"]))
        return batch

    def get(self, batch_id: str) -> dict[str, Any] | None:
        batch = self.batches.get(batch_id)
        if batch is None:
            return None
        if batch["status"] not in ("completed", "failed", "cancelled"):
            batch["_polls"] += 1
            if batch["_polls"] > self.faults.polls_running:
                self._finish(batch)
            else:
                batch["status"] = "in_progress"
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """Cancel a running batch: the lines it had done by then (the first third) are in
        its output file, the rest in none (as OpenAI's cancelled batches); a batch that
        already ended is refused with 400."""
        batch = self.batches.get(batch_id)
        if batch is None or batch["status"] in ("completed", "failed", "cancelled"):
            return None
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].splitlines() if x]
        done = lines[: len(lines) // 3]
        self.lines_answered += len(done)
        batch["output_file_id"] = self._file(
            [{"id": "r", "custom_id": line["custom_id"], "error": None,
              "response": {"status_code": 200, "body": answer(line["body"])}} for line in done]
        )  # fmt: skip
        counts = {"total": len(lines), "completed": len(done), "failed": 0}
        batch.update(status="cancelled", request_counts=counts)
        self.cancelled.append(batch_id)
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _finish(self, batch: dict[str, Any]) -> None:
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].splitlines() if x]
        if self.faults.invalid:
            error = {"code": "invalid_request", "message": "bad line", "param": None, "line": 2}
            batch.update(status="failed", errors={"object": "list", "data": [error]})
            return
        out, err = [], []
        for line in lines:
            prompt = line["body"]["messages"][-1]["content"]
            if prompt in self.faults.expire_prompts and prompt not in self._expired:
                self._expired.add(prompt)
                err.append({"id": "r", "custom_id": line["custom_id"], "response": None,
                            "error": {"code": "batch_expired", "message": "expired"}})  # fmt: skip
            elif self.faults.fail_all:
                body = {"error": {"message": "server error", "type": "server_error",
                                  "param": None, "code": None}}  # fmt: skip
                err.append({"id": "r", "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 500, "body": body}})  # fmt: skip
            else:
                self.lines_answered += 1
                out.append({"id": "r", "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 200, "body": answer(line["body"])}})  # fmt: skip
        random.Random(7).shuffle(out)
        batch["output_file_id"] = self._file(out)
        batch["error_file_id"] = self._file(err)
        counts = {"total": len(lines), "completed": len(out), "failed": len(err)}
        batch.update(status="completed", request_counts=counts)

    def _file(self, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        return file_id

    def listing(self, query: dict[str, list[str]]) -> dict[str, Any]:
        every = [self.get(b) for b in reversed(list(self.batches))]
        after = query.get("after", [None])[0]
        if after:
            ids = [b["id"] for b in every if b]
            every = every[ids.index(after) + 1 :] if after in ids else []
        limit = int(query.get("limit", ["20"])[0])
        page = every[:limit]
        return {
            "object": "list",
            "data": page,
            "has_more": len(every) > limit,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:
                time.sleep(server.faults.delay)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = urlsplit(self.path).path
                if path == "/v1/files":
                    self._reply(200, server.upload(_multipart_file(body)))
                elif path == "/v1/batches":
                    server.creates_received += 1
                    time.sleep(server.faults.create_delay)
                    batch = server.create(json.loads(body))
                    faults = server.faults
                    if faults.hold_create is not None:
                        faults.hold_create.wait(30)
                    if faults.drop_create:
                        faults.drop_create = False
                        self.close_connection = True
                        return
                    self._reply(200, server.get(batch["id"]))
                elif path.startswith("/v1/batches/") and path.endswith("/cancel"):
                    cancelled = server.cancel(path.split("/")[3])
                    message = {"error": {"message": "cannot cancel a finished batch"}}
                    self._reply(200 if cancelled else 400, cancelled or message)
                elif path == "/v1/chat/completions":
                    self._reply(200, answer(json.loads(body)))
                else:
                    self._reply(404, {"error": {"message": f"no {path}"}})

            def do_GET(self) -> None:
                time.sleep(server.faults.delay)
                split = urlsplit(self.path)
                parts = split.path.strip("/").split("/")
                if parts[:2] == ["v1", "batches"]:
                    refused = server.faults.polls_429 > 0
                    server.poll_times.append((time.monotonic(), 429 if refused else 200))
                    if refused:
                        server.faults.polls_429 -= 1
                        wait = {"Retry-After": f"{server.faults.retry_after:g}"}
                        self._reply(429, {"error": {"message": "slow down"}}, wait)
                        return
                if split.path == "/v1/batches":
                    server.polls["list"] += 1
                    self._reply(200, server.listing(parse_qs(split.query)))
                elif parts[:2] == ["v1", "batches"] and len(parts) == 3:
                    server.polls["get"] += 1
                    batch = server.get(parts[2])
                    self._reply(200 if batch else 404, batch or {"error": {"message": "none"}})
                elif parts[:2] == ["v1", "files"] and parts[-1] == "content":
                    raw = server.files.get(parts[2])
                    if raw is None:
                        self._reply(404, {"error": {"message": "no file"}})
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                else:
                    self._reply(404, {"error": {"message": f"no {split.path}"}})

        return Handler


def answer(body: dict[str, Any]) -> dict[str, Any]:
    prompt = str(body["messages"][-1]["content"])
    text = f"Simulated answer to: {prompt}"
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": "chatcmpl-b",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def _multipart_file(body: bytes) -> bytes:
    """The ``file`` field of a multipart/form-data body."""
    for part in body.split(b"\r\n--"):
        head, _, content = part.partition(b"\r\n\r\n")
        if b'name="file"' in head:
            return content.rsplit(b"\r\n", 1)[0] if content.endswith(b"\r\n") else content
    raise ValueError("no file field")
