"""The default HTTP transport: a lean HTTP/1.1 client on raw asyncio.

Owns the socket layer and nothing else: a keep-alive pool per (scheme, host, port), TLS,
HTTP/1.1 framing (Content-Length, chunked, read-until-close), gzip/deflate decoding and a
total timeout per request. It knows nothing about chat completions; ``client.py`` does, and
it raises httpx's errors, which the adapter in ``pipeline/transport.py`` maps into ours.

Layers, one module each (as httpcore cuts them): ``transport.py`` (``Http11Transport``,
``Route``: requests encoded, a pool per origin), ``pool.py`` (connections of one origin:
count, reuse, wait, time out), ``connect.py`` (a new connection's socket: DNS, Happy
Eyeballs, proxy tunnel), ``connection.py`` (one connection: write a request, complete its
future), ``parser.py`` (the strict response parser), ``decoding.py`` (gzip/deflate and
the body size cap), ``errors.py``. This package only re-exports their public names.

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

from .connect import resolve
from .connection import RawHeaders
from .decoding import DEFAULT_MAX_RESPONSE_BYTES, decode_body, join_capped
from .errors import CertificateNotTrusted, ResponseTooLarge
from .transport import Http11Transport, Route

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "CertificateNotTrusted",
    "Http11Transport",
    "RawHeaders",
    "ResponseTooLarge",
    "Route",
    "decode_body",
    "join_capped",
    "resolve",
]
