"""The one interface ``ChatClient`` sends through, and an adapter per HTTP backend.

Owns ``Route`` (a protocol: ``post(body, headers, total=seconds) -> RawResponse``, raising only
``pipeline.errors.RequestError``), ``RawResponse`` (status, raw headers, decoded body),
``route_to`` (the adapter for a transport, chosen once per client) and the mapping of each
backend's own exceptions into our error tree:

- ``Http11Route``: the built-in ``http11.Http11Transport`` through its pre-encoded
  ``http11.Route`` (the default and the hot path);
- ``AiohttpRoute``: ``aiohttp_transport.AiohttpTransport``, fed an ``httpx.Request``;
- ``HttpxRoute``: any ``httpx.AsyncBaseTransport`` (httpx's own, ``httpx.MockTransport``
  in tests, ``proxy.HttpxProxyRouter``), its body read here up to the size cap.

A test may hand ``ChatClient`` its own ``Route`` (an object with ``post`` and ``aclose``)
instead of a transport. This module does not build bodies, parse answers or map HTTP
statuses (``client.py``), and does not retry (``retry.py``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import httpx

from . import errors
from .aiohttp_transport import AiohttpTransport
from .errors import AuthenticationError, ConnectFailed, PermissionDenied, RequestError
from .http11 import CertificateNotTrusted, Http11Transport, ResponseTooLarge, join_capped
from .proxy import ProxyRefused, ProxyUnreachable, mask_credentials

__all__ = [
    "AiohttpRoute",
    "AiohttpTransport",
    "Http11Route",
    "HttpxRoute",
    "RawHeaders",
    "RawResponse",
    "Route",
    "read_capped",
    "route_to",
]

RawHeaders = Sequence[tuple[bytes, bytes]]
# what a backend raises for a failed attempt: httpx's errors (which the http11 and aiohttp
# transports raise too), OSError, and the attempt's own timeout
_FAILURES = (TimeoutError, httpx.TransportError, httpx.DecodingError, OSError)


class RawResponse(NamedTuple):
    """One HTTP answer: status, raw headers and the body, already decoded."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Route(Protocol):
    """POSTs to one URL with fixed headers; every failure is a ``RequestError``."""

    async def post(self, body: bytes, headers: RawHeaders, *, total: float) -> RawResponse:
        """Send ``body`` with the route's headers plus ``headers``, within ``total`` seconds."""
        ...

    async def aclose(self) -> None: ...


def route_to(
    transport: httpx.AsyncBaseTransport | Route,
    url: httpx.URL,
    headers: RawHeaders,
    *,
    max_response_bytes: int,
) -> Route:
    """The adapter that sends through ``transport`` to ``url`` (a ``Route`` is its own)."""
    if isinstance(transport, Http11Transport):
        return Http11Route(transport, url, headers)
    if isinstance(transport, AiohttpTransport):
        return AiohttpRoute(transport, url, headers)
    if isinstance(transport, httpx.AsyncBaseTransport):
        return HttpxRoute(transport, url, headers, max_response_bytes=max_response_bytes)
    return transport


class Http11Route:
    """The built-in transport: request line and fixed headers encoded once; gzip/deflate
    asked for and decoded; one total timeout."""

    def __init__(self, transport: Http11Transport, url: httpx.URL, headers: RawHeaders) -> None:
        self.transport = transport
        self.host = url.host
        self._route = transport.route("POST", url, headers)

    async def post(self, body: bytes, headers: RawHeaders, *, total: float) -> RawResponse:
        try:
            status, raw_headers, content = await self._route.fetch(body, headers, total=total)
        except _FAILURES as exc:
            raise from_httpx_error(exc, self.host, total) from None
        return RawResponse(status, raw_headers, content)

    async def aclose(self) -> None:
        await self.transport.aclose()


class _RequestRoute:
    """What the aiohttp and httpx adapters share: an ``httpx.Request`` per POST."""

    def __init__(self, transport: httpx.AsyncBaseTransport, url: httpx.URL, headers: RawHeaders):
        self.transport = transport
        self.url = url
        self.host = url.host
        self._headers = list(headers)
        self._timeouts: dict[str, float] = {}

    def request(self, body: bytes, headers: RawHeaders, timeout: float) -> httpx.Request:
        if self._timeouts.get("total") != timeout:
            # "total" is read by AiohttpTransport.fetch; httpx's transports ignore it
            self._timeouts = dict.fromkeys(("connect", "read", "write", "pool", "total"), timeout)
        # Host, Content-Length and a ByteStream given up front: httpx.Request then skips
        # its header preparation, a third of its cost.
        return httpx.Request(
            "POST",
            self.url,
            headers=[*self._headers, *headers, (b"Content-Length", b"%d" % len(body))],
            stream=httpx.ByteStream(body),
            extensions={"timeout": self._timeouts},
        )

    async def aclose(self) -> None:
        await self.transport.aclose()


