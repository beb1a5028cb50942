"""The default HTTP transport: a lean HTTP/1.1 client on raw asyncio.

Owns the socket layer and nothing else: a keep-alive pool per (scheme, host, port), TLS,
HTTP/1.1 framing (Content-Length, chunked, read-until-close), gzip/deflate decoding and a
total timeout per request. It knows nothing about chat completions; ``client.py`` does.

Two ways in:

- ``Http11Transport.route(method, url, headers)`` pre-encodes the request line and the
  fixed headers of one URL once; ``Route.fetch(body, headers)`` then sends one request
  and returns ``(status, raw headers, decoded body)``. This is the client's hot path:
  no ``httpx.Request``, no ``httpx.Response``, one ``transport.write`` per request.
- The standard ``httpx.AsyncBaseTransport`` interface (``handle_async_request``), so
  ``httpx.AsyncClient(transport=Http11Transport(...))`` works too. There the body is
  returned as received and httpx decodes it, as with any httpx transport.

Why not aiohttp's ClientSession: per request it builds a ClientRequest, a ClientResponse, a
StreamReader, multidicts of headers, a URL and a timer, which costs about as much CPU as the
rest of our pipeline (see README, "How the request path is kept fast"). A connection here
is one ``asyncio.Protocol`` that parses the response in ``data_received`` and completes one
future; a request costs that future, one write and the parsing. Timeouts are enforced by
one watchdog timer per pool, not a timer per request.

Errors are httpx's: ``ConnectError`` / ``ConnectTimeout`` (no connection; a certificate
that fails verification is ``CertificateNotTrusted``, a ``ConnectError``), ``PoolTimeout``
(no free connection in time), ``ReadError`` (the connection failed or closed before the
response was complete), ``ReadTimeout`` (no complete response in time),
``RemoteProtocolError`` (not HTTP/1.x, parsed strictly), ``ResponseTooLarge`` (a body over
``max_response_bytes`` as received or as decoded, or more than two content codings),
``DecodingError`` (a body that does not decode). The connection of a failed request is
closed, never reused, and so is an idle connection that has bytes to read or was closed by
the server: it is checked before each reuse (one ``poll``), so a stray response can never be
taken for the answer to the next request. Nothing here logs, and no error text carries a
request header (the API key is one).

Proxies: given ``ProxySettings`` (``proxy.py``), a pool whose origin goes through a proxy
opens each connection with a ``CONNECT`` tunnel (for http and https targets alike) and
starts TLS over it with the target's host name; the proxy is named (credentials masked) in
connect errors.

Not supported: HTTP/2, pipelining, request
bodies sent as a stream (they are read whole first), brotli/zstd content encodings in
``fetch`` (only gzip and deflate are asked for).
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, cast

import aiohappyeyeballs
import httpx

from .proxy import Proxy, ProxySettings, ProxyUnreachable, open_tunnel

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "CertificateNotTrusted",
    "Http11Transport",
    "RawHeaders",
    "ResponseTooLarge",
    "Route",
    "join_capped",
]

RawHeaders = list[tuple[bytes, bytes]]
# (status, raw headers, body as received, content-coding or None)
_Response = tuple[int, RawHeaders, bytes, bytes | None]

ACCEPT_ENCODING = b"gzip, deflate"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
_MAX_LINE_BYTES = 8 * 1024  # one chunk-size or trailer line
# Largest body accepted, as received and as decoded: a chat completion is rarely over a few MB,
# and a gzip bomb or an endless body must not take the memory of the whole run.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_MAX_CODINGS = 2  # content codings stacked on one body ("gzip, gzip, ..." is a bomb)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]+")  # ASCII only: str.isdigit() also takes "1\u00b9"
# RFC 8305: start the next address (alternating IPv6/IPv4) if one has not connected in 250 ms
HAPPY_EYEBALLS_DELAY = 0.25
# Request headers this module writes itself from the URL and the body.
_COMPUTED = frozenset({b"host", b"content-length", b"transfer-encoding"})
# Response headers that decide framing, reuse and decoding.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"content-encoding"})

# Parser states of a connection.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class _ClosedBeforeResponse(httpx.ReadError):
    """The connection closed before any byte of the response arrived (maybe a stale one)."""


class ResponseTooLarge(httpx.RemoteProtocolError):
    """A body over the size cap (as received or decoded), or too many content codings."""


async def join_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A body read piece by piece (as decoded by httpx or aiohttp), refused with
    ``ResponseTooLarge`` as soon as it passes ``limit`` bytes."""
    pieces = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(
                f"response body decoded over {limit:,} bytes; "
                "raise --max-response-bytes if it is real"
            )
        pieces.append(chunk)
    return b"".join(pieces)


