"""Hostile servers on 127.0.0.1 against the HTTP clients (issue 11, items 1 and 4-7).

Each test stands up a small server that misbehaves in one way and checks what a user of
the tool sees: every row keeps its own answer, memory stays bounded by
``--max-response-bytes``, a protocol error names itself at once (never after the timeout,
never as "no running event loop"), and a TLS certificate that fails verification stops the
run instead of being retried on every row.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from test_http11 import (  # the tiny asyncio server and the two-loop fixture
    Peer,
    Run,
    ok,
    post,
    run,  # noqa: F401 (a fixture)
    tiny_server,
)

import pipeline
from pipeline import errors
from pipeline.client import ChatClient, make_transport
from pipeline.http11 import CertificateNotTrusted, Http11Transport, ResponseTooLarge

MiB = 1024 * 1024
CHAT_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def completion(text: str) -> bytes:
    return json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    ).encode()


def bomb(decoded_bytes: int) -> bytes:
    """A gzip body of ``decoded_bytes`` zeros (about 1000 times smaller)."""
    return gzip.compress(b"\0" * decoded_bytes, compresslevel=9)


def header_value(request: bytes, name: bytes) -> bytes:
    for line in request.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return b""


# -- a threaded raw server, for end-to-end runs (pipeline.run has its own event loop) ----------


class RawServer:
    """Answers each request on 127.0.0.1 with ``answer(request)``; counts connections.

    With ``tls`` (a server-side context) every accepted socket does a TLS handshake first;
    a failed one counts in ``handshakes_failed``. With ``stray``, those bytes follow each
    answer 5 ms later, unasked for.
    """

    def __init__(
        self,
        answer: Callable[[bytes], bytes],
        tls: ssl.SSLContext | None = None,
        stray: bytes = b"",
    ) -> None:
        self.answer = answer
        self.stray = stray
        self.connections = 0
        self.handshakes_failed = 0
        self.requests = 0
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner.connections += 1
                sock: socket.socket = self.request
                sock.settimeout(10)
                if tls is not None:
                    try:
                        sock = tls.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError):
                        owner.handshakes_failed += 1
                        return
                owner.serve(sock)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def serve(self, sock: socket.socket) -> None:
        buffer = b""
        for _ in range(1000):  # requests on one connection
            while b"\r\n\r\n" not in buffer:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = int(header_value(head, b"content-length") or 0)
            while len(buffer) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
            self.requests += 1
            try:
                sock.sendall(self.answer(request))
                if self.stray:
                    time.sleep(0.005)
                    sock.sendall(self.stray)
            except OSError:
                return

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def run_rows(server: RawServer, tmp_path: Path, rows: int = 3, **options: Any) -> pd.DataFrame:
    return pipeline.run(
        pd.DataFrame({"prompt": [f"question {i}" for i in range(rows)]}),
        tmp_path / "out.parquet",
        base_url=server.base_url,
        progress=False,
        **options,
    )


# -- item 1: a stray response on an idle connection --------------------------------------------


def test_a_stray_response_on_an_idle_connection_never_answers_the_next_request(
    run: Run,  # noqa: F811
) -> None:
    def answer(request: bytes) -> bytes:
        return ok(b"answer " + header_value(request, b"X-N"))

    async def scenario(url: str) -> list[bytes]:
        transport = Http11Transport(max_connections=2)
        answers = []
        for n in range(6):
            _, _, body = await post(transport, url, headers=((b"X-N", b"%d" % n),))
            answers.append(body)
            # the loop is busy (CPU work of the caller) as the stray response arrives: it
            # waits unread in the socket of the idle connection
            time.sleep(0.2)  # noqa: ASYNC251 (blocking the loop is the point)
        await transport.aclose()
        return answers

    with RawServer(answer, stray=ok(b"stray")) as server:
        url = server.base_url + "/chat/completions"
        answers = run(lambda: scenario(url))
    assert answers == [b"answer %d" % n for n in range(6)]
    assert server.connections == 6  # each connection with a stray answer was dropped


def test_a_connection_handed_to_a_waiting_request_is_checked_for_a_stray_response_too(
    run: Run,  # noqa: F811
) -> None:
    def answer(request: bytes) -> bytes:
        return ok(b"answer " + header_value(request, b"X-N"))

    async def scenario(url: str) -> list[bytes]:
        # one connection, two requests: the second waits for the first one's connection,
        # which is handed to it as the first answer completes
        transport = Http11Transport(max_connections=1)

        async def one(n: int) -> bytes:
            _, _, body = await post(transport, url, headers=((b"X-N", b"%d" % n),))
            time.sleep(0.2)  # noqa: ASYNC251 (busy while the stray answer arrives)
            return body

        answers = await asyncio.gather(one(0), one(1))
        await transport.aclose()
        return list(answers)

    with RawServer(answer, stray=ok(b"stray")) as server:
        url = server.base_url + "/chat/completions"
        assert run(lambda: scenario(url)) == [b"answer 0", b"answer 1"]


# -- item 4: memory bounded by --max-response-bytes ----------------------------------------------


def respond_once(data: bytes) -> Callable[[Peer], Any]:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.write(data)
            await peer.closed_by_client()

    return handler


async def fetch_with_limit(data: bytes, limit: int = MiB) -> tuple[int, list[Any], bytes]:
    async with tiny_server(respond_once(data)) as server:
        transport = Http11Transport(max_connections=1, max_response_bytes=limit)
        try:
            return await post(transport, server.url, total=10)
        finally:
            await transport.aclose()


def test_a_gzip_bomb_fails_at_the_decoded_cap(run: Run) -> None:  # noqa: F811
    body = bomb(64 * MiB)
    response = ok(body, "Content-Encoding: gzip")
    with pytest.raises(ResponseTooLarge, match=r"decoded over 1,048,576 bytes"):
        run(lambda: fetch_with_limit(response))
    # just under the cap, it decodes
    small = ok(bomb(MiB - 1), "Content-Encoding: gzip")
    assert run(lambda: fetch_with_limit(small))[2] == b"\0" * (MiB - 1)


def test_stacked_content_codings_are_refused_past_two(run: Run) -> None:  # noqa: F811
    twice = gzip.compress(gzip.compress(OK := b'{"ok": true}'))
    assert run(lambda: fetch_with_limit(ok(twice, "Content-Encoding: gzip, gzip")))[2] == OK
    thrice = gzip.compress(twice)
    with pytest.raises(ResponseTooLarge, match="3 content codings"):
        run(lambda: fetch_with_limit(ok(thrice, "Content-Encoding: gzip, gzip, gzip")))
    with pytest.raises(ResponseTooLarge, match="3 content codings"):
        run(
            lambda: fetch_with_limit(
                ok(thrice, "Content-Encoding: gzip", "Content-Encoding: gzip, gzip")
            )
        )


def test_a_content_length_over_the_cap_is_refused_before_the_body(run: Run) -> None:  # noqa: F811
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 1000
    with pytest.raises(ResponseTooLarge, match=r"Content-Length 1000000000000"):
        run(lambda: fetch_with_limit(head))


def endless(head: bytes, piece: bytes) -> Callable[[Peer], Any]:
    """Sends ``head``, then ``piece`` over and over (at most 256 MiB) until the client leaves."""

    async def handler(peer: Peer) -> None:
        if await peer.read_request() is None:
            return
        peer.write(head)
        for _ in range(256 * MiB // len(piece)):
            peer.write(piece)
            await peer.writer.drain()

    return handler


@pytest.mark.parametrize(
    ("head", "piece"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"10000\r\n" + b"x" * 65536 + b"\r\n"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"x" * 65536),
    ],
    ids=["chunked", "until-close"],
)  # fmt: skip
def test_an_endless_body_fails_at_the_received_cap(
    head: bytes,
    piece: bytes,
    run: Run,  # noqa: F811
) -> None:
    async def scenario() -> None:
        async with tiny_server(endless(head, piece)) as server:
            transport = Http11Transport(max_connections=1, max_response_bytes=MiB)
            with pytest.raises(ResponseTooLarge, match="as received"):
                await post(transport, server.url, total=30)
            await transport.aclose()

    run(scenario)


@pytest.mark.parametrize("backend", ["http11", "aiohttp", "httpx"])
@pytest.mark.parametrize("kind", ["bomb", "content-length"])
def test_every_backend_fails_an_oversized_answer_as_response_too_large(
    backend: str,
    kind: str,
    run: Run,  # noqa: F811
) -> None:
    if kind == "bomb":
        data = ok(bomb(16 * MiB), "Content-Encoding: gzip")
    else:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 1000

    async def scenario() -> None:
        async with tiny_server(respond_once(data)) as server:
            base_url = server.url.removesuffix("/chat/completions")
            client = ChatClient(
                base_url,
                api_key="sk-test",
                timeout=10,
                transport=make_transport(backend, 1, MiB),
                max_response_bytes=MiB,
            )
            with pytest.raises(errors.ResponseTooLarge, match="max-response-bytes"):
                await client.send(CHAT_BODY, "req-1")
            await client.aclose()

    run(scenario)


def test_a_run_fails_the_row_of_a_gzip_bomb_once_and_keeps_the_others(tmp_path: Path) -> None:
    small_bomb = bomb(8 * MiB)

    def answer(request: bytes) -> bytes:
        if b"question 1" in request:
            return ok(small_bomb, "Content-Encoding: gzip")
        return ok(completion("fine"))

    with RawServer(answer) as server:
        result = run_rows(server, tmp_path, rows=3, max_response_bytes=MiB, concurrency=1)
    assert result["status"].tolist() == ["ok", "error", "ok"]
    assert result["error_type"][1] == "ResponseTooLarge"
    assert "--max-response-bytes" in result["error_message"][1]
    assert result["attempts"][1] == 1  # it would be as large again: not retried
    assert server.requests == 3


def test_max_response_bytes_is_checked(tmp_path: Path) -> None:
    with pytest.raises(pipeline.UsageError, match="--max-response-bytes: at least 1024"):
        pipeline.run(
            pd.DataFrame({"prompt": ["a"]}),
            tmp_path / "o.parquet",
            base_url="http://127.0.0.1:9/v1",
            max_response_bytes=10,
            progress=False,
        )


# -- items 5 and 6: protocol errors, strictly parsed, reported as themselves ---------------------


BAD_ANSWERS = {
    "no end to the headers": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-A: b\r\n" * 9000,
    "bad status line": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nhi",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n",
    "two Content-Length values": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3"
    b"\r\n\r\nhi!",
    # b"\xb9" is a superscript one in Latin-1: "1\u00b9".isdigit() is true, int() fails on it
    "a superscript digit": b"HTTP/1.1 200 OK\r\nContent-Length: 1\xb9\r\n\r\nhi",
    "LF-only line endings": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
    "a bare LF in the head": b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX: y\r\n\r\nhi",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi",
    "an LF-only chunk size line": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\n",
}
EXPECTED = {
    "no end to the headers": "response headers too large",
    "bad status line": "not an HTTP/1.x status line",
    "not HTTP": "not an HTTP/1.x response",
    "two Content-Length values": "conflicting Content-Length",
    "a superscript digit": "bad Content-Length",
    "LF-only line endings": "bare LF",
    "a bare LF in the head": "bare LF",
    "space before the colon": "malformed response header line",
    "an LF-only chunk size line": "bare LF",
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_malformed_response_is_a_protocol_error_at_once(case: str, run: Run) -> None:  # noqa: F811
    async def scenario() -> list[dict[str, Any]]:
        uncaught: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: uncaught.append(ctx))
        async with tiny_server(respond_once(BAD_ANSWERS[case])) as server:
            transport = Http11Transport(max_connections=1)
            # the timeout is far: the error must come from the parser, not from waiting
            with pytest.raises(httpx.RemoteProtocolError, match=EXPECTED[case]):
                await post(transport, server.url, total=60)
            await transport.aclose()
        return uncaught

    assert run(scenario) == []  # nothing escaped a protocol callback


def test_a_protocol_error_ends_the_row_with_its_own_cause(tmp_path: Path) -> None:
    with RawServer(lambda _request: BAD_ANSWERS["bad status line"]) as server:
        result = run_rows(server, tmp_path, rows=2, max_retries=0)
    assert result["status"].tolist() == ["error", "error"]
    assert result["error_type"].tolist() == ["TransportError"] * 2
    for message in result["error_message"]:
        assert "not an HTTP/1.x status line" in message
        assert "no running event loop" not in message


# -- item 7: TLS and redirects ---------------------------------------------------------------------


def make_certificate(where: Path, *, san: bool) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = where / "cert.pem", where / "key.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    if san:
        command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def test_a_certificate_with_a_cn_but_no_subject_alt_name_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run: Run,  # noqa: F811
) -> None:
    cert, key = make_certificate(tmp_path, san=False)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted: only the name is wrong

    async def ignore_handshake_failure(peer: Peer) -> None:
        await peer.read_request()

    async def scenario() -> None:
        async with tiny_server(ignore_handshake_failure, server_context) as server:
            url = server.url.replace("127.0.0.1", "localhost")
            transport = Http11Transport(max_connections=1)
            with pytest.raises(CertificateNotTrusted, match="not trusted"):
                await post(transport, url)
            await transport.aclose()

    run(scenario)


@pytest.fixture
def untrusted_tls(tmp_path: Path) -> ssl.SSLContext:
    cert, key = make_certificate(tmp_path, san=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("backend", ["http11", "aiohttp", "httpx"])
def test_an_untrusted_certificate_stops_the_run_instead_of_retrying_every_row(
    backend: str, untrusted_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    with RawServer(lambda _request: ok(completion("never")), tls=untrusted_tls) as server:
        with pytest.raises(pipeline.RunAborted, match="CertificateError") as caught:
            run_rows(server, tmp_path, rows=20, concurrency=1, max_retries=2, http_backend=backend)
        handshakes = server.connections
    assert "SSL_CERT_FILE" in str(caught.value.reason)
    assert handshakes == 1  # one failed handshake stopped it: no retries, no other rows
    assert server.requests == 0


def test_the_error_of_a_redirect_names_where_it_points(run: Run) -> None:  # noqa: F811
    moved = (
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://api.example.com/v2/chat/completions"
        b"\r\nContent-Length: 0\r\n\r\n"
    )

    async def scenario() -> None:
        async with tiny_server(respond_once(moved)) as server:
            base_url = server.url.removesuffix("/chat/completions")
            client = ChatClient(
                base_url, api_key="sk-test", timeout=5, transport=Http11Transport(max_connections=1)
            )
            with pytest.raises(errors.BadRequest) as caught:
                await client.send(CHAT_BODY, "req-1")
            await client.aclose()
        assert "HTTP 301" in caught.value.message
        assert "Location: https://api.example.com/v2/chat/completions" in caught.value.message

    run(scenario)


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # the servers are on 127.0.0.1: a proxy set in the environment must not be asked
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield
