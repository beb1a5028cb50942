"""``Simulator``: the request handler: routes a parsed request (chat, models, health, the
Batch APIs), applies faults, rate limits and latency, records and logs requests."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

from pipeline.batch_service import DROPPED, BatchService

from .answers import (
    choose_answers,
    completion_body,
    validation_problem,
)
from .config import (
    CHAT_PATHS,
    CLIENT_REQUEST_ID,
    DEFAULT_CONFIG,
    MODELS,
    RecordedRequest,
    SimulatorConfig,
    TokenBucket,
    dumps,
    format_go_duration,
    loads,
    message_text,
)
from .directives import (
    DROP,
    QUOTA_MESSAGE,
    STALL,
    WRITE,
    DirectiveError,
    Directives,
    Reply,
    aimlapi_error_body,
    http_response,
    openai_error_body,
    parse_directives,
)
from .response import ChatResponse
from .server import Connection


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
        self.wrong_counts: Counter[str] = Counter()  # wrong=N bookkeeping per conversation
        self.rng = random.Random(config.seed)
        self._rps_bucket: TokenBucket | None = None
        self._tpm_bucket: TokenBucket | None = None
        self._first_chat: float | None = None  # loop time of the first chat request
        self._sequence = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[Connection] = set()
        self._log_file: IO[str] | None = None
        self._log_path: str | None = None
        self.batches = BatchService(self.answer_chat, time.time, config.batch)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the bound port."""
        if self._server is not None:
            raise RuntimeError("Simulator is already started")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, backlog=1024
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
        self.wrong_counts.clear()
        self._rps_bucket = None
        self._tpm_bucket = None
        self._first_chat = None
        self.rng = random.Random(self.config.seed)
        self.batches = BatchService(self.answer_chat, time.time, self.config.batch)

    # -- request handling -------------------------------------------------------------------

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> Reply:
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
                return Reply(now, DROP, b"", True)
            content_type = dict(reply_headers).get("content-type", "application/json")
            extra = [(k, v) for k, v in reply_headers if k != "content-type"]
            data = http_response(
                status, payload, extra, keep_alive=keep_alive, content_type=content_type
            )
            return Reply(now, WRITE, data, not keep_alive)
        if path in CHAT_PATHS and method == "POST":
            return self._chat(path, headers, body, keep_alive, now)
        if method == "GET" and path == "/health":
            data = http_response(200, b"ok", [], keep_alive=keep_alive, content_type="text/plain")
            return Reply(now, WRITE, data, not keep_alive)
        if method == "GET" and path in ("/v1/models", "/models"):
            models = {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 1677610602, "owned_by": "simulator"}
                    for name in MODELS
                ],
            }
            data = http_response(200, dumps(models), [], keep_alive=keep_alive)
            return Reply(now, WRITE, data, not keep_alive)
        self.stats["404"] += 1
        body_bytes = openai_error_body(404, f"Invalid URL ({method} {path})")
        data = http_response(404, body_bytes, [], keep_alive=keep_alive)
        return Reply(now, WRITE, data, not keep_alive)

    def _chat(
        self, path: str, headers: dict[str, str], raw: bytes, keep_alive: bool, now: float
    ) -> Reply:
        self.stats["requests"] += 1
        self._sequence += 1
        wall_time = time.time()
        body = self._receive(path, headers, raw, wall_time)
        out = self._response(headers, now, wall_time, keep_alive)
        refused = self._refusal(path, headers, body, now, out)
        if refused is not None or body is None:
            return refused or out.reply(400, openai_error_body(400))
        messages: list[Any] = body["messages"]
        texts = [message_text(message) for message in messages]
        try:
            directive = parse_directives(texts)
        except DirectiveError as exc:
            return out.reply(400, openai_error_body(400, f"simulator directive: {exc}"))
        force_length = False
        if directive is not None:
            out.delay_ms += directive.sleep_ms
            force_length = directive.length
            fault = self._directive_due(directive, texts)
            if fault is not None:
                if directive.retry_after is not None:
                    out.retry_after(directive.retry_after, as_date=directive.retry_after_date)
                return self._directive_fault(directive, fault, path, out.reply)
        faulty = self._random_fault(out)
        if isinstance(faulty, Reply):
            return faulty
        malformed, force_length = faulty[0], force_length or faulty[1]
        answers = choose_answers(self, body, messages, texts, directive)
        completion, total_tokens = completion_body(
            body, texts, answers, self._sequence, wall_time, force_length
        )
        return self._deliver(completion, total_tokens, malformed, now, out)

    def _receive(
        self, path: str, headers: dict[str, str], raw: bytes, wall_time: float
    ) -> dict[str, Any] | None:
        """The body as JSON (None when it is not an object), recorded and logged."""
        config = self.config
        body: dict[str, Any] | None
        try:
            parsed = loads(raw)
            body = parsed if isinstance(parsed, dict) else None
        except ValueError:
            body = None
        client_request_id = headers.get("x-client-request-id")
        if config.record:
            self.requests.append(RecordedRequest(wall_time, path, headers, body))
        if config.request_log:
            self._write_log(config.request_log, wall_time, body, client_request_id, "POST", path)
        return body

    def _response(
        self, headers: dict[str, str], now: float, wall_time: float, keep_alive: bool
    ) -> ChatResponse:
        config = self.config
        reply_headers = [("x-inference-id", f"sim-inference-{self._sequence}")]
        client_request_id = headers.get("x-client-request-id")
        if client_request_id and CLIENT_REQUEST_ID.fullmatch(client_request_id):
            reply_headers.append(("x-client-request-id", client_request_id))
        # Always one draw (two with jitter) per request, so a seed replays the same faults.
        roll = self.rng.random()
        delay_ms = config.latency_ms
        if config.latency_jitter_ms:
            delay_ms += self.rng.uniform(-config.latency_jitter_ms, config.latency_jitter_ms)
        return ChatResponse(self, reply_headers, roll, delay_ms, now, wall_time, keep_alive)

    def _refusal(
        self,
        path: str,
        headers: dict[str, str],
        body: dict[str, Any] | None,
        now: float,
        out: ChatResponse,
    ) -> Reply | None:
        """401 for a wrong key, 400 for a body the API refuses, 429 beyond --rps-limit."""
        expected_auth = self.config.require_api_key
        if expected_auth is not None and headers.get("authorization") != f"Bearer {expected_auth}":
            message = (
                "You didn't provide an API key."
                if "authorization" not in headers
                else "Incorrect API key provided."
            )
            return out.reply(401, openai_error_body(401, message))
        problem = validation_problem(body)
        if problem is not None or body is None:
            return out.reply(
                400, aimlapi_error_body(400, path, f"Body validation error! {problem}")
            )
        if body.get("stream") is True:
            message = "The simulator does not implement streaming; send stream=false."
            return out.reply(400, openai_error_body(400, message, param="stream"))
        if self._first_chat is None:
            self._first_chat = now
        rps_limit = self._rps_limit(now)
        if rps_limit is not None:
            wait = self._rps(rps_limit, now).take(1, now)
            if wait > 0:
                out.retry_after(wait, round_up=True)
                message = (
                    f"Rate limit reached for requests per second: limit {rps_limit:g}. "
                    f"Please try again in {format_go_duration(wait)}."
                )
                return out.reply(429, openai_error_body(429, message))
        return None

    def _directive_due(self, directive: Directives, texts: list[str]) -> str | None:
        """The directive's fault, unless ``fail=N`` says this prompt has failed enough."""
        fault = directive.fault
        if fault is not None and directive.fail is not None:
            prompt_key = "\x00".join(texts)
            self._attempts[prompt_key] += 1
            if self._attempts[prompt_key] > directive.fail:
                fault = None
        return fault

    def _random_fault(self, out: ChatResponse) -> Reply | tuple[bool, bool]:
        """A random fault's reply, or (malformed, force_length) for the answer: the rates
        laid end to end on one draw (see the package docstring)."""
        config, roll = self.config, out.roll
        threshold = config.rate_429
        if roll < threshold:
            out.retry_after(config.retry_after_s)
            return out.reply(429, openai_error_body(429))
        threshold += config.rate_500
        if roll < threshold:
            return out.reply(500, openai_error_body(500))
        threshold += config.rate_503
        if roll < threshold:
            return out.reply(503, openai_error_body(503))
        threshold += config.rate_timeout
        if roll < threshold:
            return out.reply(200, b"", STALL, "timeout")
        threshold += config.rate_drop
        if roll < threshold:
            return out.reply(200, b"", DROP, "drop")
        threshold += config.rate_malformed
        malformed = roll < threshold
        threshold += config.rate_length
        return malformed, not malformed and roll < threshold

    def _deliver(
        self,
        completion: dict[str, Any],
        total_tokens: int,
        malformed: bool,
        now: float,
        out: ChatResponse,
    ) -> Reply:
        """The answer, unless --tpm-limit refuses it; a malformed one is cut in half."""
        tpm_limit = self.config.tpm_limit
        if tpm_limit is not None:
            wait = self._tpm(tpm_limit, now).take(total_tokens, now)
            if wait > 0:
                out.retry_after(wait, round_up=True)
                message = (
                    f"Rate limit reached for tokens per min (TPM): limit {tpm_limit}, "
                    f"requested {total_tokens}. Please try again in {format_go_duration(wait)}."
                )
                return out.reply(429, openai_error_body(429, message))
        payload = dumps(completion)
        if malformed:
            # Any strict prefix of a JSON object is invalid JSON, yet the HTTP framing is valid.
            return out.reply(200, payload[: len(payload) // 2], WRITE, "malformed")
        if completion["choices"][0]["finish_reason"] == "length":
            self.stats["length"] += 1
        return out.reply(200, payload)

    def answer_chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A batch line's answer: the online answer, without transport faults, limits or delay.

        Directive faults that are HTTP statuses (``status=S``, ``quota``, ``context_length``)
        answer that status and OpenAI error body; the transport ones (timeout, drop,
        malformed) cannot happen inside a batch and are ignored.
        """
        problem = validation_problem(body)
        if problem is not None:
            return 400, loads(openai_error_body(400, f"Body validation error! {problem}"))
        messages: list[Any] = body["messages"]
        texts = [message_text(message) for message in messages]
        try:
            directive = parse_directives(texts)
        except DirectiveError as exc:
            return 400, loads(openai_error_body(400, f"simulator directive: {exc}"))
        if directive is not None and directive.fault in ("status", "aimlapi", "quota"):
            replies: list[tuple[int, bytes]] = []

            def capture(status: int, payload: bytes, *_: Any, **__: Any) -> Reply:
                replies.append((status, payload))
                return Reply(0.0, WRITE)

            self._directive_fault(directive, directive.fault, "/v1/chat/completions", capture)
            status, payload = replies[0]
            return status, loads(payload)
        self._sequence += 1
        answers = choose_answers(self, body, messages, texts, directive)
        length = directive is not None and directive.length
        completion, _ = completion_body(body, texts, answers, self._sequence, time.time(), length)
        return 200, completion

    def _directive_fault(
        self, directive: Directives, fault: str, path: str, reply: Callable[..., Reply]
    ) -> Reply:
        status = directive.status
        if fault == "status":
            if directive.context_length:
                message = (
                    "This model's maximum context length is 16385 tokens. However, your "
                    "messages resulted in more tokens. Please reduce the length of the messages."
                )
                body = openai_error_body(
                    status, message, code="context_length_exceeded", param="messages"
                )
            else:
                body = openai_error_body(status)
            return reply(status, body)
        if fault == "aimlapi":
            return reply(status, aimlapi_error_body(status, path))
        if fault == "quota":
            body = openai_error_body(
                429, QUOTA_MESSAGE, error_type="insufficient_quota", code="insufficient_quota"
            )
            return reply(429, body)
        if fault == "timeout":
            return reply(200, b"", STALL, "timeout")
        if fault == "drop":
            return reply(200, b"", DROP, "drop")
        data = b'{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"ind'
        return reply(200, data, WRITE, "malformed")

    def _rps_limit(self, now: float) -> float | None:
        """The request limit in force: the schedule's latest step, else ``rps_limit``."""
        config = self.config
        limit = config.rps_limit
        since = now - (self._first_chat if self._first_chat is not None else now)
        for at, rate in config.rps_schedule:
            if since >= at:
                limit = rate
        return limit

    def _rps(self, limit: float, now: float) -> TokenBucket:
        bucket = self._rps_bucket
        capacity = self.config.rps_burst or max(1.0, limit)
        if bucket is None:
            bucket = self._rps_bucket = TokenBucket(limit, capacity, capacity, now)
        elif bucket.rate != limit or bucket.capacity != capacity:
            bucket._refill(now)  # what the old rate earned until now, then the new rate
            bucket.rate, bucket.capacity = limit, capacity
            bucket.tokens = min(bucket.tokens, capacity)
        return bucket

    def _tpm(self, limit: int, now: float) -> TokenBucket:
        bucket = self._tpm_bucket
        if bucket is None or bucket.capacity != limit:
            bucket = self._tpm_bucket = TokenBucket(limit / 60, limit, limit, now)
        return bucket

    def rate_limit_headers(self, config: SimulatorConfig, now: float) -> list[tuple[str, str]]:
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
        line = dumps(record | {"client_request_id": client_id})
        # Flushed per line: tests tail this file from another process while the run is live.
        self._log_file.write(line.decode() + "\n")
        self._log_file.flush()
