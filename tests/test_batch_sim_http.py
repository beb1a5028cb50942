"""The simulator's Batch APIs through real HTTP on 127.0.0.1 (the wiring of BatchService)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pipeline.batch_service import BatchSimConfig
from pipeline.simulator import SimulatorConfig, SimulatorThread


def test_openai_batch_round_trip_and_request_log(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    config = SimulatorConfig(request_log=str(log), batch=BatchSimConfig(drop_create_responses=1))
    with SimulatorThread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello world"}]}
        online = http.post("/chat/completions", json=body).json()
        lines = [
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body},
            {
                "custom_id": "b",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body | {"messages": [{"role": "user", "content": "x [[sim:status=400]]"}]},
            },
        ]
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = http.post(
            "/files", data={"purpose": "batch"}, files={"file": ("p.jsonl", content)}
        )
        assert uploaded.status_code == 200
        file_id = uploaded.json()["id"]
        create = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"bpp_part": "1"},
        }
        with pytest.raises(httpx.RemoteProtocolError):  # committed, reply dropped
            http.post("/batches", json=create)
        page = http.get("/batches", params={"limit": 10}).json()
        assert [b["metadata"] for b in page["data"]] == [{"bpp_part": "1"}]
        batch = page["data"][0]
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
        output = http.get(f"/files/{batch['output_file_id']}/content").content.decode()
        answer = json.loads(output)["response"]["body"]
        assert answer["choices"] == online["choices"] and answer["usage"] == online["usage"]
        errors = json.loads(http.get(f"/files/{batch['error_file_id']}/content").content)
        assert errors["response"]["status_code"] == 400 and errors["error"] is None
        assert http.get("/batches/batch_nope").status_code == 404
    logged = [(r["method"], r["path"]) for r in map(json.loads, log.read_text().splitlines())]
    assert logged == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/files"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches"),
        ("GET", f"/v1/files/{batch['output_file_id']}/content"),
        ("GET", f"/v1/files/{batch['error_file_id']}/content"),
        ("GET", "/v1/batches/batch_nope"),
    ]
    assert sim.simulator.batches.counters["lines_answered"] == 2


def test_message_batch_over_http() -> None:
    with SimulatorThread() as sim, httpx.Client(base_url=sim.base_url) as http:
        params = {
            "model": "claude-x",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
        }
        created = http.post(
            "/messages/batches", json={"requests": [{"custom_id": "a", "params": params}]}
        )
        assert created.status_code == 200
        batch = http.get(f"/messages/batches/{created.json()['id']}").json()
        assert batch["processing_status"] == "ended"
        results = http.get(batch["results_url"])
        line = json.loads(results.text)
        assert line["result"]["type"] == "succeeded"
        assert line["result"]["message"]["content"][0]["text"] == "Simulated answer to: hi"


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_batch_run_against_the_simulator_writes_the_online_runs_answers(
    tmp_path: Path, dialect: str
) -> None:
    """``pipeline run --batch`` end to end against the simulator in each dialect, its batches
    taking a (compressed) while: the same answers as an online run, every row once."""
    import pandas as pd
    from conftest import run_job

    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"question {i % 15}" for i in range(20)]}).to_csv(data, index=False)
    config = SimulatorConfig(batch=BatchSimConfig(batch_seconds=0.3))
    model = "claude-3-5-haiku" if dialect == "anthropic" else "gpt-4o-mini"
    with SimulatorThread(config) as sim:
        online = run_job(data, tmp_path / "online.parquet", base_url=sim.base_url, model=model)
        batch = run_job(
            data, tmp_path / "batch.parquet", base_url=sim.base_url, model=model,
            batch=True, batch_dialect=dialect, poll_interval=0.05, max_tokens=64,
        )  # fmt: skip
    assert online.ok == batch.ok == 20 and batch.exit_code == 0
    want = pd.read_parquet(tmp_path / "online.parquet")["completion"]
    got = pd.read_parquet(tmp_path / "batch.parquet")["completion"]
    assert (got == want).all()