class CertificateNotTrusted(httpx.ConnectError):
    """The server's TLS certificate failed verification: it will fail the same way again."""


def _too_large(limit: int, what: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"response body {what} over {limit:,} bytes; raise --max-response-bytes if it is real"
    )


def _header_line(name: bytes, value: bytes) -> bytes:
    if b"\r" in name or b"\n" in name or b":" in name or b"\r" in value or b"\n" in value:
        # the header's value may be a secret: name it, never echo the value
        raise httpx.LocalProtocolError(f"invalid request header {name[:40]!r}")
    return b"%s: %s\r\n" % (name, value)


def decode_body(body: bytes, coding: bytes, limit: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
    """Undo a ``Content-Encoding`` (gzip, x-gzip, deflate, identity; comma-separated).

    At most two codings, and no step may decode to more than ``limit`` bytes
    (``ResponseTooLarge``): zlib stops at ``limit`` + 1 bytes, so a bomb costs no more.
    """
    tokens = [t for t in (t.strip().lower() for t in coding.split(b",")) if t not in _IDENTITY]
    if len(tokens) > _MAX_CODINGS:
        raise ResponseTooLarge(
            f"{len(tokens)} content codings stacked ({coding[:60]!r}); at most {_MAX_CODINGS}"
        )
    for token in reversed(tokens):
        try:
            if token in (b"gzip", b"x-gzip"):
                # RFC 1952 allows several gzip members in a row
                body = _inflate(body, 16 + zlib.MAX_WBITS, limit, members=True)
            elif token == b"deflate":
                try:
                    body = _inflate(body, zlib.MAX_WBITS, limit)
                except zlib.error:  # some servers send raw deflate without the zlib wrapper
                    body = _inflate(body, -zlib.MAX_WBITS, limit)
            else:
                raise httpx.DecodingError(f"unsupported Content-Encoding {token[:40]!r}")
        except zlib.error as exc:
            raise httpx.DecodingError(f"body does not decode as {token.decode()}: {exc}") from None
    return body


_IDENTITY = (b"identity", b"")


def _inflate(data: bytes, wbits: int, limit: int, *, members: bool = False) -> bytes:
    out = []
    size = 0
    while data:
        decoder = zlib.decompressobj(wbits)
        piece = decoder.decompress(data, limit + 1 - size)
        size += len(piece)
        if size > limit:
            raise _too_large(limit, "decoded")
        out.append(piece)
        if not decoder.eof:
            raise zlib.error("truncated stream")
        if not members:
            break
        data = decoder.unused_data.lstrip(b"\x00")
    return b"".join(out)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its response, completes a future.

    One request at a time (no pipelining). ``served`` counts complete responses, so a
    connection with ``served > 0`` is a reused one.
    """

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = False  # holds one of the pool's max_connections slots
        self.served = 0
        self.idle_since = 0.0
        self._waiter: asyncio.Future[_Response] | None = None
        self.deadline: float | None = None  # loop time by which the response must be complete
        self._total: float | None = None
        self._buffer = bytearray()
        self._state = _IDLE
        self._received = False
        self._reusable = True
        self._remaining = 0
        self._status = 0
        self._headers: RawHeaders = []
        self._coding: bytes | None = None
        self._chunks: list[bytes] = []
        self._head_only = False  # the request was a HEAD: its response has no body
        self._limit = pool.max_response_bytes
        self._body_bytes = 0  # of the response being read, as received (chunked, until close)
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
        if self._waiter is None:
            # bytes nobody asked for (we never pipeline): the stream is out of step
            self._close()
            return
        self._received = True
        self._buffer += data
        try:
            self._parse()
        except httpx.TransportError as exc:
            self._fail(exc)
        except Exception as exc:  # never out of a protocol callback: the request fails instead
            self._fail(httpx.RemoteProtocolError(f"unparseable response: {type(exc).__name__}"))

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
    ) -> asyncio.Future[_Response]:
        """Write one request; the future completes with its response or a transport error."""
        assert self.transport is not None
        loop = self.pool.loop
        waiter: asyncio.Future[_Response] = loop.create_future()
        self._waiter = waiter
        self._state = _HEAD
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
            self._fail(_ClosedBeforeResponse(f"cannot send: {type(exc).__name__}: {exc}"))
        return waiter

    def abandon(self, waiter: asyncio.Future[_Response]) -> None:
        """The caller stopped waiting (cancelled): the response would be out of step, close."""
        if self._waiter is waiter:
            self._waiter = None
            self._close(abort=True)

    def time_out(self) -> None:
        self._fail(httpx.ReadTimeout(f"no complete response within {self._total:g}s"))

    def _finish(self, body: bytes) -> None:
        waiter = self._waiter
        self._waiter = None
        self._state = _IDLE
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
            self._close()

    def _fail(self, exc: httpx.TransportError) -> None:
        waiter = self._waiter
        self._waiter = None
        self._state = _IDLE
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._close(abort=True)

    def _close(self, *, abort: bool = False) -> None:
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
        if self._waiter is None:
            self.pool.discard(self)  # an idle connection the server closed
            return
        if self._state == _UNTIL_CLOSE and exc is None:
            self._reusable = False
            self._finish(b"".join(self._chunks) + bytes(self._buffer))
            return
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if not self._received:
            self._fail(_ClosedBeforeResponse(f"connection closed before any response byte{reason}"))
        else:
            self._fail(httpx.ReadError(f"connection closed mid-response{reason}"))

    # -- response parsing --------------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                while buffer[:2] == b"\r\n":  # stray empty lines before a status line
                    del buffer[:2]
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD_BYTES:
                        raise httpx.RemoteProtocolError("response headers too large")
                    if buffer[:5] != b"HTTP/"[: len(buffer)]:
                        raise httpx.RemoteProtocolError(
                            f"not an HTTP/1.x response: {bytes(buffer[:40])!r}"
                        )
                    if b"\n\n" in buffer:
                        raise _bare_lf()
                    return
                head = bytes(buffer[:end])
                if head.count(b"\n") != head.count(b"\r\n"):
                    raise _bare_lf()
                del buffer[: end + 4]
                self._parse_head(head)
            elif state == _LENGTH:
                remaining = self._remaining
                if len(buffer) < remaining:
                    return
                body = bytes(buffer[:remaining])
                del buffer[:remaining]
                self._finish(body)
                return
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_LINE_BYTES:
                        raise httpx.RemoteProtocolError("chunk size line too long")
                    if b"\n" in buffer:
                        raise _bare_lf()
                    return
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                if not _HEX.fullmatch(size_text):
                    raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                self._body_bytes += size + end + 2
                if self._body_bytes > self._limit:
                    raise _too_large(self._limit, "as received (chunked)")
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not buffer:
                    return
                take = min(self._remaining, len(buffer))
                self._chunks.append(bytes(buffer[:take]))
                del buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_LINE_BYTES:
                        raise httpx.RemoteProtocolError("trailer line too long")
                    if b"\n" in buffer:
                        raise _bare_lf()
                    return
                del buffer[: end + 2]
                self._body_bytes += end + 2
                if self._body_bytes > self._limit:
                    raise _too_large(self._limit, "as received (chunked trailers)")
                if end == 0:  # the empty line that ends the trailers (which we ignore)
                    body = b"".join(self._chunks)
                    self._chunks = []
                    self._finish(body)
                    return
            else:  # _UNTIL_CLOSE: the body runs to the end of the stream
                if buffer:
                    self._body_bytes += len(buffer)
                    if self._body_bytes > self._limit:
                        raise _too_large(self._limit, "as received")
                    self._chunks.append(bytes(buffer))
                    buffer.clear()
                return

    def _parse_head(self, head: bytes) -> None:
        """Status line and headers; sets the framing state of the body that follows."""
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if (
            not version.startswith(b"HTTP/1.")
            or len(code) != 3
            or not code.isdigit()
            or rest[3:4] not in (b"", b" ")
        ):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
        status = int(code)
        headers: RawHeaders = []
        length: bytes | None = None
        transfer: bytes | None = None
        coding: bytes | None = None
        reusable = version == b"HTTP/1.1"  # an HTTP/1.0 server closes after each response
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding
                last_name, last_value = headers[-1]
                headers[-1] = (last_name, last_value + b" " + line.strip())
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1] in _SPACE_OR_TAB:
                # RFC 9112 5.1: no whitespace between a field name and its colon
                raise httpx.RemoteProtocolError(f"malformed response header line {line[:40]!r}")
            value = value.strip()
            headers.append((name, value))
            lowered = name.lower()
            if lowered in _FRAMING:
                if lowered == b"content-length":
                    if length is not None and length != value:
                        raise httpx.RemoteProtocolError("conflicting Content-Length headers")
                    length = value
                elif lowered == b"transfer-encoding":
                    transfer = value if transfer is None else transfer + b"," + value
                elif lowered == b"connection":
                    if b"close" in value.lower():
                        reusable = False
                else:
                    coding = value if coding is None else coding + b"," + value
        if 100 <= status < 200:
            if status == 101:
                raise httpx.RemoteProtocolError("101 Switching Protocols: no upgrade was asked")
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        self._status = status
        self._headers = headers
        self._coding = coding
        self._chunks = []
        self._body_bytes = 0
        if status in (204, 304) or self._head_only:
            self._reusable = reusable
            self._state = _LENGTH
            self._remaining = 0
        elif transfer is not None:
            if transfer.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
                self._state = _CHUNK_SIZE
                # RFC 9112 6.3: with both headers the message is suspect; do not reuse
                self._reusable = reusable and length is None
            else:
                self._state = _UNTIL_CLOSE
                self._reusable = False
        elif length is not None:
            if "," in (text := length.decode("latin-1")):  # "5, 5": a list of equal values
                values = {v.strip() for v in text.split(",")}
                if len(values) != 1:
                    raise httpx.RemoteProtocolError("conflicting Content-Length values")
                text = values.pop()
            if not _DIGITS.fullmatch(digits := text.encode("latin-1")):
                raise httpx.RemoteProtocolError(f"bad Content-Length {digits[:20]!r}")
            # checked up front: a huge body is refused before any of it is buffered
            if len(digits) > 19 or int(digits) > self._limit:
                raise _too_large(self._limit, f"(Content-Length {digits[:20].decode()})")
            self._remaining = int(digits)
            self._state = _LENGTH
            self._reusable = reusable
        else:
            self._state = _UNTIL_CLOSE
            self._reusable = False


_SPACE_OR_TAB = b" \t"


def _bare_lf() -> httpx.RemoteProtocolError:
    # RFC 9112 2.2 lets a recipient accept a bare LF; refusing it at once is as valid and
    # keeps one framing rule (CRLF) everywhere, instead of waiting for a CRLF till the timeout.
    return httpx.RemoteProtocolError("response line ended by a bare LF, not CRLF")


def _readability_check(fd: int) -> Any:
    """A no-argument callable, true when ``fd`` has something to read (~0.5 us a call)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return lambda: poller.poll(0)
    return lambda: select.select([fd], [], [], 0)[0]


class _Pool:
    """At most ``max_connections`` connections to one origin, idle ones kept for reuse.

    ``idle`` is a dict used as an ordered set: ``popitem()`` takes the most recently
    released connection (LIFO), so under light load few connections stay warm and the rest
    expire; the first item is the oldest, which the expiry sweep looks at.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        scheme: str,
        host: str,
        port: int,
        *,
        max_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        proxy: Proxy | None = None,
    ) -> None:
        self.loop = loop
        self.max_response_bytes = max_response_bytes
        self.proxy = proxy
        self.host = host
        self.port = port
        self.tls = scheme == "https"
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.opened = 0  # connections open or being opened
        self.idle: dict[_Connection, None] = {}
        self.all: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick = 1.0
        self._tick_for: float | None = None

    async def exchange(
        self, data: bytes, total: float | None, *, head_only: bool = False
    ) -> _Response:
        """Send one request (head and body in ``data``) and return its response."""
        loop = self.loop
        deadline = None if total is None else loop.time() + total
        connection = self._take_idle()
        if connection is None:
            connection = await self._acquire(deadline, total)
        retried = False
        while True:
            reused = connection.served > 0
            waiter = connection.send(data, deadline, total, head_only=head_only)
            try:
                return await waiter
            except _ClosedBeforeResponse:
                # A kept-alive connection the server closed while it was idle (its FIN on
                # the way as we wrote) fails before any byte of the response. Only then is
                # the request sent again, once, on a fresh connection: the server cannot
                # have answered it. (Chat requests are idempotent per row key in effect, but
                # a request that got any byte back is never resent here; retry.py decides.)
                if retried or not reused:
                    raise
                retried = True
            except asyncio.CancelledError:
                connection.abandon(waiter)
                raise
            connection = await self._acquire(deadline, total, fresh=True)

    def _take_idle(self) -> _Connection | None:
        idle = self.idle
        while idle:
            connection = idle.popitem()[0]
            if connection.closed:
                self.discard(connection)
                continue
            if self.loop.time() - connection.idle_since < self.keepalive_expiry:
                if connection.has_unread():  # a stray response or the server's close
                    connection._close(abort=True)
                    continue
                return connection
            # the most recent idle one has expired, so have all older ones
            connection._close()
            for stale in list(idle):
                stale._close()
        return None

    async def _acquire(
        self, deadline: float | None, total: float | None, *, fresh: bool = False
    ) -> _Connection:
        """An idle connection, a new one if a slot is free, else the next one released."""
        while True:
            if not fresh and (connection := self._take_idle()) is not None:
                return connection
            if self.opened < self.max_connections:
                return await self._connect(deadline, total)
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    handed = await waiter
            except BaseException as exc:  # timed out or cancelled
                if not waiter.done():
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    # woken just as we gave up: pass the connection (or the free slot) on
                    if (got := waiter.result()) is not None:
                        self.release(got)
                    else:
                        self._wake_one()
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout(
                        f"no free connection to {self.host}:{self.port} within {total:g}s "
                        f"({self.max_connections} in use)"
                    ) from None
                raise
            if handed is not None and not handed.closed:
                if not handed.has_unread():
                    return handed
                handed._close(abort=True)
            # a slot came free (or the handed connection died meanwhile): try again

    async def _connect(self, deadline: float | None, total: float | None) -> _Connection:
        self.opened += 1
        try:
            async with asyncio.timeout_at(deadline):
                connection = await self._open()
        except TimeoutError:
            self._slot_freed()
            via = f" through {self.proxy.described()}" if self.proxy is not None else ""
            raise httpx.ConnectTimeout(
                f"could not connect to {self.host}:{self.port}{via} within {total:g}s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            self._slot_freed()
            raise CertificateNotTrusted(
                f"TLS certificate of {self.host} not trusted: {exc.verify_message}"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS failure, TLS handshake failure
            self._slot_freed()
            raise httpx.ConnectError(
                f"cannot connect to {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from None
        except BaseException:
            self._slot_freed()
            raise
        connection.counted = True
        if connection.closed:  # lost during the handshake
            connection.pool.discard(connection)
            raise httpx.ConnectError(f"connection to {self.host}:{self.port} closed at once")
        self.all.add(connection)
        return connection

    async def _open(self) -> _Connection:
        # Happy Eyeballs by hand: uvloop's create_connection has no happy_eyeballs_delay, and
        # without it a host whose IPv6 route drops packets would hang every new connection
        # until the timeout. aiohappyeyeballs races the addresses and returns the socket.
        loop = self.loop
        proxy = self.proxy
        if proxy is not None:
            sock = await self._open_tunnel(proxy)
        else:
            infos = await resolve(loop, self.host, self.port)
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
            )
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self),
                sock=sock,
                ssl=self.ssl_context if self.tls else None,
                server_hostname=self.host if self.tls else None,
            )
        except BaseException:
            sock.close()  # the loop did not take it (as aiohttp does; see uvloop#653)
            raise
        return connection

    async def _open_tunnel(self, proxy: Proxy) -> socket.socket:
        """A socket to the proxy on which CONNECT to our origin succeeded (TLS comes next,
        with the origin's host name). Errors name the proxy, never its credentials."""
        loop = self.loop
        failure: httpx.ProxyError | None = None
        try:
            infos = await resolve(loop, proxy.host, proxy.port)
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
            )
        except OSError as exc:
            failure = ProxyUnreachable(
                f"cannot connect to {proxy.described()}: {type(exc).__name__}: {exc}"
            )
        if failure is not None:
            raise failure
        try:
            await open_tunnel(loop, sock, proxy, self.host, self.port)
        except OSError as exc:
            failure = httpx.ProxyError(
                f"{proxy.described()} dropped the connection during CONNECT to "
                f"{self.host}:{self.port}: {type(exc).__name__}: {exc}"
            )
        except BaseException:
            sock.close()
            raise
        if failure is not None:
            sock.close()
            raise failure
        return sock

    def watch(self, total: float | None) -> None:
        """Make sure the watchdog runs while a request with this total timeout is in flight.

        One periodic timer per pool instead of one per request: on uvloop a timer costs
        ~3-4 us to create and cancel, more than parsing a response. It ticks every
        total/20 (at most 1 s, at least 5 ms), so a request times out between ``total`` and
        ``total`` + 5% (60 s: within 61 s); it stops when nothing is in flight.
        """
        if total != self._tick_for and total is not None:
            self._tick_for = total
            self._tick = min(self._tick, 1.0, max(0.005, total / 20))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self._tick, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        waiting = False
        for connection in list(self.all):
            deadline = connection.deadline
            if connection._waiter is None or deadline is None:
                continue
            if deadline <= now:
                connection.time_out()
            else:
                waiting = True
        if waiting:
            self._watchdog = self.loop.call_later(self._tick, self._check_deadlines)

    def release(self, connection: _Connection) -> None:
        """A connection finished a response and may be reused: hand it on or keep it idle."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = self.loop.time()
        self.idle[connection] = None
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_expiry, self._expire)

    def discard(self, connection: _Connection) -> None:
        """A connection is closing: free its slot (once) and forget it."""
        self.idle.pop(connection, None)
        if connection.counted:
            connection.counted = False
            self.all.discard(connection)
            self._slot_freed()

    def _slot_freed(self) -> None:
        self.opened -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """Tell the first waiter that a slot is free (it will open a connection)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        """Close idle connections older than ``keepalive_expiry``; re-arm for the rest."""
        self._sweep = None
        now = self.loop.time()
        for connection in list(self.idle):
            if now - connection.idle_since < self.keepalive_expiry:
                self._sweep = self.loop.call_at(
                    connection.idle_since + self.keepalive_expiry, self._expire
                )
                return
            connection._close()

    def close(self) -> None:
        for timer in (self._sweep, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._sweep = self._watchdog = None
        for connection in list(self.all):
            if connection._waiter is not None:
                connection._fail(httpx.ReadError("the transport was closed"))
            else:
                connection._close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the transport was closed"))
        self._waiters.clear()


class Route:
    """Requests to one URL with one method and fixed headers, encoded once.

    ``fetch`` adds the per-request headers and ``Content-Length`` to the pre-encoded block
    and sends head and body in one write.
    """

    def __init__(
        self, transport: Http11Transport, method: str, url: httpx.URL, headers: RawHeaders
    ) -> None:
        self._transport = transport
        self._key = _origin(url)
        self._pool: _Pool | None = None
        self._head = _request_head(method, url, headers)

    async def fetch(
        self,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        *,
        total: float | None = None,
    ) -> tuple[int, RawHeaders, bytes]:
        """Send one request; return (status, raw headers, body decoded from gzip/deflate).

        ``total`` (seconds) bounds the whole request: waiting for a connection, connecting, sending
        and reading the complete response.
        """
        pool = self._pool
        if pool is None or pool.loop is not asyncio.get_running_loop():
            pool = self._pool = self._transport._pool(self._key)
        head = b"".join([self._head, *[_header_line(k, v) for k, v in headers]])
        data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        status, raw_headers, content, coding = await pool.exchange(data, total)
        if coding is not None:
            content = decode_body(content, coding, pool.max_response_bytes)
        return status, raw_headers, content


class Http11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive pool of at most ``max_connections`` per (scheme, host, port).

    Fields:
        max_connections: connections per origin, open or being opened.
        keepalive_expiry: seconds an idle connection is kept for reuse.
        ssl_context: for https; default ``ssl.create_default_context()`` (system CAs, or
            ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set), ALPN ``http/1.1``, the host
            checked against subjectAltName only (a certificate naming it only in its CN is
            refused, as by urllib3 2 and browsers).
        max_response_bytes: the largest body accepted, as received and as decoded by
            ``fetch``; a larger one is ``ResponseTooLarge`` (a Content-Length over it at once).
        proxies: the proxy of each origin (``proxy.settings_from``); None: all direct.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        proxies: ProxySettings | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_response_bytes = max_response_bytes
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self.proxies = proxies
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    def route(
        self, method: str, url: httpx.URL | str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> Route:
        """A pre-encoded request template for ``fetch``-ing ``url`` over and over.

        Asks for gzip/deflate (which ``Route.fetch`` decodes) unless ``headers`` name their
        own Accept-Encoding.
        """
        return Route(self, method, httpx.URL(url), _with_accept_encoding(headers))

    async def fetch(self, request: httpx.Request) -> tuple[int, RawHeaders, bytes]:
        """Send an ``httpx.Request``; return (status, raw headers, decoded body).

        Asks for gzip/deflate unless the request names its own Accept-Encoding.
        ``request.extensions["timeout"]["total"]`` (else ``"read"``) bounds the whole request.
        """
        status, raw_headers, content, coding = await self._send(request, accept_encoding=True)
        if coding is not None:
            content = decode_body(content, coding, self.max_response_bytes)
        return status, raw_headers, content

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        status, raw_headers, content, _ = await self._send(request, accept_encoding=False)
        # the body as received: httpx.Response decodes it by its Content-Encoding
        return httpx.Response(
            status,
            headers=raw_headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _send(self, request: httpx.Request, *, accept_encoding: bool) -> _Response:
        body = await request.aread()
        headers = request.headers.raw
        if accept_encoding:
            headers = _with_accept_encoding(headers)
        head = _request_head(request.method, request.url, headers)
        if body or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head += b"Content-Length: %d\r\n" % len(body)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        total = timeouts.get("total", timeouts.get("read"))
        pool = self._pool(_origin(request.url))
        data = head + b"\r\n" + body
        return await pool.exchange(data, total, head_only=request.method == "HEAD")

    def _pool(self, key: tuple[str, str, int]) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(key)
        if pool is None or pool.loop is not loop:
            # a pool belongs to the loop its connections were made on
            scheme, host, port = key
            context = self._get_ssl_context() if scheme == "https" else None
            pool = self._pools[key] = _Pool(
                loop,
                scheme,
                host,
                port,
                max_connections=self.max_connections,
                keepalive_expiry=self.keepalive_expiry,
                ssl_context=context,
                max_response_bytes=self.max_response_bytes,
                proxy=self.proxies.for_url(scheme, host, port) if self.proxies else None,
            )
        return pool

    def _get_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # created once: loading the CA store takes milliseconds
            context = ssl.create_default_context()
            context.hostname_checks_common_name = False
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[tuple[Any, ...]]:
    """The addresses to try for ``host:port`` (``getaddrinfo``; a seam for tests)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no address")
    return list(infos)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    scheme = url.scheme
    if scheme not in _DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r} (http or https)")
    host = url.raw_host.decode("ascii")  # IDNA-encoded, IPv6 without brackets
    return scheme, host, url.port or _DEFAULT_PORTS[scheme]


def _with_accept_encoding(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    headers = list(headers)
    if not any(name.lower() == b"accept-encoding" for name, _ in headers):
        headers.append((b"Accept-Encoding", ACCEPT_ENCODING))
    return headers


def _request_head(method: str, url: httpx.URL, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Request line, Host and ``headers`` (minus the ones computed per request), CRLF-ended."""
    target = url.raw_path or b"/"
    parts = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target)]
    host = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"host":
            host = value
        elif lowered not in _COMPUTED:
            parts.append(_header_line(name, value))
    parts.insert(1, _header_line(b"Host", host if host is not None else url.netloc))
    return b"".join(parts)
