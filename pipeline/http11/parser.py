"""The strict HTTP/1.1 response parser a connection is built on.

Owns framing: the status line and headers (1xx skipped, no whitespace before a colon, CRLF
only), Content-Length / chunked / read-until-close bodies, whether the connection may be
reused afterwards, and the size cap as received. ``ResponseParser`` keeps the state of the
response being read and calls ``_finish(body)`` when it is complete; it does no I/O,
decoding (``decoding.py``) or error delivery (``connection.py``).
"""

from __future__ import annotations

import re

import httpx

from .errors import too_large

RawHeaders = list[tuple[bytes, bytes]]

_MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
_MAX_LINE_BYTES = 8 * 1024  # one chunk-size or trailer line
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]+")  # ASCII only: str.isdigit() also takes "1\u00b9"
# Response headers that decide framing, reuse and decoding.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"content-encoding"})

# Parser states of a connection (IDLE: no request in flight).
IDLE, HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, UNTIL_CLOSE = range(8)


class ResponseParser:
    """Parses the response to the request in flight from ``_buffer``, state by state.

    Fields: ``_state`` (one of the states above), ``_status``, ``_headers``, ``_coding``
    (Content-Encoding or None) of the response; ``_reusable`` (whether the connection may
    serve another request after it); ``_head_only`` (the request was a HEAD: no body).
    """

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self._state = IDLE
        self._reusable = True
        self._remaining = 0
        self._status = 0
        self._headers: RawHeaders = []
        self._coding: bytes | None = None
        self._chunks: list[bytes] = []
        self._head_only = False
        self._limit = limit
        self._body_bytes = 0  # of the response being read, as received (chunked, until close)

    def _finish(self, body: bytes) -> None:
        """The response is complete: deliver it (the connection's job)."""
        raise NotImplementedError

    def _parse(self) -> None:
        """Consume what the buffer holds, state by state, until more bytes are needed."""
        buffer = self._buffer
        while True:
            state = self._state
            if state == HEAD:
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
            else:  # UNTIL_CLOSE: the body runs to the end of the stream
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
                self._state = UNTIL_CLOSE
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
            self._state = UNTIL_CLOSE
            self._reusable = False


_SPACE_OR_TAB = b" \t"


def _bare_lf() -> httpx.RemoteProtocolError:
    # RFC 9112 2.2 lets a recipient accept a bare LF; refusing it at once is as valid and
    # keeps one framing rule (CRLF) everywhere, instead of waiting for a CRLF till the timeout.
    return httpx.RemoteProtocolError("response line ended by a bare LF, not CRLF")
