"""One keep-alive HTTP/1.1 connection: an ``asyncio.Protocol`` that writes a request, feeds
what arrives to its ``parser.ResponseParser`` and completes one future per request with the
response or a transport error (closing the connection after any failure).

It does not parse (``parser.py``), choose, open, reuse or time out connections
(``pool.py``), and it does not decode bodies (``decoding.py``): a response is (status,
raw headers, body as received, content-coding).
"""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING, Any, cast

import httpx

from .errors import ClosedBeforeResponse
from .parser import HEAD, IDLE, UNTIL_CLOSE, RawHeaders, ResponseParser

if TYPE_CHECKING:
    from .pool import Pool

# (status, raw headers, body as received, content-coding or None)
Response = tuple[int, RawHeaders, bytes, bytes | None]


class Connection(ResponseParser, asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its response, completes a future.

    One request at a time (no pipelining). ``served`` counts complete responses, so a
    connection with ``served > 0`` is a reused one.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool.max_response_bytes)
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = False  # holds one of the pool's max_connections slots
        self.served = 0
        self.idle_since = 0.0
        self.waiter: asyncio.Future[Response] | None = None
        self.deadline: float | None = None  # loop time by which the response must be complete
        self._total: float | None = None
        self._received = False
        self._readable: Any = None  # () -> true when the socket has bytes or an EOF to read

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._readable = _readability_check(sock.fileno())

    def has_unread(self) -> bool:
        """True when the idle socket has bytes (or the server's EOF) that nobody read yet.

        A busy loop may not have run our reader since a stray response or a close arrived;
        sending on such a connection would take those bytes for the answer to our request.
        """
        return self._readable is not None and bool(self._readable())

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # bytes nobody asked for (we never pipeline): the stream is out of step
            self.close()
            return
        self._received = True
        self._buffer += data
        try:
            self._parse()
        except httpx.TransportError as exc:
            self.fail(exc)
        except Exception as exc:  # never out of a protocol callback: the request fails instead
            self.fail(httpx.RemoteProtocolError(f"unparseable response: {type(exc).__name__}"))

    def eof_received(self) -> bool | None:
        self._end_of_stream(None)
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_of_stream(exc)
        self.closed = True
        self.pool.discard(self)

    # -- requests ----------------------------------------------------------------------------

    def send(
        self, data: bytes, deadline: float | None, total: float | None, *, head_only: bool = False
    ) -> asyncio.Future[Response]:
        """Write one request; the future completes with its response or a transport error."""
        assert self.transport is not None
        loop = self.pool.loop
        waiter: asyncio.Future[Response] = loop.create_future()
        self.waiter = waiter
        self._state = HEAD
        self._received = False
        self._reusable = True
        self._coding = None
        self._head_only = head_only
        self.deadline = deadline
        if deadline is not None:
            self._total = total
            self.pool.watch(total)
        try:
            # head and body in one write (TCP_NODELAY is set by asyncio and uvloop alike)
            self.transport.write(data)
        except (OSError, RuntimeError) as exc:  # a transport that is already closing
            self.fail(ClosedBeforeResponse(f"cannot send: {type(exc).__name__}: {exc}"))
        return waiter

    def abandon(self, waiter: asyncio.Future[Response]) -> None:
        """The caller stopped waiting (cancelled): the response would be out of step, close."""
        if self.waiter is waiter:
            self.waiter = None
            self.close(abort=True)

    def time_out(self) -> None:
        self.fail(httpx.ReadTimeout(f"no complete response within {self._total:g}s"))

    def _finish(self, body: bytes) -> None:
        waiter = self.waiter
        self.waiter = None
        self._state = IDLE
        self.served += 1
        if self._buffer:
            # more than one response's worth of bytes: do not trust this stream again
            self._reusable = False
            self._buffer.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, self._headers, body, self._coding))
        if self._reusable and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def fail(self, exc: httpx.TransportError) -> None:
        waiter = self.waiter
        self.waiter = None
        self._state = IDLE
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close(abort=True)

    def close(self, *, abort: bool = False) -> None:
        self.pool.discard(self)
        self._buffer.clear()
        if self.transport is not None and not self.closed:
            self.closed = True
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _end_of_stream(self, exc: Exception | None) -> None:
        """The server closed (or reset) the connection: end or fail the response in flight."""
        self.closed = True
        if self.waiter is None:
            self.pool.discard(self)  # an idle connection the server closed
            return
        if self._state == UNTIL_CLOSE and exc is None:
            self._reusable = False
            self._finish(b"".join(self._chunks) + bytes(self._buffer))
            return
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if not self._received:
            self.fail(ClosedBeforeResponse(f"connection closed before any response byte{reason}"))
        else:
            self.fail(httpx.ReadError(f"connection closed mid-response{reason}"))


def _readability_check(fd: int) -> Any:
    """A no-argument callable, true when ``fd`` has something to read (~0.5 us a call)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return lambda: poller.poll(0)
    return lambda: select.select([fd], [], [], 0)[0]
