"""Proxies (pipeline/proxy.py): every backend goes through a real forwarding proxy on
127.0.0.1 when HTTPS_PROXY / HTTP_PROXY / --proxy say so, bypasses it when NO_PROXY
matches, sends the proxy's credentials and never shows them.

The proxy here is small but real: CONNECT tunnels (https, and http for the built-in
client) and absolute-form requests (http with httpx and aiohttp), optional Basic auth, an
optional refusal status. It forwards every target to one upstream (the simulator, or a TLS
front of it), so a run can name a target port where nothing listens: a row that answers
can only have gone through the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.errors import ConfigError, RunAborted
from pipeline.proxy import (
    bypasses,
    mask_credentials,
    parse_no_proxy,
    settings_from,
)
from pipeline.simulator import SimulatorThread

BACKENDS = ["http11", "aiohttp", "httpx"]
SECRET = "s3cr3t-Pa55"
USER = "alice"
PROXY_ENV = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
]


# -- NO_PROXY matching and the environment -----------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "api.example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        ("example.com", "example.com.evil.org", 443, False),
        ("EXAMPLE.com", "Api.Example.COM", 443, True),
        ("*", "anything.org", 443, True),
        ("a.org, b.org", "b.org", 443, True),
        ("a.org b.org", "b.org", 443, True),
        ("10.0.0.0/8", "10.20.30.40", 443, True),
        ("10.0.0.0/8", "11.0.0.1", 443, False),
        ("10.0.0.0/8", "10.example.com", 443, False),
        ("192.168.1.5", "192.168.1.5", 80, True),
        ("192.168.1.5", "192.168.1.6", 80, False),
        ("::1", "::1", 443, True),
        ("fd00::/8", "fd12::1", 443, True),
        ("fd00::/8", "10.0.0.1", 443, False),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        ("example.com:8443", "api.example.com", 8443, True),
        ("example.com:8443", "api.example.com", 443, False),
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("localhost", "127.0.0.1", 443, False),  # names are not resolved
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_matches_like_curl(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    assert bypasses(parse_no_proxy(no_proxy), host, port) is bypassed


def test_lower_case_variables_win_and_all_proxy_fills_in() -> None:
    settings = settings_from(
        None,
        {
            "HTTPS_PROXY": "http://upper:1",
            "https_proxy": "http://lower:2",
            "ALL_PROXY": "all:3",
            "NO_PROXY": "upper.org",
            "no_proxy": "lower.org",
        },
    )
    assert settings.https is not None and settings.https.display == "http://lower:2"
    assert settings.https.source == "https_proxy"
    assert settings.http is not None and settings.http.display == "http://all:3"
    assert settings.for_url("https", "lower.org", 443) is None
    assert settings.for_url("https", "upper.org", 443) is not None


def test_the_start_line_names_the_proxy_of_the_base_url_only() -> None:
    settings = settings_from(None, {"HTTP_PROXY": "http://u:pw@p:1", "NO_PROXY": "local"})
    assert settings.describe("http://api.org/v1") == (
        "requests to api.org go through proxy http://***@p:1 (HTTP_PROXY)"
    )
    assert settings.describe("https://api.org/v1") is None  # no proxy for https
    assert settings.describe("http://local:8000/v1") == (
        "requests to local go direct: NO_PROXY matches it"
    )


def test_an_explicit_proxy_beats_the_environment_and_empty_turns_proxies_off() -> None:
    env = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "skip.org"}
    explicit = settings_from("http://u:p@given:8080", env)
    assert explicit.https is not None and explicit.https.display == "http://***@given:8080"
    assert explicit.http == explicit.https
    assert explicit.for_url("https", "skip.org", 443) is None  # NO_PROXY still applies
    for off in ("", "none"):
        assert settings_from(off, env).for_url("https", "api.org", 443) is None


@pytest.mark.parametrize("value", ["socks5://u:pw@h:1080", "https://u:pw@h:443", "http://"])
def test_a_proxy_we_cannot_use_is_a_config_error_without_its_password(value: str) -> None:
    settings = settings_from(None, {"HTTPS_PROXY": value, "NO_PROXY": "local.org"})
    with pytest.raises(ConfigError, match="HTTPS_PROXY") as caught:
        settings.check("https://api.org/v1")
    assert "pw" not in str(caught.value)
    settings.check("https://local.org/v1")  # not used: no error
    settings.check("http://api.org/v1")
    with pytest.raises(ConfigError, match="--proxy") as caught:
        settings_from(value, {})
    assert "pw" not in str(caught.value)


def test_a_run_whose_proxy_variable_is_unusable_stops_before_sending(
    simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ALL_PROXY", f"socks5://{USER}:{SECRET}@127.0.0.1:1080")
    with pytest.raises(ConfigError, match="ALL_PROXY: socks5:// proxies are not supported"):
        _run(tmp_path, simulator.base_url, "http11")
    assert simulator.simulator.stats["requests"] == 0
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert (_run(tmp_path, simulator.base_url, "http11")["status"] == "ok").all()


def test_credentials_are_masked_in_any_text() -> None:
    text = "407, url='http://alice:s3cr3t@proxy:3128' and https://tok@h/x"
    assert mask_credentials(text) == "407, url='http://***@proxy:3128' and https://***@h/x"


# -- a real forwarding proxy -------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread for servers used by synchronous runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.Server] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def serve(self, handler: Any, ssl_context: ssl.SSLContext | None = None) -> int:
        """Start a server on 127.0.0.1 (closed by ``stop``); returns its port."""

        async def start() -> asyncio.Server:
            return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)

        server = self.call(start())
        self.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 message framed by Content-Length (all the simulator and clients send)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


class ForwardingProxy:
    """CONNECT and absolute-form forwarding to ``upstream`` (host, port), whatever the target.

    Counts ``tunnels`` (CONNECTs that succeeded) and ``forwarded`` (absolute-form requests),
    keeps every ``Proxy-Authorization`` value in ``auth_seen``; ``auth`` (user, password)
    makes it answer 407 without them, ``refuse`` makes it answer every CONNECT with that status.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        auth: tuple[str, str] | None = None,
        refuse: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.expected = (
            b"Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()) if auth else None
        )
        self.refuse = refuse
        self.tunnels = 0
        self.forwarded = 0
        self.targets: list[str] = []
        self.auth_seen: list[bytes | None] = []
        self.port = 0

    def _authorized(self, head: bytes) -> bool:
        seen = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"proxy-authorization":
                seen = value.strip()
        self.auth_seen.append(seen)
        return self.expected is None or seen == self.expected

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            message = await _read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        method, target, _ = message.split(b"\r\n", 1)[0].split(b" ", 2)
        self.targets.append(target.decode())
        if not self._authorized(message):
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
            )
            writer.close()
            return
        if method == b"CONNECT":
            if self.refuse is not None:
                writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self.refuse)
                writer.close()
                return
            upstream = await asyncio.open_connection(*self.upstream)
            self.tunnels += 1
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _splice((reader, writer), upstream)
            return
        # absolute-form: each request rewritten to origin-form, answered, next one read
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            while True:
                self.forwarded += 1
                _, rest = message.split(b"\r\n", 1)
                path = b"/" + target.split(b"/", 3)[3]
                up_writer.write(b"%s %s HTTP/1.1\r\n%s" % (method, path, rest))
                writer.write(await _read_message(up_reader))
                await writer.drain()
                message = await _read_message(reader)
                method, target, _ = message.split(b"\r\n", 1)[0].split(b" ", 2)
                if not self._authorized(message):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            writer.close()


