"""HTTP proxies: which one a request goes through, the CONNECT handshake, and masking.

Owns the proxy settings of a run: ``--proxy URL`` (``RunConfig.proxy``) or the standard
variables ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` (lower-case forms
win over upper-case ones, as in curl), ``NO_PROXY`` matching (host suffixes, ``*``, IP
addresses and CIDR ranges, optional ports), the ``CONNECT`` handshake the built-in
transport runs on a fresh socket before TLS, and the masking of proxy credentials. It opens
no connection itself and knows nothing about chat completions.

Credentials in a proxy URL (``http://user:pass@host:port``) are sent as
``Proxy-Authorization: Basic`` and never shown: ``Proxy.display`` and every error made here
carry ``http://***@host:port``; ``mask_credentials`` removes the user info of any URL in a
text that came from a library.

Only ``http://`` proxies are supported (HTTPS and SOCKS proxies are refused with a clear
error): the API's own TLS runs end to end through the tunnel, so the proxy sees no prompt.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx

from .errors import ConfigError

# values of --proxy / RunConfig.proxy that mean "no proxy, whatever the environment says"
DIRECT = ("", "none", "direct")
# a CONNECT answer longer than this is not one
MAX_CONNECT_RESPONSE = 64 * 1024
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]*@")


class ProxyRefused(httpx.ProxyError):
    """The proxy answered CONNECT with a status other than 2xx (407, 403, 502, ...)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ProxyUnreachable(httpx.ProxyError):
    """No connection to the proxy (refused, no such host, unreachable), or none through it."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """One HTTP proxy.

    Fields:
        host, port: where the proxy listens (``host`` without IPv6 brackets).
        username, password: from the URL's user info (percent-decoded), or None.
        source: where it was set: ``--proxy``, ``HTTPS_PROXY``, ``http_proxy``, ...
    """

    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)
    source: str

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def display(self) -> str:
        """The URL with its credentials masked: safe for logs and error text."""
        userinfo = "***@" if self.username is not None else ""
        return f"http://{userinfo}{self.netloc}"

    @property
    def url(self) -> str:
        """The URL without credentials."""
        return f"http://{self.netloc}"

    @property
    def authorization(self) -> bytes | None:
        """The ``Proxy-Authorization`` value, or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(pair)

    def described(self) -> str:
        return f"proxy {self.display} ({self.source})"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The proxies of a run: one per target scheme, and the hosts that bypass them.

    Fields:
        http, https: the proxy for http:// and https:// targets, or None (direct).
        no_proxy: the ``NO_PROXY`` entries, lower-cased; ``("*",)`` bypasses every host.
        unusable: (scheme, error) of a variable that names a proxy we cannot use.
    """

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: tuple[str, ...] = ()
    unusable: tuple[tuple[str, str], ...] = ()

    def check(self, base_url: str) -> None:
        """Raise the ConfigError of an unusable proxy variable (``socks5://``, no host)
        that requests to ``base_url`` would go through; one they bypass is ignored."""
        url = httpx.URL(base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        for scheme, message in self.unusable:
            if scheme == url.scheme and not bypasses(self.no_proxy, url.host, port):
                raise ConfigError(message)

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy a request to ``scheme://host:port`` goes through, or None (direct)."""
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None or bypasses(self.no_proxy, host, port):
            return None
        return proxy

    def for_httpx_url(self, url: httpx.URL) -> Proxy | None:
        host = url.raw_host.decode("ascii")
        return self.for_url(url.scheme, host, url.port or (443 if url.scheme == "https" else 80))

    def describe(self, base_url: str) -> str | None:
        """One line for the start of a run: the proxy requests to ``base_url`` go through."""
        if self.http is None and self.https is None:
            return None
        url = httpx.URL(base_url)
        proxy = self.for_httpx_url(url)
        if proxy is not None:
            return f"requests to {url.host} go through {proxy.described()}"
        if (self.https if url.scheme == "https" else self.http) is None:
            return None  # only the other scheme has a proxy
        return f"requests to {url.host} go direct: NO_PROXY matches it"


def settings_from(
    proxy: str | None, environ: Mapping[str, str], *, option: str = "--proxy"
) -> ProxySettings:
    """The proxy settings from ``--proxy`` (when not None) else the environment.

    ``--proxy URL`` is used for every scheme; ``NO_PROXY`` still applies to it (as with
    curl). ``--proxy ''`` (or ``none``) turns proxies off whatever the environment says.
    """
    no_proxy = parse_no_proxy(_env(environ, "no_proxy") or "")
    if proxy is not None:
        if proxy.strip().lower() in DIRECT:
            return ProxySettings()
        parsed = parse_proxy_url(proxy, source=option)
        return ProxySettings(http=parsed, https=parsed, no_proxy=no_proxy)
    found: dict[str, Proxy | str | None] = {}
    for scheme in ("http", "https", "all"):
        name = f"{scheme}_proxy"
        value = _env(environ, name)
        source = name if environ.get(name, "").strip() else name.upper()
        try:
            found[scheme] = parse_proxy_url(value, source=source) if value else None
        except ConfigError as exc:
            found[scheme] = str(exc)  # an error only for a run whose requests would use it
    chosen = {scheme: found[scheme] or found["all"] for scheme in ("http", "https")}
    return ProxySettings(
        http=chosen["http"] if isinstance(chosen["http"], Proxy) else None,
        https=chosen["https"] if isinstance(chosen["https"], Proxy) else None,
        no_proxy=no_proxy,
        unusable=tuple((s, v) for s, v in chosen.items() if isinstance(v, str)),
    )


def _env(environ: Mapping[str, str], lower_name: str) -> str | None:
    """The variable's value, lower-case name first (curl's order); empty means unset."""
    for name in (lower_name, lower_name.upper()):
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def parse_proxy_url(value: str, *, source: str) -> Proxy:
    """``[http://][user:pass@]host[:port]`` -> Proxy; other schemes are a ConfigError."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text  # curl and httpx take a bare host:port as http
    try:
        split = urlsplit(text)
        port = split.port
    except ValueError:
        port, split = None, None
    if split is None or not split.hostname:
        raise ConfigError(
            f"{source}: {mask_proxy_url(value)!r} is not a proxy URL; "
            "use http://host:port (or http://user:password@host:port)."
        )
    if split.scheme.lower() != "http":
        raise ConfigError(
            f"{source}: {split.scheme}:// proxies are not supported "
            f"({mask_proxy_url(value)}); use an http:// proxy, which tunnels https with CONNECT."
        )
    username = unquote(split.username) if split.username is not None else None
    password = unquote(split.password) if split.password is not None else None
    return Proxy(split.hostname.lower(), port or 80, username, password, source)


def parse_no_proxy(value: str) -> tuple[str, ...]:
    """``NO_PROXY`` entries (comma or space separated), lower-cased, leading dots and
    ``*.`` dropped."""
    entries = []
    for raw in re.split(r"[,\s]+", value.strip().lower()):
        entry = raw.strip()
        if entry.startswith("*."):
            entry = entry[2:]
        entry = entry.lstrip(".")
        if entry:
            entries.append(entry)
    return tuple(entries)


def bypasses(no_proxy: tuple[str, ...], host: str, port: int) -> bool:
    """True when ``NO_PROXY`` says ``host:port`` is reached directly.

    An entry matches a host name equal to it or ending in ``.entry`` (``example.com`` and
    ``.example.com`` both match ``api.example.com``), an IP address equal to it, an address in
    its CIDR range (``10.0.0.0/8``), or anything (``*``). ``entry:port`` (``[v6]:port``)
    matches that port only.
    """
    host = host.strip("[]").lower().rstrip(".")
    address = _ip(host)
    for entry in no_proxy:
        if entry == "*":
            return True
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            network = _network(name)
            if network is not None and address.version == network.version:
                if address in network:
                    return True
                continue
        if host == name or host.endswith("." + name):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6] or [v6]:port
        name, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return name, int(port) if port.isascii() and port.isdigit() else None
    if entry.count(":") == 1:  # name:port (a bare IPv6 address has more colons)
        name, _, port = entry.partition(":")
        if port.isascii() and port.isdigit():
            return name, int(port)
    return entry, None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def mask_proxy_url(value: str) -> str:
    """A proxy URL as given (scheme optional) with its user info masked."""
    scheme, sep, rest = value.rpartition("://")
    if "@" not in rest:
        return value
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def mask_credentials(text: str) -> str:
    """``scheme://user:pass@host`` -> ``scheme://***@host`` everywhere in ``text``."""
    return _USERINFO.sub(r"\1***@", text)


def connect_request(proxy: Proxy, host: str, port: int) -> bytes:
    """The CONNECT request that opens a tunnel to ``host:port``."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"  # host: IDNA-encoded already
    if proxy.authorization is not None:
        head += b"Proxy-Authorization: " + proxy.authorization + b"\r\n"
    return head + b"\r\n"


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: Proxy, host: str, port: int
) -> None:
    """Run the CONNECT handshake on ``sock`` (connected to ``proxy``) to ``host:port``.

    On return the socket carries the target's bytes: start TLS over it with the target's
    host name. Raises ``ProxyRefused`` (a status other than 2xx) or ``httpx.ProxyError``
    (no valid answer); neither carries the credentials. Every failure on the way through a
    proxy is an ``httpx.ProxyError`` whose text names the proxy (masked). The caller
    bounds the time.
    """
    target = f"{host}:{port}"
    await loop.sock_sendall(sock, connect_request(proxy, host, port))
    received = b""
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_CONNECT_RESPONSE:
            raise httpx.ProxyError(
                f"{proxy.described()} sent no end to its CONNECT answer for {target}"
            )
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise httpx.ProxyError(
                f"{proxy.described()} closed the connection during CONNECT to {target}"
            )
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: (.*))?", status_line)
    if match is None:
        raise httpx.ProxyError(
            f"{proxy.described()} answered CONNECT to {target} with {status_line[:80]!r}, "
            "not HTTP; is it an HTTP proxy?"
        )
    status = int(match.group(1))
    if not 200 <= status < 300:
        reason = (match.group(2) or "").strip()
        raise ProxyRefused(
            f"{proxy.described()} refused CONNECT to {target}: {status} {reason}".rstrip()
            + _hint(status, proxy),
            status=status,
        )
    if rest:
        # the target speaks only after we do (TLS ClientHello, or our request)
        raise httpx.ProxyError(f"{proxy.described()} sent bytes after its CONNECT answer")


def _hint(status: int, proxy: Proxy) -> str:
    if status == 407:
        if proxy.username is None:
            return "; it wants credentials: http://user:password@host:port"
        return "; check the user name and password in the proxy URL"
    if status == 403:
        return "; the proxy does not allow this host or port"
    return ""


def refused(
    exc: httpx.ProxyError, proxy: Proxy, target: str, *, tunnel: bool = True
) -> httpx.ProxyError:
    """httpx's or aiohttp's proxy failure as our error, naming the proxy (masked).

    ``tunnel``: the request was a CONNECT (an https target), else an absolute-form request.
    """
    if isinstance(exc, ProxyRefused):
        return exc
    text = mask_credentials(str(exc))
    what = f"CONNECT to {target}" if tunnel else f"a request to {target}"
    match = re.match(r"(\d{3})\b(.*)", text)
    if match is None:
        return httpx.ProxyError(f"{proxy.described()} failed {what}: {text}")
    status = int(match.group(1))
    return ProxyRefused(
        f"{proxy.described()} refused {what}: {status}{match.group(2)}".rstrip()
        + _hint(status, proxy),
        status=status,
    )


class HttpxProxyRouter(httpx.AsyncBaseTransport):
    """httpx's own transport with proxies: each request goes direct or through the proxy
    ``settings`` name for its URL (our ``NO_PROXY`` matching, the same as the other
    backends'), on one pool per proxy."""

    def __init__(self, settings: ProxySettings, make: type[httpx.AsyncHTTPTransport], **kw: object):
        self.settings = settings
        self._make = make
        self._kw = kw
        self._direct: httpx.AsyncBaseTransport | None = None
        self._proxied: dict[Proxy, httpx.AsyncBaseTransport] = {}

    def _transport(self, proxy: Proxy | None) -> httpx.AsyncBaseTransport:
        if proxy is None:
            if self._direct is None:
                self._direct = self._make(**self._kw)  # type: ignore[arg-type]
            return self._direct
        transport = self._proxied.get(proxy)
        if transport is None:
            auth = (proxy.username, proxy.password or "") if proxy.username is not None else None
            transport = self._proxied[proxy] = self._make(
                proxy=httpx.Proxy(proxy.url, auth=auth),
                **self._kw,  # type: ignore[arg-type]
            )
        return transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self.settings.for_httpx_url(request.url)
        transport = self._transport(proxy)
        if proxy is None:
            return await transport.handle_async_request(request)
        default_port = 443 if request.url.scheme == "https" else 80
        target = f"{request.url.host}:{request.url.port or default_port}"
        try:
            response = await transport.handle_async_request(request)
        except httpx.ProxyError as exc:
            raise refused(exc, proxy, target) from None
        except httpx.ConnectTimeout:
            raise httpx.ProxyError(
                f"could not connect to {target} through {proxy.described()} in time"
            ) from None
        except httpx.ConnectError as exc:
            raise ProxyUnreachable(
                f"cannot connect to {target} through {proxy.described()}: "
                f"{mask_credentials(str(exc)) or type(exc).__name__}"
            ) from None
        if response.status_code == 407:  # an absolute-form request (http target) refused
            await response.aclose()
            failure = httpx.ProxyError("407 Proxy Authentication Required")
            raise refused(failure, proxy, target, tunnel=False)
        return response

    async def aclose(self) -> None:
        for transport in [self._direct, *self._proxied.values()]:
            if transport is not None:
                await transport.aclose()
