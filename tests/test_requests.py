"""What goes on the wire conforms to the provider's schema, and what comes back lands in columns."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.records import RESULT_COLUMNS
from pipeline.simulator import SimulatorThread


def _bodies(sim: SimulatorThread) -> list[dict[str, Any]]:
    return [r.body for r in sim.simulator.requests if r.body is not None]


FRAME = pd.DataFrame(
    {
        "id": ["a", "b", "c"],
        "text": ["first prompt", "second prompt", "third prompt"],
        "n": [1, 2, 3],
    }
)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": 0.0, "max_tokens": 50, "top_p": 0.5, "seed": 7},
        {"stop": ["\n\n", "END"], "system": "Be brief."},
        {"stop": "END", "response_format": "json_object"},
        {
            "params": {
                "presence_penalty": 0.5,
                "frequency_penalty": -1.0,
                "max_completion_tokens": 64,
                "user": "u1",
            }
        },
        {"template": "Item {n}: {text}", "prompt_column": None},
    ],
    ids=["minimal", "sampling", "stops+system", "json_object", "params", "template"],
)
def test_every_request_body_conforms_to_the_provider_schema(
    simulator: SimulatorThread,
    tmp_path: Path,
    request_schema: dict[str, Any],
    options: dict[str, Any],
) -> None:
    opts = {"prompt_column": "text", **options}
    opts = {k: v for k, v in opts.items() if v is not None}
    pipeline.run(FRAME, tmp_path / "o.parquet", base_url=simulator.base_url, progress=False, **opts)
    bodies = _bodies(simulator)
    assert len(bodies) == 3
    for body in bodies:
        jsonschema.validate(body, request_schema)
        assert None not in body.values(), "unset fields must be left out, never null"


def test_unset_parameters_are_left_out_of_the_body(simulator: SimulatorThread, tmp_path: Path):
    pipeline.run(
        FRAME,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
    )
    for body in _bodies(simulator):
        assert set(body) == {"model", "messages"}
        assert body["model"] == "gpt-3.5-turbo"
        assert body["messages"][0]["role"] == "user"


def test_options_reach_the_body_as_given(simulator: SimulatorThread, tmp_path: Path) -> None:
    pipeline.run(
        FRAME,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
        temperature=0.2,
        max_tokens=9,
        seed=3,
        stop=["X", "Y"],
        system="SYS",
        response_format="json_object",
        params={"logprobs": True},
        model="gpt-3.5-turbo-0125",
    )
    body = _bodies(simulator)[0]
    assert body["model"] == "gpt-3.5-turbo-0125"
    assert body["temperature"] == 0.2 and body["max_tokens"] == 9 and body["seed"] == 3
    assert body["stop"] == ["X", "Y"]
    assert body["response_format"] == {"type": "json_object"}
    assert body["logprobs"] is True
    assert body["messages"][0] == {"role": "system", "content": "SYS"}
    assert body["messages"][1]["content"] in FRAME["text"].tolist()


def test_json_schema_file_is_sent_as_response_format_json_schema(
    simulator: SimulatorThread, tmp_path: Path, request_schema: dict[str, Any]
) -> None:
    schema_file = tmp_path / "label.json"
    schema_file.write_text(
        json.dumps({"type": "object", "properties": {"label": {"type": "string"}}})
    )
    pipeline.run(
        FRAME,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
        response_format=f"@{schema_file}",
    )
    body = _bodies(simulator)[0]
    jsonschema.validate(body, request_schema)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "label"
    assert body["response_format"]["json_schema"]["schema"]["properties"] == {
        "label": {"type": "string"}
    }


def test_client_request_ids_are_valid_unique_and_stable_across_runs(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    pipeline.run(
        FRAME,
        tmp_path / "a.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
    )
    first = [r.headers["x-client-request-id"] for r in simulator.simulator.requests]
    simulator.simulator.reset()
    pipeline.run(
        FRAME,
        tmp_path / "b.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
    )
    second = [r.headers["x-client-request-id"] for r in simulator.simulator.requests]
    assert len(set(first)) == 3
    assert sorted(first) == sorted(second)
    for rid in first:
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid)


def test_output_has_input_columns_in_order_then_the_result_columns(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    pipeline.run(FRAME, out, base_url=simulator.base_url, progress=False, prompt_column="text")
    schema = pq.read_schema(out)
    assert schema.names == ["id", "text", "n", *RESULT_COLUMNS]
    types = {f.name: str(f.type) for f in schema}
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "http_status",
        "attempts",
    ):
        assert types[name] == "int64"
    assert types["completion"] == "string" and types["latency_ms"] == "double"
    frame = pd.read_parquet(out)
    assert frame["id"].tolist() == ["a", "b", "c"]
    assert frame["n"].tolist() == [1, 2, 3]  # Parquet/DataFrame input keeps its types


def test_completion_usage_and_metadata_come_from_the_response(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        FRAME,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
    )
    row = frame.iloc[1]
    assert row["status"] == "ok"
    assert row["completion"] == "Simulated answer to: second prompt"
    assert row["finish_reason"] == "stop"
    assert row["prompt_tokens"] == 2 and row["completion_tokens"] == 5
    assert row["total_tokens"] == 7
    assert row["response_model"] == "gpt-3.5-turbo"
    assert row["response_id"].startswith("chatcmpl-")
    assert row["http_status"] == 200 and row["attempts"] == 1
    assert row["latency_ms"] > 0
    assert pd.isna(row["error_type"]) and pd.isna(row["error_message"])


def test_length_cut_answers_report_finish_reason_length(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        FRAME,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="text",
        max_tokens=2,
    )
    assert set(frame["finish_reason"]) == {"length"}
    assert (frame["completion_tokens"] == 2).all()
    assert frame.attrs["summary"]["finish_reasons"] == {"length": 3}
