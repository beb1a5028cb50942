"""The HTTP/1.1 transport: ``Http11Transport`` (a pool per origin) and ``Route`` (one URL's
request encoded once), the client's hot path.

Owns encoding requests (request line, headers, Content-Length) and picking the pool of
an origin; the standard ``httpx.AsyncBaseTransport`` interface too. It does not hold
connections (``pool.py``) or parse responses (``connection.py``), and it raises httpx's
errors: ``pipeline/transport.py`` maps them into ours.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from ..proxy import ProxySettings
from .connection import RawHeaders, Response
from .decoding import DEFAULT_MAX_RESPONSE_BYTES, decode_body
from .pool import Pool

ACCEPT_ENCODING = b"gzip, deflate"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Request headers this module writes itself from the URL and the body.
_COMPUTED = frozenset({b"host", b"content-length", b"transfer-encoding"})


def _header_line(name: bytes, value: bytes) -> bytes:
    if b"\r" in name or b"\n" in name or b":" in name or b"\r" in value or b"\n" in value:
        # the header's value may be a secret: name it, never echo the value
        raise httpx.LocalProtocolError(f"invalid request header {name[:40]!r}")
    return b"%s: %s\r\n" % (name, value)


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
        self._pool: Pool | None = None
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
        self._pools: dict[tuple[str, str, int], Pool] = {}

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

    async def _send(self, request: httpx.Request, *, accept_encoding: bool) -> Response:
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

    def _pool(self, key: tuple[str, str, int]) -> Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(key)
        if pool is None or pool.loop is not loop:
            # a pool belongs to the loop its connections were made on
            scheme, host, port = key
            context = self._get_ssl_context() if scheme == "https" else None
            pool = self._pools[key] = Pool(
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