class AiohttpRoute(_RequestRoute):
    """``http_backend = "aiohttp"``: the body read whole and decoded by aiohttp."""

    transport: AiohttpTransport

    async def post(self, body: bytes, headers: RawHeaders, *, total: float) -> RawResponse:
        import aiohttp  # loaded by the transport already; not at this module's import

        try:
            status, raw_headers, content = await self.transport.fetch(
                self.request(body, headers, total)
            )
        except _FAILURES as exc:
            raise from_httpx_error(exc, self.host, total) from None
        except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError) as exc:
            # what the transport does not map (a connection dropped mid-body, say)
            failure = ConnectFailed if _no_connection(exc) else errors.TransportError
            raise failure(mask_credentials(_describe(exc))) from None
        return RawResponse(status, raw_headers, content)


class HttpxRoute(_RequestRoute):
    """Any ``httpx.AsyncBaseTransport``: the body read here, refused past the cap."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        url: httpx.URL,
        headers: RawHeaders,
        *,
        max_response_bytes: int,
    ) -> None:
        super().__init__(transport, url, headers)
        self.max_response_bytes = max_response_bytes

    async def post(self, body: bytes, headers: RawHeaders, *, total: float) -> RawResponse:
        request = self.request(body, headers, total)
        try:
            async with asyncio.timeout(total):
                response = await self.transport.handle_async_request(request)
                try:
                    content = await read_capped(response, self.max_response_bytes)
                finally:
                    await response.aclose()
        except _FAILURES as exc:
            raise from_httpx_error(exc, self.host, total) from None
        return RawResponse(response.status_code, response.headers.raw, content)


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """An httpx response's decoded body, refused (``ResponseTooLarge``) past ``limit`` bytes.

    A Content-Length over the limit or more than two content codings is refused before
    reading. httpx decodes each piece as it arrives, so a compressed piece may briefly
    decode to more than the limit before the count sees it (one network read's worth).
    """
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise ResponseTooLarge(
            f"response body (Content-Length {length[:20]}) over {limit:,} bytes; "
            "raise --max-response-bytes if it is real"
        )
    codings = [c for c in response.headers.get("content-encoding", "").split(",") if c.strip()]
    if len(codings) > 2:
        raise ResponseTooLarge(f"{len(codings)} content codings stacked; at most 2")
    return await join_capped(response.aiter_bytes(), limit)


def from_httpx_error(exc: BaseException, host: str, timeout: float) -> RequestError:
    """An httpx-family error (which the http11 and aiohttp transports raise too), an
    ``OSError`` or the attempt's timeout, as our error. Texts keep proxy credentials
    masked; ``ChatClient`` removes the API key as well."""
    if isinstance(exc, TimeoutError):
        return errors.TransportError(f"no complete answer within {timeout:g}s")
    if isinstance(exc, ResponseTooLarge):
        return errors.ResponseTooLarge(mask_credentials(str(exc)))
    if isinstance(exc, ProxyRefused):
        return proxy_refusal(exc)
    if isinstance(exc, httpx.ProxyError):
        # its own text names the proxy; the error it was raised from would not
        failure = ConnectFailed if isinstance(exc, ProxyUnreachable) else errors.TransportError
        return failure(mask_credentials(f"{type(exc).__name__}: {exc}"))
    if _certificate_failure(exc):
        return errors.CertificateError(
            mask_credentials(
                f"{_describe(exc)}. Every request to {host} would "
                "fail the same way: fix the server's certificate, or trust its "
                "CA with SSL_CERT_FILE=/path/to/ca.pem"
            )
        )
    failure = ConnectFailed if _no_connection(exc) else errors.TransportError
    return failure(mask_credentials(_describe(exc)))


def proxy_refusal(exc: ProxyRefused) -> RequestError:
    """A proxy that refuses CONNECT: 407 and 403 stop the run (every row would get the
    same answer); other statuses (502: the proxy could not reach the API) are retried."""
    message = mask_credentials(str(exc))
    if exc.status == 407:
        return AuthenticationError(message, status=exc.status)
    if exc.status == 403:
        return PermissionDenied(message, status=exc.status)
    return errors.TransportError(message, status=exc.status)


_NO_CONNECTION_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _no_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says no connection could be opened (refused, no such host,
    unreachable), as opposed to one that broke or timed out."""
    if isinstance(exc, httpx.ConnectError | socket.gaierror | ConnectionRefusedError):
        return True
    aiohttp = sys.modules.get("aiohttp")  # loaded only when that backend was used
    if aiohttp is not None and isinstance(exc, aiohttp.ClientConnectorError):
        return True
    return isinstance(exc, OSError) and exc.errno in _NO_CONNECTION_ERRNOS


def _certificate_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) is a TLS certificate verification failure."""
    seen = 0
    error: BaseException | None = exc
    while error is not None and seen < 8:
        if isinstance(error, (CertificateNotTrusted, ssl.SSLCertVerificationError)):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _describe(exc: BaseException) -> str:
    # only an explicit cause (raise ... from): the implicit context may be any exception
    # that happened to be handled around the event loop (for example the RuntimeError of
    # "no running event loop"), which says nothing about this request
    cause = exc.__cause__
    inner = cause if cause is not None and str(cause) else exc
    text = str(inner) or type(inner).__name__
    return f"{type(inner).__name__}: {text}"
