"""An httpx transport over one aiohttp connection pool (``http_backend = "aiohttp"``).

Owns the socket layer and nothing else: it takes an ``httpx.Request`` and returns an
``httpx.Response`` whose body is already read (``fetch``: just status, headers and body).
It raises httpx's errors; ``transport.AiohttpRoute``, the client's adapter for it, maps
those and aiohttp's own into ``pipeline.errors``.

Why not httpx's own transport: with hundreds of requests in flight httpcore's pool opens
and drops connections (encode/httpcore#1035) and its per-request CPU cost caps a core at a
few thousand requests/s. Why not the httpx-aiohttp package: it streams the body through
httpx's iterator machinery, which costs more CPU than the whole rest of our pipeline for
small JSON answers. Reading the body in one go and building the response from bytes keeps
the httpx interface at a fraction of the cost (see benchmarks/). The default transport,
``http11.Http11Transport``, costs a fraction again; this one stays as a fallback.

aiohttp is imported on first use, not with this module: it takes ~0.15 s to import, and
runs on the default transport never need it.

Proxies: given ``ProxySettings`` (``proxy.py``), each request names its proxy to aiohttp
(``proxy=``; credentials sent as a ``Proxy-Authorization`` header, not in the URL), so
``NO_PROXY`` is matched as in the other backends; aiohttp's own ``trust_env`` stays off.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import httpx

from .http11 import (
    DEFAULT_MAX_RESPONSE_BYTES,
    CertificateNotTrusted,
    ResponseTooLarge,
    join_capped,
)
from .proxy import ProxySettings, ProxyUnreachable, refused

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

# aiohttp derives these from the URL and the body itself
_SET_BY_AIOHTTP = {b"host", b"content-length"}
# response headers about the encoded bytes on the wire, not the decoded body we return
_DESCRIBE_THE_WIRE = {b"content-encoding", b"content-length"}


class AiohttpTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive pool of at most ``max_connections``; bodies read whole, up to
    ``max_response_bytes`` (a Content-Length over it is refused at once, a longer or
    compressed body is read in pieces and refused when the decoded bytes pass it)."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 30.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        proxies: ProxySettings | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.proxies = proxies
        self.keepalive_expiry = keepalive_expiry
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        # created lazily: a ClientSession belongs to the running event loop
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(
                # made now, not at aiohttp's import: SSL_CERT_FILE / SSL_CERT_DIR set by then
                # count (a company proxy's CA is often given that way), as with http11
                ssl=ssl.create_default_context(),
                limit=self.max_connections,
                limit_per_host=self.max_connections,
                keepalive_timeout=self.keepalive_expiry,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _url(self, url: httpx.URL) -> URL:
        key = str(url)
        cached = self._urls.get(key)
        if cached is None:
            from yarl import URL

            cached = self._urls[key] = URL(key, encoded=True)
        return cached

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        status, raw_headers, content = await self.fetch(request)
        # aiohttp has decoded the body already: httpx must not decode it again
        headers = [(k, v) for k, v in raw_headers if k.lower() not in _DESCRIBE_THE_WIRE]
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def fetch(self, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send ``request``; return (status, raw headers, body).

        The client's hot path: it skips building an ``httpx.Response`` (about half of
        httpx's CPU cost per request). ``timeout["total"]`` bounds the whole attempt.
        """
        import aiohttp

        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        total = timeouts.get("total", timeouts.get("read"))
        timeout = self._timeouts.get(total)
        if timeout is None:
            # one timer per request (total) instead of four: timers cost CPU per request
            timeout = self._timeouts[total] = aiohttp.ClientTimeout(total=total)
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in request.headers.raw
            if k.lower() not in _SET_BY_AIOHTTP
        }
        proxy = self.proxies.for_httpx_url(request.url) if self.proxies else None
        proxy_args: dict[str, Any] = {}
        if proxy is not None:
            proxy_args["proxy"] = proxy.url
            if proxy.authorization is not None:
                authorization = {"Proxy-Authorization": proxy.authorization.decode("ascii")}
                if request.url.scheme == "https":
                    proxy_args["proxy_headers"] = authorization  # on the CONNECT
                else:
                    headers.update(authorization)  # on the absolute-form request itself
        try:
            async with self._get_session().request(
                request.method,
                self._url(request.url),
                headers=headers,
                data=request.read() or None,
                allow_redirects=False,
                timeout=timeout,
                **proxy_args,
            ) as response:
                content = await self._read(response)
                status = response.status
                if status == 407 and proxy is not None:  # absolute-form (http target) refused
                    failure = httpx.ProxyError(f"407 {response.reason or ''}")
                    target = f"{request.url.host}:{request.url.port or 80}"
                    raise refused(failure, proxy, target, tunnel=False)
                raw_headers = response.raw_headers
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"timed out: {exc}", request=request) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CertificateNotTrusted(
                f"TLS certificate of {request.url.host} not trusted: {exc.certificate_error}",
                request=request,
            ) from exc
        except aiohttp.ClientHttpProxyError as exc:
            assert proxy is not None
            default_port = 443 if request.url.scheme == "https" else 80
            target = f"{request.url.host}:{request.url.port or default_port}"
            error = refused(httpx.ProxyError(f"{exc.status} {exc.message}"), proxy, target)
            raise error from None
        except aiohttp.ClientProxyConnectionError as exc:
            assert proxy is not None
            raise ProxyUnreachable(
                f"cannot connect to {proxy.described()}: {type(exc).__name__}: {exc}",
                request=request,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            text = str(exc) or type(exc).__name__
            raise httpx.ReadError(f"{type(exc).__name__}: {text}", request=request) from exc
        return status, list(raw_headers), content

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, decoded by aiohttp, at most ``max_response_bytes`` of it."""
        limit = self.max_response_bytes
        length = response.content_length
        if length is not None and length > limit:
            raise ResponseTooLarge(
                f"response body (Content-Length {length}) over {limit:,} bytes; "
                "raise --max-response-bytes if it is real"
            )
        if length is not None and "Content-Encoding" not in response.headers:
            return await response.read()  # exactly Content-Length bytes: the fast path
        return await join_capped(response.content.iter_any(), limit)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
