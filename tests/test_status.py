"""``pipeline status OUTPUT [--json]``: rows total / ok / error / skipped / pending, tokens and
the fingerprint, read from the checkpoint, during a run and after it.

The during-a-run test starts ``python -m pipeline run`` as a real subprocess and stops it with
a real SIGTERM; ``status`` itself is called in this process (``click.testing.CliRunner``) so
that polling is cheap, and once as a real subprocess.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import cli, write_csv

from pipeline.simulator import SimulatorThread

MakeSimulator = Callable[..., SimulatorThread]
STATUS_KEYS = {
    "output",
    "rows_total",
    "ok",
    "error",
    "skipped",
    "invalid",
    "pending",
    "prompt_tokens",
    "completion_tokens",
    "fingerprint",
    "model",
    "running",
    "running_by",
    "output_written",
    "cost_usd",
    "unpriced_models",
    "exit_code",
    "exit_reason",
}
# status exits with the state: 0 all ok/skipped, 1 some failed, 5 pending (stopped), 8 running
STATE_CODES = {0, 1, 5, 8}


def run_args(sim: SimulatorThread, source: Path, output: Path, *extra: Any) -> list[str]:
    return [
        "run",
        str(source),
        "-o",
        str(output),
        "--base-url",
        sim.base_url,
        "--no-progress",
        *(str(e) for e in extra),
    ]


def status_json(output: Path) -> dict[str, Any]:
    result = cli("status", output, "--json")
    assert result.exit_code in STATE_CODES, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    assert info["exit_code"] == result.exit_code
    return info


def try_status(output: Path) -> dict[str, Any] | None:
    """The status, or None while the run has not created its checkpoint yet."""
    result = cli("status", output, "--json")
    if result.exit_code == 2:
        return None
    assert result.exit_code in STATE_CODES, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def poll(
    output: Path,
    condition: Callable[[dict[str, Any]], bool],
    proc: subprocess.Popen[bytes],
    what: str,
    timeout: float = 60,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = try_status(output)
        if info is not None and condition(info):
            return info
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {info}")
        time.sleep(0.05)


def assert_adds_up(info: dict[str, Any]) -> None:
    parts = info["ok"] + info["error"] + info["skipped"] + info["pending"]
    assert parts == info["rows_total"], info


@pytest.mark.slow
def test_status_during_a_run_shows_progress_and_who_runs_it_then_the_stopped_state(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=100)
    rows = 300
    source = write_csv(tmp_path / "in.csv", [f"question {i}" for i in range(rows)])
    output = tmp_path / "out.parquet"
    summary_path = tmp_path / "summary.json"
    config = tmp_path / "job.toml"
    config.write_text("checkpoint_seconds = 0.25\n")
    args = run_args(
        sim,
        source,
        output,
        "--config",
        config,
        "--concurrency",
        4,
        "--grace",
        5,
        "--summary-json",
        summary_path,
    )
    log = tmp_path / "run.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        early = poll(output, lambda i: i["ok"] >= 10, proc, "10 rows checkpointed")
        later = poll(output, lambda i: i["ok"] >= early["ok"] + 20, proc, "20 more rows")
        text = subprocess.run(
            [sys.executable, "-m", "pipeline", "status", str(output)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert still_running, "the run must outlast the polling for this test to mean anything"
    for info in (early, later):
        assert set(info) == STATUS_KEYS
        assert info["rows_total"] == rows
        assert info["pending"] > 0
        assert info["running"] is True
        assert (info["exit_code"], info["exit_reason"]) == (8, "locked")
        assert f"pid {proc.pid}" in info["running_by"]
        assert socket.gethostname() in info["running_by"]
        assert info["prompt_tokens"] > 0 and info["completion_tokens"] > 0
        assert_adds_up(info)
    assert later["pending"] < early["pending"]
    assert later["prompt_tokens"] > early["prompt_tokens"]

    assert text.returncode == 8, text.stderr  # rows pending while a run holds OUTPUT
    assert f"{rows} rows" in text.stdout
    assert "pending" in text.stdout
    assert f"pid {proc.pid}" in text.stdout

    # SIGTERM: the run stops (exit 5, interrupted), keeps its rows, and status shows it
    assert exit_code == 5, log.read_text()
    after = status_json(output)
    assert after["running"] is False and after["running_by"] is None
    assert after["rows_total"] == rows
    assert after["ok"] >= later["ok"]
    assert after["pending"] > 0
    assert (after["exit_code"], after["exit_reason"]) == (5, "interrupted")
    assert_adds_up(after)
    assert after["fingerprint"] == early["fingerprint"]
    assert after["fingerprint"] == json.loads(summary_path.read_text())["fingerprint"]
    frame = pd.read_parquet(output)
    assert (frame["status"] == "ok").sum() == after["ok"]
    assert (frame["status"] == "pending").sum() == after["pending"]


def test_status_after_a_run_counts_every_outcome_and_the_tokens(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"question {i}" for i in range(20)]
    prompts[3] = "bad one [[sim:status=400]]"
    prompts[11] = "bad two [[sim:status=400]]"
    prompts[7] = ""  # empty prompt: skipped
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    summary_path = tmp_path / "summary.json"

    run = cli(*run_args(simulator, source, output, "--summary-json", summary_path))

    assert run.exit_code == 1, run.output
    info = status_json(output)
    frame = pd.read_parquet(output)
    assert set(info) == STATUS_KEYS
    assert (info["rows_total"], info["ok"], info["error"], info["skipped"], info["pending"]) == (
        20,
        17,
        2,
        1,
        0,
    )
    assert info["running"] is False and info["running_by"] is None
    assert info["prompt_tokens"] > 0 and info["completion_tokens"] > 0
    assert info["prompt_tokens"] == frame["prompt_tokens"].sum()
    assert info["completion_tokens"] == frame["completion_tokens"].sum()
    assert info["fingerprint"] == json.loads(summary_path.read_text())["fingerprint"]
    assert info["model"] == "gpt-3.5-turbo"
    assert info["output_written"] is True

    assert (info["exit_code"], info["exit_reason"]) == (1, "failed_rows")
    assert info["cost_usd"] > 0
    assert info["cost_usd"] == pytest.approx(frame["cost_usd"].sum(), abs=1e-6)
    text = cli("status", output)
    assert text.exit_code == 1  # every row done, some failed: not a clean 0
    assert f"cost ${info['cost_usd']:.6f}" in text.stdout
    for piece in ("20 rows", "17 ok", "2 error", "1 skipped", "0 pending", info["fingerprint"]):
        assert piece in text.stdout, (piece, text.stdout)
    assert f"{info['prompt_tokens']} in" in text.stdout
    assert f"{info['completion_tokens']} out" in text.stdout
    assert "running: no" in text.stdout


def test_status_follows_the_input_after_rows_are_removed(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"question {i}" for i in range(10)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output)).exit_code == 0

    write_csv(source, prompts[:7])
    assert cli(*run_args(simulator, source, output)).exit_code == 0

    info = status_json(output)
    frame = pd.read_parquet(output)
    assert len(frame) == 7
    assert (info["rows_total"], info["ok"], info["pending"]) == (7, 7, 0), info
    assert info["prompt_tokens"] == frame["prompt_tokens"].sum()


def test_status_after_retry_failed_counts_the_latest_result_of_each_row(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = ["a", "b [[sim:fail=1,status=503]]", "c"]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(simulator, source, output, "--max-retries", 0)
    assert cli(*args).exit_code == 1
    assert (status_json(output)["ok"], status_json(output)["error"]) == (2, 1)

    assert cli(*args, "--retry-failed").exit_code == 0

    info = status_json(output)
    assert (info["rows_total"], info["ok"], info["error"], info["pending"]) == (3, 3, 0, 0)


def test_status_of_an_output_without_a_checkpoint_exits_2_saying_where_it_looked(
    tmp_path: Path,
) -> None:
    result = cli("status", tmp_path / "never.parquet")
    assert result.exit_code == 2
    assert "never.parquet.checkpoint" in result.stderr


def test_run_status_is_the_library_record_the_cli_formats(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    import pipeline
    from pipeline.errors import OutputError

    source = write_csv(tmp_path / "in.csv", ["a", "b [[sim:status=400]]", ""])
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output)).exit_code == 1

    state = pipeline.run_status(output)
    assert isinstance(state, pipeline.RunStatus)
    assert (state.rows_total, state.counts["ok"], state.counts["error"], state.pending) == (
        3,
        1,
        1,
        0,
    )
    assert (state.exit_code, state.exit_reason, state.running) == (1, "failed_rows", False)
    assert state.as_dict() == status_json(output)
    with pytest.raises(OutputError, match=r"never\.parquet\.checkpoint"):
        pipeline.run_status(tmp_path / "never.parquet")
