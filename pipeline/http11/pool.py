"""A keep-alive pool of HTTP/1.1 connections to one origin (scheme, host, port).

Owns counting and opening connections (the socket from ``connect.py``, then TLS), handing
idle ones out (checked for unread bytes first), waiting for a free slot, the total timeout
of each request (one watchdog timer per pool) and closing expired ones. It does not resolve
or tunnel (``connect.py``), parse responses (``connection.py``) or build requests
(``transport.py``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import httpx

from ..proxy import Proxy
from .connect import open_socket
from .connection import Connection, Response
from .decoding import DEFAULT_MAX_RESPONSE_BYTES
from .errors import CertificateNotTrusted, ClosedBeforeResponse


class Pool:
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
        self.idle: dict[Connection, None] = {}
        self.all: set[Connection] = set()
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick = 1.0
        self._tick_for: float | None = None

    async def exchange(
        self, data: bytes, total: float | None, *, head_only: bool = False
    ) -> Response:
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
            except ClosedBeforeResponse:
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

    def _take_idle(self) -> Connection | None:
        idle = self.idle
        while idle:
            connection = idle.popitem()[0]
            if connection.closed:
                self.discard(connection)
                continue
            if self.loop.time() - connection.idle_since < self.keepalive_expiry:
                if connection.has_unread():  # a stray response or the server's close
                    connection.close(abort=True)
                    continue
                return connection
            # the most recent idle one has expired, so have all older ones
            connection.close()
            for stale in list(idle):
                stale.close()
        return None

    async def _acquire(
        self, deadline: float | None, total: float | None, *, fresh: bool = False
    ) -> Connection:
        """An idle connection, a new one if a slot is free, else the next one released."""
        while True:
            if not fresh and (connection := self._take_idle()) is not None:
                return connection
            if self.opened < self.max_connections:
                return await self._connect(deadline, total)
            waiter: asyncio.Future[Connection | None] = self.loop.create_future()
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
                handed.close(abort=True)
            # a slot came free (or the handed connection died meanwhile): try again

    async def _connect(self, deadline: float | None, total: float | None) -> Connection:
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

    async def _open(self) -> Connection:
        loop = self.loop
        sock = await open_socket(loop, self.host, self.port, self.proxy)
        try:
            _, connection = await loop.create_connection(
                lambda: Connection(self),
                sock=sock,
                ssl=self.ssl_context if self.tls else None,
                server_hostname=self.host if self.tls else None,
            )
        except BaseException:
            sock.close()  # the loop did not take it (as aiohttp does; see uvloop#653)
            raise
        return connection

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
            if connection.waiter is None or deadline is None:
                continue
            if deadline <= now:
                connection.time_out()
            else:
                waiting = True
        if waiting:
            self._watchdog = self.loop.call_later(self._tick, self._check_deadlines)

    def release(self, connection: Connection) -> None:
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

    def discard(self, connection: Connection) -> None:
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
            connection.close()

    def close(self) -> None:
        for timer in (self._sweep, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._sweep = self._watchdog = None
        for connection in list(self.all):
            if connection.waiter is not None:
                connection.fail(httpx.ReadError("the transport was closed"))
            else:
                connection.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the transport was closed"))
        self._waiters.clear()
