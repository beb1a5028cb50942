"""Each retry class, end to end over real HTTP against the simulator (waits recorded, not slept).

Retried: 408/409/429/5xx, timeouts, dropped connections, malformed 200s, with the server's
Retry-After honoured. Not retried: 400/404/422. Run-stopping: 401, 403, insufficient_quota.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import FakeTime

from pipeline import RunAborted, build_config, errors, run_batch
from pipeline.progress import Reporter
from pipeline.retry import RetryPolicy
from pipeline.runner import Seams
from pipeline.simulator import SimulatorThread


def _run(
    sim: SimulatorThread,
    tmp_path: Path,
    prompts: list[str],
    spy: FakeTime | None = None,
    **options: Any,
) -> tuple[pd.DataFrame, Any]:
    data = pd.DataFrame({"prompt": prompts})
    config = build_config(
        None, {"base_url": sim.base_url, "progress": False, "concurrency": 4, **options}
    )
    out = tmp_path / "out.parquet"
    spy = spy or FakeTime(now=1000.0)
    seams = Seams(
        sleep=spy, clock=spy.clock, reporter=Reporter(progress=False), handle_signals=False
    )
    summary = run_batch(data, out, config, seams)
    return pd.read_parquet(out), summary


def test_transient_5xx_is_retried_until_it_succeeds(simulator: SimulatorThread, tmp_path: Path):
    spy = FakeTime(now=1000.0)
    frame, summary = _run(simulator, tmp_path, ["a [[sim:fail=2,status=503]]", "b"], spy)
    assert frame["status"].tolist() == ["ok", "ok"]
    assert frame["attempts"].tolist() == [3, 1]
    assert len(spy.waits) == 2
    assert all(0 < w <= 30 for w in spy.waits)
    assert summary.exit_code == 0


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 504])
def test_every_retryable_status_is_retried(
    simulator: SimulatorThread, tmp_path: Path, status: int
) -> None:
    frame, _ = _run(simulator, tmp_path, [f"x [[sim:fail=1,status={status}]]"])
    assert frame.loc[0, "status"] == "ok"
    assert frame.loc[0, "attempts"] == 2


@pytest.mark.parametrize(
    "fault",
    ["fail=1,drop", "fail=1,malformed", "fail=1,timeout"],
    ids=["drop", "bad200", "timeout"],
)
def test_network_failures_and_malformed_200s_are_retried(
    simulator: SimulatorThread, tmp_path: Path, fault: str
) -> None:
    frame, _ = _run(simulator, tmp_path, [f"x [[sim:{fault}]]"], timeout=0.5)
    assert frame.loc[0, "status"] == "ok"
    assert frame.loc[0, "attempts"] == 2


def test_retry_after_seconds_overrides_the_backoff(simulator: SimulatorThread, tmp_path: Path):
    spy = FakeTime(now=1000.0)
    _run(simulator, tmp_path, ["x [[sim:fail=2,status=429,retry_after=7]]"], spy)
    assert spy.waits == [7.0, 7.0]


def test_retry_after_as_http_date_is_honoured(simulator: SimulatorThread, tmp_path: Path):
    spy = FakeTime(now=1000.0)
    _run(
        simulator, tmp_path, ["x [[sim:fail=1,status=503,retry_after=20,retry_after_date=1]]"], spy
    )
    (wait,) = spy.waits
    assert 17 <= wait <= 21  # an HTTP date has whole-second resolution


def test_retry_after_is_capped_by_max_retry_wait(simulator: SimulatorThread, tmp_path: Path):
    spy = FakeTime(now=1000.0)
    _run(
        simulator,
        tmp_path,
        ["x [[sim:fail=1,status=429,retry_after=600]]"],
        spy,
        max_retry_wait=5.0,
    )
    assert spy.waits == [5.0]


@pytest.mark.parametrize("directive", ["status=400", "status=404", "status=422", "context_length"])
def test_client_errors_end_the_row_without_retry_and_the_run_goes_on(
    simulator: SimulatorThread, tmp_path: Path, directive: str
) -> None:
    frame, summary = _run(simulator, tmp_path, [f"bad [[sim:{directive}]]", "good"])
    bad, good = frame.iloc[0], frame.iloc[1]
    assert bad["status"] == "error"
    assert bad["attempts"] == 1
    assert bad["error_type"] == "BadRequest"
    assert bad["http_status"] == (400 if directive == "context_length" else int(directive[-3:]))
    if directive == "context_length":
        assert "context_length_exceeded" in bad["error_message"]
    assert good["status"] == "ok"
    assert summary.exit_code == 1
    bodies = [r.body for r in simulator.simulator.requests]
    assert sum(1 for b in bodies if b and "bad" in b["messages"][-1]["content"]) == 1


def test_exhausted_retries_end_the_row_with_its_last_error(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, summary = _run(simulator, tmp_path, ["x [[sim:status=500]]", "fine"], max_retries=2)
    assert frame["status"].tolist() == ["error", "ok"]
    assert frame.loc[0, "attempts"] == 3
    assert frame.loc[0, "http_status"] == 500
    assert frame.loc[0, "error_type"] == "ServerError"
    assert summary.error == 1 and summary.ok == 1 and summary.exit_code == 1


@pytest.mark.parametrize(
    ("directive", "error_type"),
    [
        ("aimlapi_status=403", "PermissionDenied"),
        ("quota", "QuotaExceeded"),
        ("status=401", "AuthenticationError"),
    ],
)
def test_auth_credit_and_quota_errors_stop_the_whole_run_at_once(
    simulator: SimulatorThread, tmp_path: Path, directive: str, error_type: str
) -> None:
    prompts = [f"first [[sim:{directive}]]"] + [f"row {i}" for i in range(200)]
    with pytest.raises(RunAborted) as info:
        _run(simulator, tmp_path, prompts, concurrency=2)
    summary = info.value.summary  # type: ignore[attr-defined]
    assert summary.exit_code == 3
    assert error_type in summary.aborted
    # at once: only requests already in flight or queued beside it went out, not 200 rows
    assert len(simulator.simulator.requests) <= 8
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert len(frame) == 201
    assert frame.loc[0, "status"] == "pending"  # the failing row is not marked done
    assert set(frame["status"]) <= {"ok", "pending"}


def test_a_wrong_api_key_stops_the_run_and_a_rerun_with_the_right_key_resumes(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(require_api_key="right-key")
    prompts = [f"row {i}" for i in range(20)]
    data = pd.DataFrame({"prompt": prompts})
    out = tmp_path / "out.parquet"
    seams = Seams(
        reporter=Reporter(progress=False), handle_signals=False, environ={"MY_KEY": "wrong-key"}
    )
    config = build_config(
        None, {"base_url": sim.base_url, "api_key_env": "MY_KEY", "progress": False}
    )
    with pytest.raises(RunAborted):
        run_batch(data, out, config, seams)
    seams.environ = {"MY_KEY": "right-key"}
    summary = run_batch(data, out, config, seams)
    assert summary.ok == 20 and summary.exit_code == 0
    assert "wrong-key" not in (out.read_bytes().decode("latin1"))


def test_backoff_grows_exponentially_and_is_capped(simulator: SimulatorThread, tmp_path: Path):
    spy = FakeTime(now=1000.0)
    _run(simulator, tmp_path, ["x [[sim:fail=6,status=500]]"], spy, max_retries=6)
    assert len(spy.waits) == 6
    # 0.5, 1, 2, 4, 8, 16 s plus up to 1 s of jitter each, never above the 30 s cap
    for k, wait in enumerate(spy.waits):
        base = 0.5 * 2**k
        assert base <= wait <= min(base + 1.0, 30.0) + 1e-9


def test_a_request_error_says_how_many_attempts_its_row_made() -> None:
    assert errors.BadRequest("HTTP 400").attempts == 1
    failures = 0

    async def always_busy() -> None:
        nonlocal failures
        failures += 1
        raise errors.ServerError("HTTP 503", status=503)

    async def no_wait(_: float) -> None:
        return None

    policy = RetryPolicy(max_retries=3, sleep=no_wait)
    with pytest.raises(errors.ServerError) as exhausted:
        asyncio.run(policy.call(always_busy))
    assert exhausted.value.attempts == failures == 4
