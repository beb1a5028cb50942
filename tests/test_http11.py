"""The built-in HTTP/1.1 transport: keep-alive, framing, decoding, timeouts, errors, TLS.

Against the simulator over real HTTP for what it does (keep-alive, faults, 429/500 with
Retry-After), and against tiny raw asyncio servers started by the test on 127.0.0.1 for
the rest (chunked bodies, gzip, Connection: close, closed idle connections, cut bodies,
100 Continue, slow servers, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

import pipeline
from pipeline import errors, http11
from pipeline.client import ChatClient, make_transport
from pipeline.http11 import Http11Transport
from pipeline.simulator import SimulatorThread
from pipeline.transport import AiohttpTransport

BODY = json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
OK_JSON = b'{"ok": true}'


def ok(body: bytes = OK_JSON, *headers: str) -> bytes:
    """A complete HTTP/1.1 200 response with a Content-Length."""
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def post(
    transport: Http11Transport,
    url: str,
    *,
    total: float | None = 5.0,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    route = transport.route("POST", url, [(b"Content-Type", b"application/json")])
    return await route.fetch(BODY.encode(), headers, total=total)


# -- a tiny raw server for what the simulator does not do ------------------------------------


class Peer:
    """One accepted connection of a TinyServer, as the handler sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read_request(self) -> bytes | None:
        """The next request (head and body), or None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + await self.reader.readexactly(length)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed_by_client(self, within: float = 5.0) -> bool:
        """True once the client closes its side (EOF), False if it has not within ``within``."""
        try:
            return await asyncio.wait_for(self.reader.read(), within) == b""
        except TimeoutError:
            return False


class TinyServer:
    """Runs ``handler(peer)`` for every connection; counts connections and requests."""

    def __init__(self, handler: Callable[[Peer], Awaitable[None]]) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        try:
            await self.handler(Peer(reader, writer))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open_now -= 1
            writer.close()
            del self._tasks[task]

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{port}/v1/chat/completions"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        # cut the connections still open: their handlers see the end of the stream and return
        for writer in self._tasks.values():
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def tiny_server(
    handler: Callable[[Peer], Awaitable[None]], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[TinyServer]:
    server = TinyServer(handler)
    await server.start(ssl_context)
    try:
        yield server
    finally:
        await server.stop()


def answer_each_request_with(*responses: bytes) -> Callable[[Peer], Awaitable[None]]:
    """A handler that answers the n-th request of a connection with ``responses[n]`` (the
    last one repeats) and keeps the connection open."""

    async def handler(peer: Peer) -> None:
        n = 0
        while await peer.read_request() is not None:
            peer.write(responses[min(n, len(responses) - 1)])
            n += 1

    return handler


Run = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a scenario on asyncio's loop and on uvloop (which ``pipeline run`` uses)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop

    def run_scenario(scenario: Callable[[], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            return await scenario()

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())

    return run_scenario


# -- against the simulator -------------------------------------------------------------------


def test_sequential_requests_reuse_one_keep_alive_connection(
    simulator: SimulatorThread, run: Run
) -> None:
    async def scenario() -> None:
        transport = Http11Transport(max_connections=8)
        for _ in range(30):
            status, _, content = await post(transport, simulator.base_url + "/chat/completions")
            assert status == 200
            assert json.loads(content)["object"] == "chat.completion"
        await transport.aclose()

    run(scenario)
    assert simulator.simulator.stats["requests"] == 30
    assert simulator.simulator.stats["connections"] == 1


def test_64_concurrent_requests_are_bounded_by_the_pool(
    simulator: SimulatorThread, run: Run
) -> None:
    async def scenario(pool_size: int) -> None:
        transport = Http11Transport(max_connections=pool_size)
        url = simulator.base_url + "/chat/completions"
        answers = await asyncio.gather(*(post(transport, url) for _ in range(64)))
        assert [status for status, _, _ in answers] == [200] * 64
        await transport.aclose()

    run(lambda: scenario(8))
    assert simulator.simulator.stats["requests"] == 64
    assert simulator.simulator.stats["connections"] == 8
    simulator.simulator.reset()
    run(lambda: scenario(64))
    assert 1 <= simulator.simulator.stats["connections"] <= 64


def test_a_dropped_connection_is_a_read_error_and_is_not_reused(
    make_simulator: Callable[..., SimulatorThread],
    run: Run,
) -> None:
    sim = make_simulator(rate_drop=1.0)

    async def scenario() -> None:
        transport = Http11Transport(max_connections=4)
        for _ in range(2):
            with pytest.raises(httpx.ReadError):
                await post(transport, sim.base_url + "/chat/completions")
        await transport.aclose()

    run(scenario)
    # each dropped request had a fresh connection: never resent (nothing to be stale)
    assert sim.simulator.stats["requests"] == 2
    assert sim.simulator.stats["connections"] == 2


def test_an_unanswered_request_times_out_and_its_connection_is_closed(
    make_simulator: Callable[..., SimulatorThread],
    run: Run,
) -> None:
    sim = make_simulator(rate_timeout=1.0)

    async def scenario() -> None:
        transport = Http11Transport(max_connections=1)
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match=r"within 0.3s"):
            await post(transport, sim.base_url + "/chat/completions", total=0.3)
        assert 0.25 <= time.monotonic() - started < 2
        # the pool's only slot is free again, on a new connection
        sim.simulator.config = type(sim.simulator.config)()
        status, _, _ = await post(transport, sim.base_url + "/chat/completions")
        assert status == 200
        await transport.aclose()

    run(scenario)
    assert sim.simulator.stats["connections"] == 2


def test_a_malformed_200_reaches_the_client_as_malformed_response(
    make_simulator: Callable[..., SimulatorThread],
    run: Run,
) -> None:
    sim = make_simulator(rate_malformed=1.0)
    client = ChatClient(
        sim.base_url, api_key=None, timeout=5, transport=Http11Transport(max_connections=2)
    )

    async def scenario() -> None:
        with pytest.raises(errors.MalformedResponse):
            await client.send(BODY.encode(), "bpp-1")
        await client.aclose()

    run(scenario)


def test_429_and_500_with_retry_after_flow_through_to_the_error(
    simulator: SimulatorThread,
    run: Run,
) -> None:
    client = ChatClient(
        simulator.base_url, api_key=None, timeout=5, transport=make_transport("http11", 4)
    )

    def body(directive: str) -> bytes:
        return json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": directive}]}
        ).encode()

    async def scenario() -> None:
        with pytest.raises(errors.RateLimited) as limited:
            await client.send(body("[[sim:fail=1,status=429,retry_after=3]]"), "bpp-1")
        assert limited.value.retry_after == 3
        with pytest.raises(errors.ServerError) as server:
            await client.send(body("[[sim:fail=1,status=500,retry_after=2]]"), "bpp-2")
        assert (server.value.status, server.value.retry_after) == (500, 2)
        completion = await client.send(body("[[sim:fail=1,status=500,retry_after=2]]"), "bpp-2")
        assert completion.text is not None
        await client.aclose()

    run(scenario)
    assert simulator.simulator.stats["connections"] == 1


def test_the_default_backend_is_http11_and_its_errors_are_transport_errors(
    make_simulator: Callable[..., SimulatorThread],
    run: Run,
) -> None:
    sim = make_simulator(rate_timeout=1.0)
    transport = make_transport("http11", 4)
    assert isinstance(transport, Http11Transport)
    client = ChatClient(sim.base_url, api_key="sk-secret-key", timeout=0.2, transport=transport)

    async def scenario() -> None:
        with pytest.raises(errors.TransportError) as info:
            await client.send(BODY.encode(), "bpp-1")
        assert "ReadTimeout" in str(info.value)
        assert "sk-secret-key" not in str(info.value)
        await client.aclose()

    run(scenario)


# -- framing and decoding --------------------------------------------------------------------


def test_a_chunked_body_is_joined_and_the_connection_is_reused(run: Run) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\n" + b'{"ok"' + b"\r\n"
        b"7\r\n" + b": true}" + b"\r\n"
        b"0\r\nX-Trailer: ignored\r\n\r\n"
    )

    async def scenario() -> None:
        async with tiny_server(answer_each_request_with(chunked)) as server:
            transport = Http11Transport(max_connections=4)
            for _ in range(3):
                status, _, content = await post(transport, server.url)
                assert (status, content) == (200, OK_JSON)
            await transport.aclose()
            assert server.connections == 1

    run(scenario)


def test_a_response_arriving_byte_by_byte_parses_the_same(run: Run) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nc\r\n" + OK_JSON + b"\r\n0\r\n\r\n"
    )

    async def trickle(peer: Peer) -> None:
        while await peer.read_request() is not None:
            for response in (chunked, ok()):
                for i in range(len(response)):
                    peer.write(response[i : i + 1])
                    await peer.writer.drain()
                    await asyncio.sleep(0)
                break

    async def scenario() -> None:
        async with tiny_server(trickle) as server:
            transport = Http11Transport(max_connections=1)
            for _ in range(2):
                assert (await post(transport, server.url))[2] == OK_JSON
            await transport.aclose()

    run(scenario)


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),  # raw deflate, as some send
        ("identity", lambda data: data),
    ],
)
def test_gzip_and_deflate_bodies_are_decoded(
    coding: str, encode: Callable[[bytes], bytes], run: Run
) -> None:
    seen: list[bytes] = []

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            seen.append(request)
            peer.write(ok(encode(OK_JSON), f"Content-Encoding: {coding}"))

    async def scenario() -> None:
        async with tiny_server(handler) as server:
            transport = Http11Transport(max_connections=1)
            _, headers, content = await post(transport, server.url)
            assert content == OK_JSON
            assert (b"Content-Encoding", coding.encode()) in headers  # as the server sent it
            # through the standard httpx interface the body is decoded once, by httpx
            async with httpx.AsyncClient(transport=transport) as client:
                response = await client.post(server.url, content=b"{}")
                assert response.json() == {"ok": True}

    run(scenario)
    assert b"\r\nAccept-Encoding: gzip, deflate\r\n" in seen[0]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_the_aiohttp_backend_through_httpx_decodes_a_compressed_body_once(
    coding: str, run: Run
) -> None:
    encode = gzip.compress if coding == "gzip" else zlib.compress

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.write(ok(encode(OK_JSON), f"Content-Encoding: {coding}"))

    async def scenario() -> None:
        async with tiny_server(handler) as server:
            transport = AiohttpTransport(max_connections=1)
            async with httpx.AsyncClient(transport=transport) as client:
                response = await client.post(server.url, content=b"{}")
                assert response.json() == {"ok": True}

    run(scenario)


def test_a_body_that_does_not_decode_is_a_decoding_error(run: Run) -> None:
    async def scenario() -> None:
        bad = ok(b"not gzip at all", "Content-Encoding: gzip")
        async with tiny_server(answer_each_request_with(bad)) as server:
            transport = Http11Transport(max_connections=1)
            with pytest.raises(httpx.DecodingError):
                await post(transport, server.url)
            await transport.aclose()

    run(scenario)


def test_a_body_without_length_runs_to_the_close_and_the_connection_is_not_reused(run: Run) -> None:
    async def until_close(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_JSON)
        # the handler returns: the server closes the connection, which ends the body

    async def scenario() -> None:
        async with tiny_server(until_close) as server:
            transport = Http11Transport(max_connections=1)
            for _ in range(2):
                assert (await post(transport, server.url))[2] == OK_JSON
            await transport.aclose()
            assert server.connections == 2

    run(scenario)


def test_interim_1xx_responses_are_skipped(run: Run) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"

    async def scenario() -> None:
        async with tiny_server(answer_each_request_with(interim + ok())) as server:
            transport = Http11Transport(max_connections=1)
            status, headers, content = await post(transport, server.url)
            assert (status, content) == (200, OK_JSON)
            assert not any(name == b"Link" for name, _ in headers)
            await transport.aclose()

    run(scenario)


def test_header_names_match_case_insensitively_and_raw_headers_keep_their_case(run: Run) -> None:
    response = (
        b"HTTP/1.1 429 Too Many Requests\r\nCONTENT-length: 12\r\nRetry-After: 7\r\n"
        b"x-ratelimit-remaining-requests: 0\r\n\r\n" + OK_JSON
    )

    async def scenario() -> None:
        async with tiny_server(answer_each_request_with(response)) as server:
            transport = Http11Transport(max_connections=1)
            status, headers, content = await post(transport, server.url)
            assert (status, content) == (429, OK_JSON)
            assert headers == [
                (b"CONTENT-length", b"12"),
                (b"Retry-After", b"7"),
                (b"x-ratelimit-remaining-requests", b"0"),
            ]
            await transport.aclose()

    run(scenario)


def test_the_request_on_the_wire(run: Run) -> None:
    seen: list[bytes] = []

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            seen.append(request)
            peer.write(ok())

    async def scenario() -> None:
        async with tiny_server(handler) as server:
            transport = Http11Transport(max_connections=1)
            await post(transport, server.url + "?q=1", headers=((b"X-Client-Request-Id", b"r1"),))
            port = server.url.split(":")[2].split("/")[0]
            await transport.aclose()
        head, _, body = seen[0].partition(b"\r\n\r\n")
        assert head.split(b"\r\n") == [
            b"POST /v1/chat/completions?q=1 HTTP/1.1",
            b"Host: 127.0.0.1:" + port.encode(),
            b"Content-Type: application/json",
            b"Accept-Encoding: gzip, deflate",
            b"X-Client-Request-Id: r1",
            b"Content-Length: %d" % len(BODY),
        ]
        assert body == BODY.encode()

    run(scenario)


# -- connections that close ------------------------------------------------------------------


def test_connection_close_and_http_1_0_answers_are_not_reused(run: Run) -> None:
    for response in (ok(OK_JSON, "Connection: close"), ok().replace(b"HTTP/1.1", b"HTTP/1.0")):

        async def scenario(response: bytes = response) -> None:
            async with tiny_server(answer_each_request_with(response)) as server:
                transport = Http11Transport(max_connections=1)
                for _ in range(3):
                    assert (await post(transport, server.url))[2] == OK_JSON
                await transport.aclose()
                assert server.connections == 3

        run(scenario)


def test_an_idle_connection_the_server_closed_is_replaced(run: Run) -> None:
    async def one_per_connection(peer: Peer) -> None:
        await peer.read_request()
        peer.write(ok())  # no Connection: close, but the server closes right after

    async def scenario() -> None:
        async with tiny_server(one_per_connection) as server:
            transport = Http11Transport(max_connections=1)
            for _ in range(3):
                assert (await post(transport, server.url))[2] == OK_JSON
                await asyncio.sleep(0.05)  # the server's FIN arrives while idle
            await transport.aclose()
            assert server.connections == 3

    run(scenario)


def test_a_reused_connection_closed_before_any_answer_is_retried_once_on_a_fresh_one(
    run: Run,
) -> None:
    requests: list[int] = []

    async def closes_on_second_request(peer: Peer) -> None:
        # the keep-alive race: the server gave up on the connection just as we wrote
        n = 0
        while await peer.read_request() is not None:
            requests.append(n)
            if n == 1:
                return  # close without answering
            peer.write(ok())
            n += 1

    async def scenario() -> None:
        async with tiny_server(closes_on_second_request) as server:
            transport = Http11Transport(max_connections=1)
            assert (await post(transport, server.url))[2] == OK_JSON
            assert (await post(transport, server.url))[2] == OK_JSON  # resent, answered
            await transport.aclose()
            assert server.connections == 2

    run(scenario)
    assert requests == [0, 1, 0]


def test_the_resend_happens_once_and_only_when_nothing_was_received(run: Run) -> None:
    requests: list[int] = []

    def handler(answer_to_second: bytes) -> Callable[[Peer], Awaitable[None]]:
        async def serve(peer: Peer) -> None:
            # the first connection answers one request, then hangs up on the next (after
            # writing ``answer_to_second``); every later connection hangs up at once
            first = not requests
            await peer.read_request()
            requests.append(1)
            if not first:
                return
            peer.write(ok())
            await peer.read_request()
            requests.append(2)
            peer.write(answer_to_second)

        return serve

    async def scenario(answer_to_second: bytes) -> int:
        async with tiny_server(handler(answer_to_second)) as server:
            transport = Http11Transport(max_connections=1)
            await post(transport, server.url)
            with pytest.raises(httpx.ReadError):
                await post(transport, server.url)
            await transport.aclose()
            return server.connections

    # nothing came back: resent once on a fresh connection, which fails too; no third try
    assert run(lambda: scenario(b"")) == 2
    assert requests == [1, 2, 1]
    requests.clear()
    # a request that got any byte back is never resent
    assert run(lambda: scenario(b"HTTP/1.1 200 OK\r\nContent-Le")) == 1
    assert requests == [1, 2]


def test_a_fresh_connection_closed_without_an_answer_is_not_resent(run: Run) -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.read_request()

    async def scenario() -> None:
        async with tiny_server(hang_up) as server:
            transport = Http11Transport(max_connections=1)
            with pytest.raises(httpx.ReadError, match="before any response byte"):
                await post(transport, server.url)
            await transport.aclose()
            assert server.connections == 1

    run(scenario)


@pytest.mark.parametrize(
    "cut",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + OK_JSON,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + OK_JSON,
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
    ids=["content-length", "chunked", "headers"],
)
def test_a_response_cut_short_is_a_read_error(cut: bytes, run: Run) -> None:
    async def cut_short(peer: Peer) -> None:
        await peer.read_request()
        peer.write(cut)

    async def scenario() -> None:
        async with tiny_server(cut_short) as server:
            transport = Http11Transport(max_connections=1)
            with pytest.raises(httpx.ReadError, match="mid-response"):
                await post(transport, server.url)
            await transport.aclose()

    run(scenario)


def test_something_that_is_not_http_is_a_protocol_error_and_the_connection_is_closed(
    run: Run,
) -> None:
    async def gibberish(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        assert await peer.closed_by_client()

    async def scenario() -> None:
        async with tiny_server(gibberish) as server:
            transport = Http11Transport(max_connections=1)
            with pytest.raises(httpx.RemoteProtocolError, match=r"not an HTTP/1\.x status line"):
                await post(transport, server.url)
            await transport.aclose()

    run(scenario)


def test_idle_connections_expire(run: Run) -> None:
    closed: list[bool] = []

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.write(ok())
        closed.append(True)  # the client closed the connection

    async def scenario() -> None:
        async with tiny_server(handler) as server:
            transport = Http11Transport(max_connections=1, keepalive_expiry=0.1)
            await post(transport, server.url)
            await asyncio.sleep(0.4)  # the expiry sweep closes it without another request
            assert closed == [True]
            await post(transport, server.url)
            # a connection past its expiry is not used even before the sweep gets to it
            time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop on purpose: no timer runs
            await post(transport, server.url)
            await transport.aclose()
            assert server.connections == 3

    run(scenario)


# -- timeouts, the pool, cancellation, connect errors ----------------------------------------


def test_a_slow_server_times_out_and_the_connection_is_closed(run: Run) -> None:
    closed: list[bool] = []

    async def slow(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{")  # then nothing
        closed.append(await peer.closed_by_client())

    async def scenario() -> None:
        async with tiny_server(slow) as server:
            transport = Http11Transport(max_connections=1)
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await post(transport, server.url, total=0.3)
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.1)
            await transport.aclose()

    run(scenario)
    assert closed == [True]


def test_waiting_for_a_free_connection_counts_against_the_total_timeout(run: Run) -> None:
    async def stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.closed_by_client()

    async def scenario() -> None:
        async with tiny_server(stall) as server:
            transport = Http11Transport(max_connections=1)
            first = asyncio.create_task(post(transport, server.url, total=2))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.PoolTimeout, match="no free connection"):
                await post(transport, server.url, total=0.2)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await transport.aclose()
            assert server.connections == 1

    run(scenario)


def test_a_cancelled_request_closes_its_connection_and_frees_its_slot(run: Run) -> None:
    connections: list[Peer] = []

    async def slow_first(peer: Peer) -> None:
        connections.append(peer)
        if len(connections) == 1:  # the first connection never answers
            await peer.read_request()
            await peer.closed_by_client()
            return
        while await peer.read_request() is not None:
            peer.write(ok())

    async def scenario() -> None:
        async with tiny_server(slow_first) as server:
            transport = Http11Transport(max_connections=1)
            stuck = asyncio.create_task(post(transport, server.url))
            await asyncio.sleep(0.1)
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stuck
            assert (await post(transport, server.url, total=2))[2] == OK_JSON
            await transport.aclose()
            assert server.connections == 2

    run(scenario)


def test_a_connection_freed_as_a_waiting_request_times_out_is_not_lost(
    simulator: SimulatorThread, run: Run
) -> None:
    url = simulator.base_url + "/chat/completions"
    slow = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "[[sim:sleep_ms=100]]"}]}
    ).encode()

    async def scenario() -> None:
        transport = Http11Transport(max_connections=1)
        route = transport.route("POST", url)
        first = asyncio.create_task(route.fetch(slow, total=5))
        await asyncio.sleep(0.02)  # on the pool's only connection
        second = asyncio.create_task(post(transport, url, total=0.2))
        await asyncio.sleep(0.02)  # waiting for that connection
        # Block the loop: the first answer arrives and the second deadline passes, so both
        # are handled in one loop iteration (the second is handed the connection as it
        # times out).
        time.sleep(0.4)  # noqa: ASYNC251 - on purpose
        try:
            answered, timed_out = await asyncio.gather(first, second, return_exceptions=True)
            assert isinstance(answered, tuple) and answered[0] == 200
            assert isinstance(timed_out, httpx.PoolTimeout)
            # the connection went back to the pool instead of being lost with its slot
            assert (await post(transport, url, total=1))[0] == 200
        finally:
            await transport.aclose()

    run(scenario)
    assert simulator.simulator.stats["connections"] == 1


def test_a_refused_connection_is_a_connect_error_naming_the_address(run: Run) -> None:
    async def scenario() -> None:
        transport = Http11Transport(max_connections=1)
        with pytest.raises(httpx.ConnectError, match=r"127\.0\.0\.1:9\b"):
            await post(transport, "http://127.0.0.1:9/v1/chat/completions")
        await transport.aclose()

    run(scenario)


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    """An address on 127.0.0.1 where a connect hangs: a listener whose accept queue is full
    (Linux then drops the SYNs), like a host whose route silently drops packets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(address)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(address)
        hangs = False
    except TimeoutError:
        hangs = True
    finally:
        probe.close()
    try:
        if not hangs:
            pytest.skip("this system completes connects to a full accept queue")
        yield address
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_an_address_that_does_not_answer_does_not_hold_up_the_next(
    black_hole: tuple[str, int], monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    async def scenario() -> None:
        async with tiny_server(answer_each_request_with(ok())) as server:
            port = int(server.url.split(":")[2].split("/")[0])

            async def two_addresses(*_: object) -> list[tuple[Any, ...]]:
                tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
                return [(*tcp, black_hole), (*tcp, ("127.0.0.1", port))]

            monkeypatch.setattr(http11.connect, "resolve", two_addresses)
            transport = Http11Transport(max_connections=1)
            started = time.monotonic()
            assert (await post(transport, server.url, total=5))[2] == OK_JSON
            # the second address is tried 0.25 s after the first, not after it gives up
            assert time.monotonic() - started < 1.5
            await transport.aclose()

    run(scenario)


def test_header_values_never_appear_in_errors(run: Run) -> None:
    key = b"Bearer sk-very-secret"

    async def hang_up(peer: Peer) -> None:
        await peer.read_request()

    async def scenario() -> None:
        async with tiny_server(hang_up) as server:
            transport = Http11Transport(max_connections=1)
            with pytest.raises(httpx.ReadError) as dropped:
                await post(transport, server.url, headers=((b"Authorization", key),))
            with pytest.raises(httpx.LocalProtocolError) as injected:
                await post(transport, server.url, headers=((b"Authorization", key + b"\r\nX: y"),))
            await transport.aclose()
        for info in (dropped, injected):
            assert b"sk-very-secret" not in str(info.value).encode()

    run(scenario)


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert, key) for localhost and 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_verifies_the_server_with_ssl_cert_file_and_sends_sni(
    self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    cert, key = self_signed
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,return-value]
    # the default context (ssl.create_default_context) reads SSL_CERT_FILE
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    async def scenario() -> None:
        async with tiny_server(answer_each_request_with(ok()), server_context) as server:
            url = server.url.replace("127.0.0.1", "localhost")
            transport = Http11Transport(max_connections=1)
            for _ in range(2):
                assert (await post(transport, url))[2] == OK_JSON
            await transport.aclose()
            assert server.connections == 1

    run(scenario)
    assert names == ["localhost"]


