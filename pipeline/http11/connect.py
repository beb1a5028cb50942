"""Opening the socket of a new connection: DNS, Happy Eyeballs, a CONNECT tunnel.

Owns ``resolve`` (``getaddrinfo``; the seam tests patch), the address race (RFC 8305,
through aiohappyeyeballs: uvloop's ``create_connection`` has no ``happy_eyeballs_delay``,
and without it a host whose IPv6 route drops packets would hang every new connection until
the timeout) and the tunnel through a proxy. It does not start TLS or count connections
(``pool.py``); errors name the proxy, never its credentials.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohappyeyeballs
import httpx

from ..proxy import Proxy, ProxyUnreachable, open_tunnel

# RFC 8305: start the next address (alternating IPv6/IPv4) if one has not connected in 250 ms
HAPPY_EYEBALLS_DELAY = 0.25


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[tuple[Any, ...]]:
    """The addresses to try for ``host:port`` (``getaddrinfo``; a seam for tests)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no address")
    return list(infos)


async def open_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, proxy: Proxy | None
) -> socket.socket:
    """A connected socket to ``host:port``, directly or tunnelled through ``proxy``."""
    if proxy is not None:
        return await _open_tunnel(loop, proxy, host, port)
    infos = await resolve(loop, host, port)
    return await aiohappyeyeballs.start_connection(
        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
    )


async def _open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int
) -> socket.socket:
    """A socket to the proxy on which CONNECT to our origin succeeded (TLS comes next,
    with the origin's host name). Errors name the proxy, never its credentials."""
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
        await open_tunnel(loop, sock, proxy, host, port)
    except OSError as exc:
        failure = httpx.ProxyError(
            f"{proxy.described()} dropped the connection during CONNECT to "
            f"{host}:{port}: {type(exc).__name__}: {exc}"
        )
    except BaseException:
        sock.close()
        raise
    if failure is not None:
        sock.close()
        raise failure
    return sock
