"""A run whose first requests all fail the same way stops at once with one message and
leaves those rows pending; a run where only some requests fail goes on."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import run_job as run

from pipeline.errors import EXIT_ABORTED
from pipeline.progress import Reporter
from pipeline.simulator import SimulatorConfig, SimulatorThread

ROWS = 300


def prompts(n: int = ROWS) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"row {i}" for i in range(n)]})


class Errors(Reporter):
    def __init__(self) -> None:
        super().__init__(progress=False, quiet=True)
        self.messages: list[str] = []

    def error(self, message: str, **fields: Any) -> None:
        self.messages.append(message)


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: connecting is refused


def test_a_wrong_base_url_path_stops_the_run_and_the_fixed_rerun_sends_every_row_once(
    tmp_path: Path,
) -> None:
    out = tmp_path / "o.parquet"
    reporter = Errors()
    with SimulatorThread() as sim:
        wrong = sim.base_url.removesuffix("/v1") + "/api"
        summary = run(prompts(), out, reporter, base_url=wrong, concurrency=16)
        assert summary.exit_code == EXIT_ABORTED
        assert summary.pending == ROWS and summary.error == 0
        assert len(sim.simulator.requests) <= 10 + 16  # stopped after the first failures
        assert len(reporter.messages) == 1
        assert "404" in reporter.messages[0] and wrong in reporter.messages[0]
        assert (pd.read_parquet(out)["status"] == "pending").all()
        first = len(sim.simulator.requests)
        fixed = run(prompts(), out, base_url=sim.base_url, concurrency=16)
        assert (fixed.ok, fixed.exit_code) == (ROWS, 0)
        assert len(sim.simulator.requests) - first == ROWS


@pytest.mark.parametrize(
    "server", ["refused port", "500 to every request"], ids=["refused", "always-500"]
)
def test_a_server_that_never_answers_well_stops_the_run_long_before_the_retries_run_out(
    tmp_path: Path, server: str
) -> None:
    reporter = Errors()
    if server == "refused port":
        summary = run(
            prompts(), tmp_path / "o.parquet", reporter,
            base_url=f"http://127.0.0.1:{refused_port()}/v1", concurrency=8,
        )  # fmt: skip
        sent = None
    else:
        with SimulatorThread(SimulatorConfig(rate_500=1.0)) as sim:
            summary = run(
                prompts(), tmp_path / "o.parquet", reporter, base_url=sim.base_url, concurrency=8
            )
            sent = len(sim.simulator.requests)
    assert summary.exit_code == EXIT_ABORTED
    assert summary.pending == ROWS
    assert "none succeeded" in (summary.aborted or "")
    assert len(reporter.messages) == 1
    if sent is not None:
        assert sent <= 10 + 8  # not 300 rows x 6 attempts


def test_scattered_failures_do_not_stop_a_run(tmp_path: Path) -> None:
    with SimulatorThread(SimulatorConfig(rate_500=0.2, seed=7)) as sim:
        summary = run(
            prompts(40), tmp_path / "o.parquet", base_url=sim.base_url, concurrency=16,
            max_retries=20, max_retry_wait=0.01,
        )  # fmt: skip
    assert summary.aborted is None
    assert summary.ok == 40


def test_429s_at_the_start_do_not_stop_a_run(tmp_path: Path) -> None:
    # an unannounced limit answers most of the first requests 429: that is rate, not setup
    with SimulatorThread(SimulatorConfig(rate_429=0.5, retry_after_s=0.001, seed=3)) as sim:
        summary = run(
            prompts(12), tmp_path / "o.parquet", base_url=sim.base_url, concurrency=12,
            max_retries=60, max_retry_wait=0.01,
        )  # fmt: skip
    assert summary.aborted is None
    assert summary.ok == 12


def test_a_small_job_whose_rows_all_fail_ends_with_error_rows(tmp_path: Path) -> None:
    with SimulatorThread() as sim:
        summary = run(
            prompts(3), tmp_path / "o.parquet", base_url=sim.base_url.removesuffix("/v1") + "/api"
        )
    assert (summary.error, summary.pending, summary.exit_code) == (3, 0, 1)
    assert (pd.read_parquet(tmp_path / "o.parquet")["http_status"] == 404).all()


def test_an_empty_first_row_or_samples_do_not_keep_a_wrong_url_from_stopping_the_run(
    tmp_path: Path,
) -> None:
    # a skipped row and shared samples carry no attempt: they say nothing of the setup
    with SimulatorThread() as sim:
        wrong = sim.base_url.removesuffix("/v1") + "/api"
        frame = pd.DataFrame({"prompt": ["", *(f"row {i}" for i in range(299))]})
        skipped_first = run(frame, tmp_path / "a.parquet", base_url=wrong, concurrency=8)
        samples = run(prompts(), tmp_path / "b.parquet", base_url=wrong, concurrency=8, n=3)
    assert skipped_first.exit_code == EXIT_ABORTED and skipped_first.pending == 299
    assert samples.exit_code == EXIT_ABORTED and samples.pending == 3 * ROWS


def test_timeouts_of_a_cold_start_do_not_stop_the_run(tmp_path: Path) -> None:
    frame = pd.DataFrame({"prompt": [f"row {i} [[sim:fail=1,timeout]]" for i in range(40)]})
    with SimulatorThread() as sim:
        summary = run(
            frame, tmp_path / "o.parquet", base_url=sim.base_url, concurrency=16, timeout=0.5,
            max_retry_wait=0.05,
        )  # fmt: skip
    assert (summary.ok, summary.aborted) == (40, None)


def test_rows_too_long_for_the_model_are_their_own_errors_not_a_setup_failure(
    tmp_path: Path,
) -> None:
    frame = pd.DataFrame(
        {
            "prompt": [f"long {i} [[sim:context_length]]" for i in range(12)]
            + [f"row {i}" for i in range(40)]
        }
    )
    with SimulatorThread() as sim:
        summary = run(frame, tmp_path / "o.parquet", base_url=sim.base_url, concurrency=4)
    assert (summary.ok, summary.error, summary.pending, summary.exit_code) == (40, 12, 0, 1)
