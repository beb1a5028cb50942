"""OpenAI Batch JSONL in and out: an exported file holds exactly the requests an online run
sends, and imported result lines (OpenAI's two error shapes, vllm's) become OUTPUT's rows;
rows without a usable line stay pending and a following online run sends only those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from conftest import run_job

from pipeline.batch.interchange import export_requests, import_results
from pipeline.config import RunConfig
from pipeline.errors import EXIT_FAILED_ROWS, ConfigError, InputError
from pipeline.simulator import SimulatorThread


def _input(path: Path, count: int) -> Path:
    # every fifth row repeats the row before it: dedup exports it once
    prompts = [f"tell me about {i - 1 if i % 5 == 4 else i}" for i in range(count)]
    pd.DataFrame({"prompt": prompts}).to_csv(path, index=False)
    return path


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True)


def test_an_export_holds_exactly_the_requests_an_online_run_sends(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    data = _input(tmp_path / "in.csv", 20)
    options = {"base_url": simulator.base_url, "temperature": 0.2, "max_tokens": 50}
    run_job(data, tmp_path / "online.parquet", **options)
    sent = sorted(_canonical(r.body) for r in simulator.simulator.requests if r.body)

    exported = tmp_path / "requests.jsonl"
    count = export_requests(data, exported, RunConfig(progress=False, **options))

    lines = _lines(exported)
    assert count == len(lines) == 16  # 20 rows, 4 repeats
    assert sorted(_canonical(line["body"]) for line in lines) == sent
    assert len({line["custom_id"] for line in lines}) == count
    assert all(line["method"] == "POST" for line in lines)
    assert all(line["url"] == "/v1/chat/completions" for line in lines)


def test_an_export_given_output_leaves_out_the_rows_it_has(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    output = tmp_path / "out.parquet"
    run_job(_input(tmp_path / "first.csv", 10), output, base_url=simulator.base_url)
    data = _input(tmp_path / "all.csv", 20)

    exported = tmp_path / "requests.jsonl"
    config = RunConfig(progress=False, base_url=simulator.base_url)
    export_requests(data, exported, config, output=output)

    prompts = {line["body"]["messages"][-1]["content"] for line in _lines(exported)}
    assert prompts == {f"tell me about {i}" for i in range(10, 20) if i % 5 != 4}


def _answer(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{base_url}/chat/completions", json=body, timeout=10)
    assert reply.status_code == 200
    answer: dict[str, Any] = reply.json()
    return answer


def test_imported_lines_become_rows_and_a_later_run_sends_only_the_rest(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    data = _input(tmp_path / "in.csv", 20)
    config = RunConfig(progress=False, base_url=simulator.base_url)
    exported = tmp_path / "requests.jsonl"
    export_requests(data, exported, config)
    requests = _lines(exported)
    bad, expired, missing, vllm_bad = requests[:4]
    output_lines, error_lines = [], []
    for line in requests[4:]:
        body = _answer(simulator.base_url, line["body"])
        output_lines.append(
            {"id": "r", "custom_id": line["custom_id"], "error": None,
             "response": {"status_code": 200, "request_id": "q", "body": body}}
        )  # fmt: skip
    error_lines.append(  # OpenAI: the HTTP error in response.body.error, top-level error null
        {"id": "r", "custom_id": bad["custom_id"], "error": None,
         "response": {"status_code": 400, "request_id": "q", "body": {"error": {
             "message": "context too long", "type": "invalid_request_error",
             "param": None, "code": None}}}}
    )  # fmt: skip
    error_lines.append(  # a line that never ran
        {"id": "r", "custom_id": expired["custom_id"], "response": None,
         "error": {"code": "batch_expired", "message": "not run before the window ended"}}
    )  # fmt: skip
    vllm_line = {  # vllm run-batch: a null body and the error as a string
        "id": "v", "custom_id": vllm_bad["custom_id"], "error": "prompt too long",
        "response": {"status_code": 400, "request_id": "q", "body": None},
    }  # fmt: skip
    out_file, err_file = tmp_path / "output.jsonl", tmp_path / "errors.jsonl"
    out_file.write_text("".join(json.dumps(x) + "\n" for x in [*output_lines[::-1], vllm_line]))
    err_file.write_text("".join(json.dumps(x) + "\n" for x in error_lines))
    output = tmp_path / "out.parquet"
    before = len(simulator.simulator.requests)

    summary = import_results(data, output, config, [out_file, err_file])

    assert len(simulator.simulator.requests) == before  # an import sends nothing
    assert summary.exit_code == EXIT_FAILED_ROWS
    frame = pd.read_parquet(output)
    by_prompt = frame.set_index("prompt")
    # rows 0-3 have the four odd lines; row 4 repeats row 3 (vllm_bad) and shares its result
    assert (summary.ok, summary.error, summary.pending) == (15, 3, 2)
    # another tool paid for them: not "models with no price", and this run spent nothing
    assert summary.unpriced == 0 and summary.imported > 0
    assert summary.as_dict()["cost_usd"] == 0
    for line, status in ((expired, "pending"), (missing, "pending"), (bad, "error")):
        assert by_prompt.loc[line["body"]["messages"][-1]["content"], "status"] == status
    bad_row = by_prompt.loc[bad["body"]["messages"][-1]["content"]]
    assert bad_row["http_status"] == 400 and "context too long" in bad_row["error_message"]
    vllm_rows = frame[frame["prompt"] == vllm_bad["body"]["messages"][-1]["content"]]
    assert len(vllm_rows) == 2  # the row and its repeat
    assert (vllm_rows["status"] == "error").all()
    assert vllm_rows["error_message"].str.contains("prompt too long").all()
    ok = frame[frame["status"] == "ok"]
    assert (ok["completion"] == "Simulated answer to: " + ok["prompt"]).all()

    run_job(data, output, base_url=simulator.base_url)
    resent = [r.body["messages"][-1]["content"] for r in simulator.simulator.requests[before:]]
    assert sorted(resent) == sorted(
        line["body"]["messages"][-1]["content"] for line in (expired, missing)
    )
    final = pd.read_parquet(output)
    assert final["status"].value_counts().to_dict() == {"ok": 17, "error": 3}


def test_a_batch_input_file_runs_online_each_body_sent_as_it_is(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    requests = tmp_path / "requests.jsonl"
    config = RunConfig(model="gpt-4o-mini", temperature=0.2, max_tokens=30, params={"top_k": 3})
    count = export_requests(_input(tmp_path / "in.csv", 10), requests, config)
    lines = _lines(requests)
    assert count == len(lines) == 8
    summary = run_job(
        requests, tmp_path / "out.parquet", base_url=simulator.base_url,
        input_format="openai-batch",
    )  # fmt: skip
    assert summary.exit_code == 0 and summary.ok == 8
    sent = [r.body for r in simulator.simulator.requests]
    assert sorted(map(_canonical, sent)) == sorted(_canonical(line["body"]) for line in lines)
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert frame["custom_id"].tolist() == [line["custom_id"] for line in lines]
    assert frame["status"].eq("ok").all()
    # rerun: resumes by custom_id, sends nothing
    again = run_job(requests, tmp_path / "out.parquet", base_url=simulator.base_url,
                    input_format="openai-batch")  # fmt: skip
    assert (again.sent, again.resumed) == (0, 8)


def test_a_batch_input_file_that_mixes_models_is_refused_naming_the_line(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}}
        for i, model in enumerate(["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"])
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InputError, match=r"line 3: its body's model differ from line 1"):
        run_job(path, tmp_path / "o.parquet", base_url=simulator.base_url,
                input_format="openai-batch")  # fmt: skip
    with pytest.raises(ConfigError, match="drop --model"):
        run_job(path, tmp_path / "o.parquet", base_url=simulator.base_url,
                input_format="openai-batch", model="gpt-4o")  # fmt: skip
    assert simulator.simulator.requests == []
