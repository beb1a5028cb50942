"""Shared test helpers and fixtures: simulator servers on free ports (stopped after each
test), the provider's request schema, an in-process run (``run_job``), the CLI in this
process (``cli``) or as a real subprocess without API-key variables (``KEY_VARS``,
``env_without_keys``, ``run_pipeline``, ``run_cli``), an input CSV (``write_csv``) and a
fake clock (``FakeTime``). Does not hold assertions or test data of any one module."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import RunAborted
from pipeline.progress import Reporter
from pipeline.records import RunSummary
from pipeline.runner import Seams, run_async
from pipeline.simulator import SimulatorConfig, SimulatorThread


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    """A running simulator with the default config; ``.base_url`` ends in ``/v1``."""
    with SimulatorThread() as running:
        yield running


@pytest.fixture
def make_simulator() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators from ``SimulatorConfig`` keywords: ``make_simulator(rate_500=1.0)``."""
    started: list[SimulatorThread] = []

    def start(**config: Any) -> SimulatorThread:
        running = SimulatorThread(SimulatorConfig(**config))
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


SPEC = Path(__file__).parent / "spec" / "aimlapi-gpt-3.5-turbo.openapi.json"


@pytest.fixture(scope="session")
def request_schema() -> dict[str, Any]:
    """The provider's JSON Schema for a chat-completions request body (tests/spec/)."""
    spec = json.loads(SPEC.read_text())
    post = spec["paths"]["/v1/chat/completions"]["post"]
    schema: dict[str, Any] = post["requestBody"]["content"]["application/json"]["schema"]
    return schema


def run_job(
    data: Any, output: Path, reporter: Reporter | None = None, **options: Any
) -> RunSummary:
    """One run in this process, quiet, no signal handlers; the summary even when the run
    stopped (``RunAborted``): what a CLI run would report."""
    import asyncio

    seams = Seams(reporter=reporter or Reporter(progress=False, quiet=True), handle_signals=False)
    try:
        return asyncio.run(run_async(data, output, RunConfig(progress=False, **options), seams))
    except RunAborted as exc:
        summary: RunSummary = exc.summary  # type: ignore[attr-defined]
        return summary


KEY_VARS = ("AIMLAPI_API_KEY", "OPENAI_API_KEY")


def env_without_keys(**extra: str) -> dict[str, str]:
    """This process's environment without the API-key variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    env.update(extra)
    return env


def run_pipeline(
    cwd: Path, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pipeline ARGS`` in ``cwd`` without API-key variables unless ``env`` is given: in
    this process through Click's runner (the same code as the installed command, minus the
    interpreter start-up), or as a real process when ``command`` names the entry point."""
    if command is not None:
        return subprocess.run(
            [*command, *args],
            cwd=cwd,
            env=env if env is not None else env_without_keys(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    return _in_process(cwd, list(args), env if env is not None else env_without_keys())


def _in_process(
    cwd: Path, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    from click.testing import CliRunner

    from pipeline.cli import main

    # the environment exactly as given: variables it lacks are unset for the call
    changes: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    changes.update(env)
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args, env=changes, catch_exceptions=False)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(
        ["pipeline", *args], result.exit_code, result.stdout, result.stderr
    )


def run_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pipeline run ARGS --no-progress`` as a real process (see ``run_pipeline``)."""
    return run_pipeline(cwd, "run", *args, "--no-progress", env=env, command=command)


def cli(*args: Any, env: dict[str, str] | None = None) -> Result:
    """``pipeline ARGS`` in this process; the result has exit_code, stdout and stderr."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def write_csv(path: Path, prompts: list[str | None], **columns: list[Any]) -> Path:
    """A CSV input at ``path``: the ``columns`` given, then ``prompt``."""
    pd.DataFrame({**columns, "prompt": prompts}).to_csv(path, index=False)
    return path


class FakeTime:
    """A clock that moves only when somebody sleeps on it: ``clock`` reads it, ``sleep``
    (or the object itself, a stand-in for ``asyncio.sleep``) records the wait in ``waits``,
    moves the clock on and yields once, returning at once."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)

    async def __call__(self, seconds: float) -> None:
        await self.sleep(seconds)


S3_SECRET = "s3cr3t-never-shown-0123456789"


def point_aws_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS variables, pointing at the S3-protocol server at ``endpoint``."""
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIDTESTING",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real S3-protocol server (moto's) on 127.0.0.1 with buckets ``inputs`` and
    ``outputs``; the standard AWS variables point at it (the secret is ``S3_SECRET``).
    Yields a boto3 client of it (moto's own client: the pipeline uses pyarrow's)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test extra")
    boto3 = pytest.importorskip("boto3", reason="moto[server] brings it")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its stores per process, not per server: start from empty ones
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    point_aws_at(monkeypatch, endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in ("inputs", "outputs"):
        client.create_bucket(Bucket=bucket)
    yield client
    server.stop()


def spawn(args: list[Any], log: Path, *, work: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m pipeline ARGS`` as a real process in ``log``'s folder, its output in
    ``log``; ``work``: its ``PIPELINE_WORK_DIR`` (working copies of object-storage OUTPUTs,
    as on a host of its own)."""
    env = dict(os.environ) if work is None else {**os.environ, "PIPELINE_WORK_DIR": str(work)}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", *(str(a) for a in args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            env=env,
        )


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    """Until ``condition`` holds (at most 60 s); fails when ``proc`` ends first."""
    deadline = time.monotonic() + 60
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill_job(
    tmp_path: Path,
    base_url: str,
    output: str,
    *,
    seed: int,
    rows: int,
    concurrency: int,
    checkpoint_seconds: float,
) -> tuple[random.Random, list[str], list[Any]]:
    """A job for the SIGKILL tests: ``rows`` distinct prompts in ``in.csv``, parts every
    ``checkpoint_seconds``; returns the random source, the prompts and the ``pipeline run``
    arguments (add ``--shard``)."""
    rng = random.Random(seed)
    prompts = [f"row {i}: about {rng.randrange(10**6)}" for i in range(rows)]
    source = write_csv(tmp_path / "in.csv", prompts)
    (tmp_path / "job.toml").write_text(f"checkpoint_seconds = {checkpoint_seconds}\n")
    base = [
        "run", source, "-o", output, "--base-url", base_url, "--no-progress",
        "--config", tmp_path / "job.toml", "--concurrency", concurrency,
    ]  # fmt: skip
    return rng, prompts, base