def test_https_refuses_a_certificate_it_does_not_trust(
    self_signed: tuple[Path, Path], run: Run
) -> None:
    cert, key = self_signed
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def ignore_handshake_failure(peer: Peer) -> None:
        await peer.read_request()

    async def scenario() -> None:
        async with tiny_server(ignore_handshake_failure, server_context) as server:
            transport = Http11Transport(max_connections=1)
            with pytest.raises(httpx.ConnectError, match="not trusted"):
                await post(transport, server.url)
            await transport.aclose()

    run(scenario)


# -- every backend, end to end ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["http11", "aiohttp", "httpx"])
def test_every_http_backend_runs_a_job_through_faults_to_the_same_result(
    backend: str, make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(record=True)
    prompts = [f"question {i}" for i in range(30)]
    prompts[3] += " [[sim:fail=1,status=429,retry_after=0]]"
    prompts[7] += " [[sim:fail=1,status=503,retry_after=0]]"
    prompts[11] += " [[sim:fail=1,drop]]"
    result = pipeline.run(
        pd.DataFrame({"prompt": prompts}),
        tmp_path / "o.parquet",
        base_url=sim.base_url,
        http_backend=backend,
        concurrency=8,
        progress=False,
    )
    assert (result["status"] == "ok").all()
    attempts = result["attempts"].tolist()
    assert attempts[:11] + attempts[12:] == [2 if i in (3, 7) else 1 for i in range(30) if i != 11]
    # a drop on a kept-alive connection looks like a stale one to http11, which resends it
    # once by itself (nothing came back); otherwise it is an attempt that retry.py retries
    assert attempts[11] == (1 if backend == "http11" else 2)
    assert all(c.endswith(p) for c, p in zip(result["completion"], prompts, strict=True))
    sent = sim.simulator.requests
    assert len(sent) == 33
    assert all(r.headers["content-type"] == "application/json" for r in sent)
    assert len({r.headers["x-client-request-id"] for r in sent}) == 30
    assert sim.simulator.stats["connections"] <= 8 + 1  # the dropped one is replaced


def test_only_the_requests_past_their_deadline_time_out(run: Run) -> None:
    async def every_other_stalls(peer: Peer) -> None:
        request = await peer.read_request()
        assert request is not None
        if b"X-N: 1" in request:
            await peer.closed_by_client()
            return
        await asyncio.sleep(0.05)
        peer.write(ok())

    async def scenario() -> None:
        async with tiny_server(every_other_stalls) as server:
            transport = Http11Transport(max_connections=10)
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(
                    post(transport, server.url, total=0.4, headers=((b"X-N", b"%d" % (i % 2)),))
                    for i in range(10)
                ),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
            await transport.aclose()
        assert [isinstance(o, httpx.ReadTimeout) for o in outcomes] == [False, True] * 5
        assert 0.4 <= elapsed < 1.0  # within total + 5% and some scheduling slack

    run(scenario)


def test_a_head_request_through_httpx_reads_no_body(run: Run) -> None:
    async def scenario() -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"
        async with tiny_server(answer_each_request_with(head)) as server:
            transport = Http11Transport(max_connections=1)
            async with httpx.AsyncClient(transport=transport) as client:
                for _ in range(2):
                    response = await client.head(server.url, timeout=2)
                    assert (response.status_code, response.content) == (200, b"")
            assert server.connections == 1

    run(scenario)