class TlsFront:
    """TLS in front of a plain upstream (the simulator); records the SNI names it saw."""

    def __init__(self, upstream: tuple[str, int], cert: Path, key: Path) -> None:
        self.upstream = upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.names: list[str | None] = []
        self.context.sni_callback = lambda _s, name, _c: self.names.append(name)  # type: ignore[assignment,return-value]
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _splice((reader, writer), await asyncio.open_connection(*self.upstream))


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.stop()


@pytest.fixture
def make_proxy(loop_thread: LoopThread) -> Callable[..., ForwardingProxy]:
    def start(upstream: tuple[str, int], **options: Any) -> ForwardingProxy:
        proxy = ForwardingProxy(upstream, **options)
        proxy.port = loop_thread.serve(proxy._serve)
        return proxy

    return start


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens (bound, not listening: connects are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(autouse=True)
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


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


def _upstream(sim: SimulatorThread) -> tuple[str, int]:
    port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
    return ("127.0.0.1", port)


PROMPTS = [f"question {i}" for i in range(6)]
BASIC = b"Basic " + base64.b64encode(f"{USER}:{SECRET}".encode())


def _run(tmp_path: Path, base_url: str, backend: str, **options: Any) -> pd.DataFrame:
    return pipeline.run(
        pd.DataFrame({"prompt": PROMPTS}),
        tmp_path / "o.parquet",
        base_url=base_url,
        http_backend=backend,
        concurrency=2,
        progress=False,
        **options,
    )


def _assert_no_secret(tmp_path: Path, captured: pytest.CaptureResult[str]) -> None:
    assert SECRET not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("backend", BACKENDS)
def test_http_requests_go_through_the_proxy_of_http_proxy_with_its_credentials(
    backend: str,
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator), auth=(USER, SECRET))
    monkeypatch.setenv("HTTP_PROXY", f"http://{USER}:{SECRET}@127.0.0.1:{proxy.port}")
    # nothing listens on the target port: only the proxy can answer
    result = _run(tmp_path, f"http://127.0.0.1:{closed_port}/v1", backend)
    assert (result["status"] == "ok").all(), result["error_message"].tolist()
    assert all(c.endswith(p) for c, p in zip(result["completion"], PROMPTS, strict=True))
    assert proxy.tunnels + proxy.forwarded >= 1
    assert set(proxy.auth_seen) == {BASIC}
    assert f"127.0.0.1:{closed_port}" in proxy.targets[0]
    captured = capsys.readouterr()
    assert f"through proxy http://***@127.0.0.1:{proxy.port} (HTTP_PROXY)" in captured.err
    assert captured.err.count("through proxy") == 1
    _assert_no_secret(tmp_path, captured)
    assert SECRET not in repr(result.attrs["summary"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_https_goes_through_a_connect_tunnel_with_tls_to_the_target(
    backend: str,
    simulator: SimulatorThread,
    loop_thread: LoopThread,
    make_proxy: Callable[..., ForwardingProxy],
    self_signed: tuple[Path, Path],
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    cert, key = self_signed
    front = TlsFront(_upstream(simulator), cert, key)
    front.port = loop_thread.serve(front._serve, front.context)
    proxy = make_proxy(("127.0.0.1", front.port), auth=(USER, SECRET))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("https_proxy", f"{USER}:{SECRET}@127.0.0.1:{proxy.port}")
    result = _run(tmp_path, f"https://localhost:{closed_port}/v1", backend)
    assert (result["status"] == "ok").all(), result["error_message"].tolist()
    assert proxy.tunnels >= 1 and proxy.forwarded == 0
    assert proxy.targets[0] == f"localhost:{closed_port}"
    assert set(proxy.auth_seen) == {BASIC}
    assert set(front.names) == {"localhost"}  # TLS to the target's name, through the tunnel
    captured = capsys.readouterr()
    assert f"through proxy http://***@127.0.0.1:{proxy.port} (https_proxy)" in captured.err
    _assert_no_secret(tmp_path, captured)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_proxy_sends_requests_direct(
    backend: str,
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator))
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.0/8")
    result = _run(tmp_path, simulator.base_url, backend)
    assert (result["status"] == "ok").all(), result["error_message"].tolist()
    assert proxy.targets == []
    assert "go direct: NO_PROXY matches it" in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_proxy_that_wants_credentials_stops_the_run_naming_it_without_the_password(
    backend: str,
    scheme: str,
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator), auth=(USER, "the-right-one"))
    variable = f"{scheme.upper()}_PROXY"
    monkeypatch.setenv(variable, f"http://{USER}:{SECRET}@127.0.0.1:{proxy.port}")
    with pytest.raises(RunAborted) as caught:
        _run(tmp_path, f"{scheme}://localhost:9/v1", backend)
    text = str(caught.value)
    expected = f"proxy http://***@127.0.0.1:{proxy.port} ({variable}) refused"
    assert expected in text and "localhost:9: 407" in text
    assert "check the user name and password" in text
    assert len(proxy.targets) <= 2  # the two in flight at most: not retried
    _assert_no_secret(tmp_path, capsys.readouterr())
    assert SECRET not in text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("status", [403, 502])
def test_a_proxy_that_refuses_connect_is_named_in_the_row_or_run_error(
    backend: str,
    status: int,
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator), refuse=status)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    expected = f"proxy http://127.0.0.1:{proxy.port} (HTTPS_PROXY) refused CONNECT to localhost:9"
    if status == 403:
        with pytest.raises(RunAborted, match=expected.replace("(", r"\(").replace(")", r"\)")):
            _run(tmp_path, "https://localhost:9/v1", backend, max_retries=0)
        return
    result = _run(tmp_path, "https://localhost:9/v1", backend, max_retries=0)
    assert (result["status"] == "error").all()
    assert all(expected in m and "502" in m for m in result["error_message"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_proxy_that_cannot_be_reached_says_so(
    backend: str, closed_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{SECRET}@127.0.0.1:{closed_port}")
    result = _run(tmp_path, "https://localhost:9/v1", backend, max_retries=0, timeout=5)
    assert (result["status"] == "error").all()
    for message in result["error_message"]:
        assert f"proxy http://***@127.0.0.1:{closed_port} (HTTPS_PROXY)" in message
        assert SECRET not in message


def test_the_proxy_option_beats_the_environment_and_empty_turns_it_off(
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator), auth=(USER, SECRET))
    # the environment names a proxy that is not there
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    data = tmp_path / "in.csv"
    data.write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    common = ["run", str(data), "--base-url", simulator.base_url, "--no-progress"]
    given = f"http://{USER}:{SECRET}@127.0.0.1:{proxy.port}"
    out = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "a.parquet"), "--proxy", given])
    assert out.exit_code == 0, out.output
    tunnels = proxy.tunnels
    assert tunnels >= 1 and set(proxy.auth_seen) == {BASIC}
    assert f"through proxy http://***@127.0.0.1:{proxy.port} (--proxy)" in out.output
    assert SECRET not in out.output
    manifest = (tmp_path / "a.parquet.checkpoint" / "manifest.json").read_text()
    assert SECRET not in manifest and f"***@127.0.0.1:{proxy.port}" in manifest
    out = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "b.parquet"), "--proxy", ""])
    assert out.exit_code == 0, out.output
    assert proxy.tunnels == tunnels  # direct


