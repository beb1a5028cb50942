"""Shared fixtures: simulator servers on free ports, stopped after each test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
