"""One keep-alive HTTP/1.1 connection: an ``asyncio.Protocol`` that writes a request and
parses its response strictly (status line, headers, Content-Length / chunked / until-close
framing, size caps), completing one future per request.

It does not choose, open, reuse or time out connections (``pool.py``), and it does not
decode bodies (``decoding.py``): a response is (status, raw headers, body as received,
content-coding).
"""

from __future__ import annotations

import asyncio
import re
import select
from typing import TYPE_CHECKING, Any, cast

import httpx

from .errors import ClosedBeforeResponse, too_large

if TYPE_CHECKING:
    from .pool import Pool

RawHeaders = list[tuple[bytes, bytes]]
# (status, raw headers, body as received, content-coding or None)
Response = tuple[int, RawHeaders, bytes, bytes | None]

_MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
_MAX_LINE_BYTES = 8 * 1024  # one chunk-size or trailer line
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]+")  # ASCII only: str.isdigit() also takes "1\u00b9"
# Response headers that decide framing, reuse and decoding.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"content-encoding"})

# Parser states of a connection.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its response, completes a future.

    One request at a time (no pipelining). ``served`` counts complete responses, so a
    connection with ``served > 0`` is a reused one.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = False  # holds one of the pool's max_connections slots
        self.served = 0
        self.idle_since = 0.0
        self.waiter: asyncio.Future[Response] | None = None
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
            self.close()

    def fail(self, exc: httpx.TransportError) -> None:
        waiter = self.waiter
        self.waiter = None
        self._state = _IDLE
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
        if self._state == _UNTIL_CLOSE and exc is None:
            self._reusable = False
            self._finish(b"".join(self._chunks) + bytes(self._buffer))
            return
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if not self._received:
            self.fail(ClosedBeforeResponse(f"connection closed before any response byte{reason}"))
        else:
            self.fail(httpx.ReadError(f"connection closed mid-response{reason}"))

    # -- response parsing --------------------------------------------------------------------

    def _parse(self) -> None:
        """Consume what the buffer holds, state by state, until more bytes are needed."""
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                if not self._take_head(buffer):
                    return
            elif state == _LENGTH:
                remaining = self._remaining
                if len(buffer) < remaining:
                    return
                body = bytes(buffer[:remaining])
                del buffer[:remaining]
                self._finish(body)
                return
            elif state == _CHUNK_SIZE:
                if not self._take_chunk_size(buffer):
                    return
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
                if not self._take_trailer_line(buffer):
                    return
            else:  # _UNTIL_CLOSE: the body runs to the end of the stream
                if buffer:
                    self._body_bytes += len(buffer)
                    if self._body_bytes > self._limit:
                        raise too_large(self._limit, "as received")
                    self._chunks.append(bytes(buffer))
                    buffer.clear()
                return

    def _take_head(self, buffer: bytearray) -> bool:
        """Status line and headers, if all arrived (True); False: more bytes are needed."""
        while buffer[:2] == b"\r\n":  # stray empty lines before a status line
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("response headers too large")
            if buffer[:5] != b"HTTP/"[: len(buffer)]:
                raise httpx.RemoteProtocolError(f"not an HTTP/1.x response: {bytes(buffer[:40])!r}")
            if b"\n\n" in buffer:
                raise _bare_lf()
            return False
        head = bytes(buffer[:end])
        if head.count(b"\n") != head.count(b"\r\n"):
            raise _bare_lf()
        del buffer[: end + 4]
        self._parse_head(head)
        return True

    def _take_chunk_size(self, buffer: bytearray) -> bool:
        """A chunk-size line, if it arrived (True); False: more bytes are needed."""
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > _MAX_LINE_BYTES:
                raise httpx.RemoteProtocolError("chunk size line too long")
            if b"\n" in buffer:
                raise _bare_lf()
            return False
        size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
        del buffer[: end + 2]
        if not _HEX.fullmatch(size_text):
            raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        self._body_bytes += size + end + 2
        if self._body_bytes > self._limit:
            raise too_large(self._limit, "as received (chunked)")
        if size == 0:
            self._state = _TRAILERS
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return True

    def _take_trailer_line(self, buffer: bytearray) -> bool:
        """A trailer line (ignored), if it arrived; False when more bytes are needed or the
        empty line ended the response."""
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > _MAX_LINE_BYTES:
                raise httpx.RemoteProtocolError("trailer line too long")
            if b"\n" in buffer:
                raise _bare_lf()
            return False
        del buffer[: end + 2]
        self._body_bytes += end + 2
        if self._body_bytes > self._limit:
            raise too_large(self._limit, "as received (chunked trailers)")
        if end == 0:  # the empty line that ends the trailers (which we ignore)
            body = b"".join(self._chunks)
            self._chunks = []
            self._finish(body)
            return False
        return True

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
                raise too_large(self._limit, f"(Content-Length {digits[:20].decode()})")
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