def test_the_demo_never_sends_its_local_simulator_through_a_proxy(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the simulator of the demo runs in-process: an HTTP_PROXY (here one that is not
    # there) must not take its requests
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    root = Path(__file__).parent.parent
    config = (root / "configs" / "demo.toml").read_text()
    (tmp_path / "demo.toml").write_text(config.replace("127.0.0.1:8765", f"127.0.0.1:{port}"))
    data = tmp_path / "in.csv"
    data.write_text("id,product,review\n" + "".join(f"{i},p{i},r{i}\n" for i in range(4)))
    args = ["demo", "-o", str(tmp_path / "o.parquet"), "--input", str(data)]
    out = CliRunner().invoke(main, [*args, "--config", str(tmp_path / "demo.toml")])
    assert out.exit_code == 0, out.output
    assert (pd.read_parquet(tmp_path / "o.parquet")["status"] == "ok").all()
    assert "proxy" not in out.output


def test_the_proxy_key_of_a_toml_config_is_used_and_masked_in_the_manifest(
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    closed_port: int,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator), auth=(USER, SECRET))
    config = tmp_path / "job.toml"
    config.write_text(f'proxy = "http://{USER}:{SECRET}@127.0.0.1:{proxy.port}"\n')
    result = _run(tmp_path, f"http://127.0.0.1:{closed_port}/v1", "http11", config=config)
    assert (result["status"] == "ok").all()
    assert proxy.tunnels >= 1 and set(proxy.auth_seen) == {BASIC}
    manifest = json.loads((tmp_path / "o.parquet.checkpoint" / "manifest.json").read_text())
    assert manifest["config"]["proxy"] == f"http://***@127.0.0.1:{proxy.port}"


def test_a_proxy_that_never_answers_connect_is_named_in_the_timeout(
    loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the CONNECT, answers nothing, until the client leaves
        writer.close()

    port = loop_thread.serve(silent)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    result = _run(tmp_path, "https://localhost:9/v1", "http11", max_retries=0, timeout=0.5)
    assert (result["status"] == "error").all()
    for message in result["error_message"]:
        assert f"through proxy http://127.0.0.1:{port} (HTTPS_PROXY) within 0.5s" in message


def test_the_python_api_takes_proxy_as_an_option(
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    closed_port: int,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(_upstream(simulator))
    given = f"http://127.0.0.1:{proxy.port}"
    result = _run(tmp_path, f"http://127.0.0.1:{closed_port}/v1", "httpx", proxy=given)
    assert (result["status"] == "ok").all() and proxy.forwarded == len(PROMPTS)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_http11_tunnels_on_either_event_loop(
    loop_kind: str,
    simulator: SimulatorThread,
    make_proxy: Callable[..., ForwardingProxy],
    closed_port: int,
) -> None:
    from pipeline.http11 import Http11Transport

    proxy = make_proxy(_upstream(simulator), auth=(USER, SECRET))
    settings = settings_from(f"http://{USER}:{SECRET}@127.0.0.1:{proxy.port}", {})
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'

    async def scenario() -> list[int]:
        transport = Http11Transport(max_connections=2, proxies=settings)
        route = transport.route(
            "POST",
            f"http://127.0.0.1:{closed_port}/v1/chat/completions",
            [(b"Content-Type", b"application/json")],
        )
        statuses = [(await route.fetch(body, total=5))[0] for _ in range(3)]
        await transport.aclose()
        return statuses

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            statuses = runner.run(scenario())
    else:
        statuses = asyncio.run(scenario())
    assert statuses == [200, 200, 200]
    assert proxy.tunnels == 1  # one tunnel, kept alive for the three requests
    assert set(proxy.auth_seen) == {BASIC}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_whose_proxy_is_not_there_stops_early_naming_it(
    backend: str, closed_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # every first attempt fails to reach the proxy: a setup failure, like a refused port
    monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{SECRET}@127.0.0.1:{closed_port}")
    with pytest.raises(RunAborted) as caught:
        pipeline.run(
            pd.DataFrame({"prompt": [f"q{i}" for i in range(40)]}),
            tmp_path / "o.parquet",
            base_url="https://localhost:9/v1",
            http_backend=backend,
            concurrency=2,
            progress=False,
        )
    text = str(caught.value)
    assert f"proxy http://***@127.0.0.1:{closed_port} (HTTPS_PROXY)" in text, text
    assert SECRET not in text
