"""Microbenchmark of the request path alone: N requests, 64 in flight, through each client.

    python benchmarks/transports.py                      # 20k requests x 5 rounds
    python benchmarks/transports.py --requests 5000 --rounds 3

Starts the simulator pinned to core 0 (``taskset -c 0``, 127.0.0.1 only) and measures in this
process, which pins itself to core 1, on uvloop (what ``pipeline run`` uses). Each round runs
every side once, in turn (A, B, C, D, A, B, ...), after a warm-up of 2,000 requests; every
answer is JSON-parsed. Reported per side: the median over rounds of wall time and of this
process's CPU time (``time.process_time``) per request. CPU per request is the figure to
read: at zero latency the client core is the limit in ``pipeline run``, while wall time here
also waits on the server. The sides:

- ``aiohttp-transport``: ``AiohttpTransport.fetch(httpx.Request)``, the client's path before
  http11 (and still with ``http_backend = "aiohttp"``), ``httpx.Request`` built as client.py
  builds it;
- ``http11-route``: ``Http11Transport.route(...).fetch(body, headers)``, the client's path now;
- ``http11-request``: ``Http11Transport.fetch(httpx.Request)``, the same transport fed an
  ``httpx.Request`` (what building one costs);
- ``bare-aiohttp``: ``ClientSession.post`` as benchmarks/bare_loop.py does it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvloop

from pipeline.http11 import Http11Transport
from pipeline.transport import AiohttpTransport

CONCURRENCY = 64
Send = Callable[[int], Awaitable[tuple[int, Any, bytes]]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator(port: int) -> Any:
    cmd = [sys.executable, "-m", "pipeline", "simulate", "--host", "127.0.0.1", "--port", str(port)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


async def drive(send: Send, requests: int) -> tuple[float, float]:
    numbers = iter(range(requests))

    async def worker() -> None:
        for i in numbers:
            status, _, content = await send(i)
            assert status == 200, status
            json.loads(content)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def one_side(name: str, url: str, requests: int) -> tuple[float, float]:
    headers = [
        (b"Host", httpx.URL(url).netloc),
        (b"Content-Type", b"application/json"),
        (b"Accept", b"application/json"),
        (b"User-Agent", b"bench/0.1"),
    ]
    body = json.dumps(
        {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "x " * 150}]}
    ).encode()
    timeouts = {"connect": 60, "read": 60, "write": 60, "pool": 60, "total": 60}

    def request(i: int) -> httpx.Request:
        return httpx.Request(
            "POST",
            url,
            headers=[
                *headers,
                (b"X-Client-Request-Id", b"bpp-%016x" % i),
                (b"Content-Length", b"%d" % len(body)),
            ],
            stream=httpx.ByteStream(body),
            extensions={"timeout": timeouts},
        )

    close: Callable[[], Awaitable[None]]
    send: Send
    if name == "aiohttp-transport":
        aio = AiohttpTransport(max_connections=CONCURRENCY)
        send, close = (lambda i: aio.fetch(request(i))), aio.aclose
    elif name == "http11-request":
        h11 = Http11Transport(max_connections=CONCURRENCY)
        send, close = (lambda i: h11.fetch(request(i))), h11.aclose
    elif name == "http11-route":
        h11 = Http11Transport(max_connections=CONCURRENCY)
        route = h11.route("POST", url, headers)

        def send(i: int) -> Awaitable[tuple[int, Any, bytes]]:
            return route.fetch(body, ((b"X-Client-Request-Id", b"bpp-%016x" % i),), total=60)

        close = h11.aclose
    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
        plain = {k.decode(): v.decode() for k, v in headers if k != b"Host"}

        async def send(i: int) -> tuple[int, Any, bytes]:
            async with session.post(url, data=body, headers=plain) as response:
                return response.status, response.raw_headers, await response.read()

        close = session.close
    await drive(send, 2000)  # warm-up: connections open, code paths hot
    result = await drive(send, requests)
    await close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--sides", default="aiohttp-transport,http11-route,http11-request,bare-aiohttp"
    )
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    sides = args.sides.split(",")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    runs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    with simulator(port):
        for round_number in range(args.rounds):
            for side in sides:
                wall, cpu = uvloop.run(one_side(side, url, args.requests))
                runs[side].append((wall, cpu))
                print(
                    f"round {round_number} {side:18s} wall {wall / args.requests * 1e6:6.1f} "
                    f"us/request  CPU {cpu / args.requests * 1e6:6.1f} us/request",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"| client path ({args.requests:,} requests, 64 in flight) | CPU µs/request | wall µs/request |"
    )
    print("| --- | ---: | ---: |")
    for side in sides:
        cpu = statistics.median(c for _, c in runs[side]) / args.requests * 1e6
        wall = statistics.median(w for w, _ in runs[side]) / args.requests * 1e6
        print(f"| {side} | {cpu:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
