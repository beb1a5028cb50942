"""Shared fixtures: simulator servers on free ports, stopped after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

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
