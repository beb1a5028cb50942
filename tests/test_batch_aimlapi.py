"""The AI/ML API's batches (BATCH-API.md section 3): Anthropic-style inline requests at its
own paths (``POST /v1/batches``, ``GET /v1/batches?batch_id=``, ``POST
/v1/batches/cancel/{id}``), the default dialect for api.aimlapi.com, against the simulator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, run_job

from pipeline.batch.cancelling import cancel_batches
from pipeline.batch.providers import dialect_for
from pipeline.batch_service import BatchSimConfig
from pipeline.config import RunConfig
from pipeline.errors import EXIT_BATCHES_RUNNING, EXIT_FAILED_ROWS, EXIT_OK
from pipeline.simulator import SimulatorConfig, SimulatorThread

CLAUDE = {"model": "claude-3-5-haiku", "max_tokens": 50, "batch_dialect": "aimlapi"}


def _input(path: Path, count: int = 8) -> Path:
    pd.DataFrame({"prompt": [f"question {i}" for i in range(count)]}).to_csv(path, index=False)
    return path


def _requests(log: Path) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in map(json.loads, log.read_text().splitlines())]


@pytest.mark.parametrize(
    ("base_url", "dialect"),
    [
        ("https://api.aimlapi.com/v1", "aimlapi"),
        ("https://api.anthropic.com/v1", "anthropic"),
        ("https://api.openai.com/v1", "openai"),
    ],
)
def test_the_default_dialect_follows_the_base_url(base_url: str, dialect: str) -> None:
    assert dialect_for(RunConfig(base_url=base_url)) == dialect


def test_a_batch_run_through_the_aimlapi_paths_writes_the_online_answers(tmp_path: Path) -> None:
    data, log = _input(tmp_path / "in.csv"), tmp_path / "requests.jsonl"
    config = SimulatorConfig(request_log=str(log), batch=BatchSimConfig(batch_seconds=0.3))
    with SimulatorThread(config) as sim:
        online = run_job(data, tmp_path / "online.parquet", base_url=sim.base_url, **CLAUDE)
        batch = run_job(
            data, tmp_path / "batch.parquet", base_url=sim.base_url, batch=True,
            poll_interval=0.05, **CLAUDE,
        )  # fmt: skip
    assert online.ok == batch.ok == 8 and batch.exit_code == EXIT_OK
    want = pd.read_parquet(tmp_path / "online.parquet")["completion"]
    assert (pd.read_parquet(tmp_path / "batch.parquet")["completion"] == want).all()
    paths = {path for method, path in _requests(log) if "batch" in path}
    assert paths == {"/v1/batches"}  # create and status at /v1/batches (status ?batch_id=)


def test_cancel_through_the_aimlapi_paths(tmp_path: Path) -> None:
    data, output = _input(tmp_path / "in.csv", 4), tmp_path / "out.parquet"
    log = tmp_path / "requests.jsonl"
    config = SimulatorConfig(request_log=str(log), batch=BatchSimConfig(batch_seconds=10_000))
    options = {"base_url": "", "batch": True, "poll_interval": 0.01, **CLAUDE}
    with SimulatorThread(config) as sim:
        options["base_url"] = sim.base_url
        first = run_job(data, output, wait=False, **options)
        assert first.exit_code == EXIT_BATCHES_RUNNING
        (done,) = asyncio.run(cancel_batches(output))
        assert done.outcome == "cancelled"
        assert ("POST", f"/v1/batches/cancel/{done.batch_id}") in _requests(log)
        second = run_job(data, output, **options)  # collects the cancelled batch: nothing
    assert second.exit_code == EXIT_FAILED_ROWS and second.pending == 4
    creates = [r for r in _requests(log) if r == ("POST", "/v1/batches")]
    assert len(creates) == 1  # its rows are not sent again unless asked


def test_the_aimlapi_dialect_refuses_other_models_before_sending() -> None:
    from pipeline.asks import RequestShape
    from pipeline.batch.providers import check_batchable
    from pipeline.errors import ConfigError

    config = RunConfig(base_url="https://api.aimlapi.com/v1", batch=True)
    assert check_batchable(config, ["claude-3-5-haiku"], RequestShape(config)) == "aimlapi"
    with pytest.raises(ConfigError, match="batches Claude models only, not 'gpt-4o-mini'"):
        check_batchable(config, ["gpt-4o-mini"], RequestShape(config))


def test_the_cli_takes_the_aimlapi_dialect(tmp_path: Path) -> None:
    data, output = _input(tmp_path / "in.csv", count=3), tmp_path / "o.parquet"
    config = SimulatorConfig(batch=BatchSimConfig(batch_seconds=0.2))
    with SimulatorThread(config) as sim:
        result = cli(
            "run", data, "-o", output, "--base-url", sim.base_url, "--model",
            "claude-3-5-haiku", "--max-tokens", 50, "--batch", "--batch-dialect", "aimlapi",
            "--poll-interval", 0.05, "--quiet", "--no-progress",
            env={"AIMLAPI_API_KEY": "k"},
        )  # fmt: skip
    assert result.exit_code == EXIT_OK, result.output
    assert (pd.read_parquet(output)["status"] == "ok").all()
