"""Unattended operation: signals, deadlines, machine-readable logs and exit codes, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from pipeline.simulator import SimulatorThread

SECRET = "sk-cron-secret-987654321"


def _input(tmp_path: Path, rows: int, prefix: str = "row") -> Path:
    path = tmp_path / "in.csv"
    pd.DataFrame(
        {
            "id": [f"{prefix}{i}" for i in range(rows)],
            "prompt": [f"{prefix} prompt {i}" for i in range(rows)],
        }
    ).to_csv(path, index=False)
    return path


def _cmd(src: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(src),
        "-o",
        str(out),
        "--base-url",
        base_url,
        "--id-column",
        "id",
        "--no-progress",
        *extra,
    ]


def _start(cmd: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )


def _wait_for_requests(sim: SimulatorThread, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(sim.simulator.requests) < count:
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_sending_lets_in_flight_finish_and_writes_pending_rows(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path, sig: signal.Signals
) -> None:
    sim = make_simulator(latency_ms=300)
    src, out = _input(tmp_path, 400), tmp_path / "out.parquet"
    proc = _start(_cmd(src, out, sim.base_url, "--concurrency", "8", "--grace", "5"))
    _wait_for_requests(sim, 20)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err  # interrupted: its own code, apart from 401/quota (3)
    assert "interrupted" in err
    frame = pd.read_parquet(out)
    assert len(frame) == 400
    assert set(frame["status"]) == {"ok", "pending"}
    sent = len(sim.simulator.requests)
    # every request that went out within the grace period came back and was kept
    assert (frame["status"] == "ok").sum() == sent
    # the rerun sends exactly the pending rows, none of the kept ones
    before = {r.body["messages"][-1]["content"] for r in sim.simulator.requests if r.body}
    sim.simulator.reset()
    sim.simulator.config = sim.simulator.config.__class__(latency_ms=0)
    rerun = subprocess.run(_cmd(src, out, sim.base_url), capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    again = {r.body["messages"][-1]["content"] for r in sim.simulator.requests if r.body}
    assert not before & again
    assert len(again) == 400 - sent
    final = pd.read_parquet(out)
    assert (final["status"] == "ok").all() and final["id"].tolist() == [
        f"row{i}" for i in range(400)
    ]


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_waiting_for_the_grace_period(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=20_000)  # answers would take 20 s
    src, out = _input(tmp_path, 50), tmp_path / "out.parquet"
    proc = _start(_cmd(src, out, sim.base_url, "--concurrency", "4", "--grace", "60"))
    _wait_for_requests(sim, 4)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still in its 60 s grace period
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert time.monotonic() - started < 10
    assert proc.returncode == 5, err
    # nothing completed, nothing lost: a rerun sends every row
    sim.simulator.reset()
    sim.simulator.config = sim.simulator.config.__class__(latency_ms=0)
    rerun = subprocess.run(_cmd(src, out, sim.base_url), capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert (pd.read_parquet(out)["status"] == "ok").sum() == 50


@pytest.mark.slow
def test_max_runtime_stops_cleanly_and_the_next_run_continues(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=100)
    src, out = _input(tmp_path, 300), tmp_path / "out.parquet"
    first = subprocess.run(
        _cmd(src, out, sim.base_url, "--concurrency", "4", "--max-runtime", "1s"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 5, first.stderr  # a planned stop, not a failure (3)
    assert "max-runtime" in first.stderr
    done = (pd.read_parquet(out)["status"] == "ok").sum()
    assert 0 < done < 300
    second = subprocess.run(
        _cmd(src, out, sim.base_url, "--concurrency", "32"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    assert len(sim.simulator.requests) == 300  # nothing sent twice
    assert (pd.read_parquet(out)["status"] == "ok").all()


@pytest.mark.parametrize("value", ["soon", "-5s", "0s"])
def test_a_bad_max_runtime_is_a_usage_error(tmp_path: Path, value: str) -> None:
    src = _input(tmp_path, 2)
    result = subprocess.run(
        _cmd(src, tmp_path / "o.parquet", "http://127.0.0.1:9/v1", "--max-runtime", value),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "max_runtime" in result.stderr and "90s" in result.stderr


def test_json_logs_are_one_object_per_line_with_start_retries_and_summary(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b"], "prompt": ["fine", "flaky [[sim:fail=1,status=503]]"]}).to_csv(
        src, index=False
    )
    result = subprocess.run(
        _cmd(
            src,
            tmp_path / "o.parquet",
            simulator.base_url,
            "--log-format",
            "json",
            "--api-key-env",
            "CRON_KEY",
        ),
        capture_output=True,
        text=True,
        env={**os.environ, "CRON_KEY": SECRET},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "summary"
    start = events[0]
    assert start["fingerprint"] and start["config"]["base_url"] == simulator.base_url
    (retry,) = [e for e in events if e["event"] == "retry"]
    assert retry["http_status"] == 503 and retry["wait_s"] > 0 and "503" in retry["reason"]
    assert events[-1]["ok"] == 2 and events[-1]["exit_code"] == 0
    assert SECRET not in result.stderr + result.stdout


def test_quiet_prints_only_the_summary_and_errors(simulator: SimulatorThread, tmp_path: Path):
    src = _input(tmp_path, 3)
    result = subprocess.run(
        _cmd(src, tmp_path / "o.parquet", simulator.base_url, "--quiet"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "rows: 3 total | 3 ok" in result.stderr
    assert "fingerprint" not in result.stderr  # no start line
    assert result.stdout == ""


def test_a_rerun_with_nothing_new_sends_nothing_and_exits_0(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src, out = _input(tmp_path, 20), tmp_path / "o.parquet"
    cmd = _cmd(src, out, simulator.base_url)
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    before = out.stat().st_mtime_ns
    simulator.simulator.reset()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
    assert simulator.simulator.requests == []
    assert "0 sent" in again.stderr
    assert out.stat().st_mtime_ns == before  # not even rewritten


def test_rows_that_left_the_input_leave_the_output_and_the_summary_says_so(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src, out = _input(tmp_path, 10), tmp_path / "o.parquet"
    assert (
        subprocess.run(
            _cmd(src, out, simulator.base_url), capture_output=True, timeout=60
        ).returncode
        == 0
    )
    frame = pd.read_csv(src)
    frame.iloc[3:].to_csv(src, index=False)  # the first three rows are gone
    summary = tmp_path / "s.json"
    again = subprocess.run(
        _cmd(src, out, simulator.base_url, "--summary-json", str(summary)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0
    assert "3 left the input" in again.stderr
    assert json.loads(summary.read_text())["removed"] == 3
    assert pd.read_parquet(out)["id"].tolist() == [f"row{i}" for i in range(3, 10)]


# -- one test per exit code ---------------------------------------------------------------


def test_exit_0_when_every_row_is_ok_or_skipped(simulator: SimulatorThread, tmp_path: Path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b"], "prompt": ["hello", ""]}).to_csv(src, index=False)
    result = subprocess.run(
        _cmd(src, tmp_path / "o.parquet", simulator.base_url), capture_output=True, timeout=60
    )
    assert result.returncode == 0


def test_exit_1_when_the_run_finished_with_failed_rows(simulator: SimulatorThread, tmp_path: Path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b"], "prompt": ["hello", "bad [[sim:status=400]]"]}).to_csv(
        src, index=False
    )
    result = subprocess.run(
        _cmd(src, tmp_path / "o.parquet", simulator.base_url), capture_output=True, timeout=60
    )
    assert result.returncode == 1


def test_exit_2_for_a_usage_error_before_any_request(simulator: SimulatorThread, tmp_path: Path):
    src = _input(tmp_path, 2)
    result = subprocess.run(
        _cmd(src, tmp_path / "o.parquet", simulator.base_url, "--prompt-column", "nope"),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert simulator.simulator.requests == []


def test_exit_3_when_the_run_is_aborted(simulator: SimulatorThread, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a"], "prompt": ["x [[sim:quota]]"]}).to_csv(src, index=False)
    result = subprocess.run(
        _cmd(src, tmp_path / "o.parquet", simulator.base_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "QuotaExceeded" in result.stderr and "rerun" in result.stderr
