"""The simulator's socket layer (one ``Connection`` per client: HTTP/1.1 parsing, keep-alive)
and how it runs: ``SimulatorThread`` in a background thread, ``run_simulator`` in the
foreground."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

from .config import MAX_BODY_BYTES, MAX_HEADER_BYTES, log

if TYPE_CHECKING:  # the app makes connections; a connection only calls back into it
    from .app import Simulator
from .directives import DROP, STALL, WRITE, Reply, http_response, openai_error_body


class Connection(asyncio.Protocol):
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
        self._replies: deque[Reply] = deque()
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
                    if len(buffer) > MAX_HEADER_BYTES:
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
                error = openai_error_body(500, "The simulator itself failed; see its log.")
                reply = Reply(0.0, WRITE, http_response(500, error, [], keep_alive=False), True)
            self._enqueue(reply)

    def eof_received(self) -> bool | None:
        # The client half-closed: finish queued replies unless one of them never comes.
        self._reading = False
        if not self._replies or any(reply.action == STALL for reply in self._replies):
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
        if length > MAX_BODY_BYTES:
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
        body = openai_error_body(status, message)
        self._enqueue(Reply(0.0, WRITE, http_response(status, body, [], keep_alive=False), True))

    def _enqueue(self, reply: Reply) -> None:
        if reply.close or reply.action == DROP:
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
            if reply.action == STALL:
                return  # never answered; anything pipelined behind it waits forever too
            if reply.ready_at > loop.time():
                self._timer = loop.call_at(reply.ready_at, self._pump)
                return
            replies.popleft()
            if reply.action == WRITE:
                transport.write(reply.data)
            if reply.close or reply.action == DROP:
                self._closed = True
                replies.clear()
                transport.close()  # flushes what was written before, then FIN
                return
