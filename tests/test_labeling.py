"""Labeling and evaluation runs end to end: structured columns, labels, re-asks, models side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.simulator import SimulatorThread

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        "stars": {"type": "integer"},
        "sarcastic": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "stars", "sarcastic", "topics"],
    "additionalProperties": False,
}


def _schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def _bodies(sim: SimulatorThread) -> list[dict]:
    return [r.body for r in sim.simulator.requests if r.body]


def test_schema_answers_become_typed_columns_and_the_raw_text_stays(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["great phone", "awful phone"]}),
        out,
        base_url=simulator.base_url,
        progress=False,
        json_schema=str(_schema_file(tmp_path)),
        schema_prefix="ans_",
        model="gpt-4o-mini",
    )
    types = {f.name: str(f.type) for f in pq.read_schema(out)}
    assert types["ans_sentiment"] == "string" and types["ans_stars"] == "int64"
    assert types["ans_sarcastic"] == "bool" and types["ans_topics"] == "string"
    assert (frame["status"] == "ok").all()
    assert set(frame["ans_sentiment"]) <= {"positive", "negative"}
    for raw, topics in zip(frame["completion"], frame["ans_topics"], strict=True):
        parsed = json.loads(raw)
        assert json.loads(topics) == parsed["topics"]
    # gpt-4o-mini supports Structured Outputs: the schema goes as response_format json_schema
    body = _bodies(simulator)[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA


def test_prompt_mode_sends_json_object_and_states_the_schema(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["fine"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        json_schema=str(_schema_file(tmp_path)),
    )  # gpt-3.5-turbo has no Structured Outputs: auto picks prompt mode
    body = _bodies(simulator)[0]
    assert body["response_format"] == {"type": "json_object"}
    system = body["messages"][0]
    assert system["role"] == "system" and "JSON" in system["content"]
    assert '"sentiment"' in system["content"]
    assert frame.loc[0, "status"] == "ok" and frame.loc[0, "sentiment"] in ("positive", "negative")


def test_an_invalid_answer_is_reasked_with_the_error_and_the_reasks_are_paid_for(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["tricky [[sim:wrong=1]]"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        json_schema=str(_schema_file(tmp_path)),
        model="gpt-4o-mini",
        max_reasks=2,
    )
    first, second = _bodies(simulator)
    assert frame.loc[0, "status"] == "ok"
    # the re-ask carries the bad answer and what was wrong with it
    assert second["messages"][-2]["role"] == "assistant"
    assert "could not be used" in second["messages"][-1]["content"]
    assert len(second["messages"]) == len(first["messages"]) + 2
    # usage and cost cover both requests
    assert frame.loc[0, "attempts"] == 2
    assert frame.loc[0, "prompt_tokens"] > len(first["messages"][-1]["content"].split())
    assert frame.loc[0, "cost_usd"] > 0


def test_after_max_reasks_the_row_is_invalid_with_the_reason(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["hopeless [[sim:wrong]]", "fine"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        json_schema=str(_schema_file(tmp_path)),
        model="gpt-4o-mini",
        max_reasks=1,
    )
    bad, good = frame.iloc[0], frame.iloc[1]
    assert bad["status"] == "invalid" and bad["error_type"] == "InvalidAnswer"
    assert bad["error_message"]
    assert pd.isna(bad["sentiment"])  # no half-valid values in the typed columns
    assert good["status"] == "ok"
    assert len(_bodies(simulator)) == 3  # 1 + 1 re-ask for the bad row, 1 for the good one
    summary = frame.attrs["summary"]
    assert summary["invalid"] == 1 and summary["exit_code"] == 1


def test_labels_go_into_a_label_column_with_the_distribution_in_the_summary(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = ["a [[sim:label=Positive.]]", "b [[sim:label= negative ]]", "c [[sim:label=neutral]]"]
    frame = pipeline.run(
        pd.DataFrame({"prompt": prompts}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        labels="positive,negative,neutral",
    )
    assert frame["label"].tolist() == ["positive", "negative", "neutral"]
    system = _bodies(simulator)[0]["messages"][0]["content"]
    assert "Labels: positive | negative | neutral" in system
    assert frame.attrs["summary"]["labels"] == {"positive": 1, "negative": 1, "neutral": 1}


def test_a_truncated_answer_is_reported_as_such_without_a_reask(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["long"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        json_schema=str(_schema_file(tmp_path)),
        model="gpt-4o-mini",
        max_tokens=2,
    )
    assert frame.loc[0, "status"] == "invalid"
    assert frame.loc[0, "error_type"] == "TruncatedAnswer"
    assert frame.loc[0, "finish_reason"] == "length"
    assert "cut off" in frame.loc[0, "error_message"]
    assert len(_bodies(simulator)) == 1


def test_every_row_goes_to_every_model_one_output_row_per_pair(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    data = pd.DataFrame({"q": ["one", "two", "three"], "gold": ["x", "y", "z"]})
    frame = pipeline.run(
        data,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        model=["gpt-4o-mini", "gpt-4.1"],
    )
    assert frame["q"].tolist() == ["one", "one", "two", "two", "three", "three"]
    assert frame["model"].tolist() == ["gpt-4o-mini", "gpt-4.1"] * 3
    assert frame["response_model"].tolist() == frame["model"].tolist()
    sent = sorted((b["model"], b["messages"][-1]["content"]) for b in _bodies(simulator))
    assert sent == sorted((m, q) for q in data["q"] for m in ("gpt-4o-mini", "gpt-4.1"))


def test_wide_output_has_a_column_group_per_model(simulator: SimulatorThread, tmp_path: Path):
    frame = pipeline.run(
        pd.DataFrame({"q": ["one", "two"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        model=["gpt-4o-mini", "gpt-4.1"],
        wide=True,
    )
    assert len(frame) == 2
    assert frame["gpt-4o-mini__status"].tolist() == ["ok", "ok"]
    assert frame["gpt-4.1__response_model"].tolist() == ["gpt-4.1", "gpt-4.1"]
    assert "model" not in frame.columns


def test_resume_works_per_row_and_model_and_adding_a_model_is_a_new_fingerprint(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator()
    data = pd.DataFrame({"q": ["one", "two [[sim:fail=2,status=400]]"]})
    out = tmp_path / "o.parquet"
    first = pipeline.run(
        data, out, base_url=sim.base_url, progress=False, prompt_column="q", model=["m-a", "m-b"]
    )
    assert (first["status"] == "error").sum() == 2  # row two failed on both models
    mark = len(sim.simulator.requests)  # no reset: it would re-arm the fail=2 directive
    again = pipeline.run(
        data,
        out,
        base_url=sim.base_url,
        progress=False,
        prompt_column="q",
        model=["m-a", "m-b"],
        retry_failed=True,
    )
    resent = [r.body for r in sim.simulator.requests[mark:] if r.body]
    assert sorted((b["model"], b["messages"][-1]["content"][:3]) for b in resent) == [
        ("m-a", "two"),
        ("m-b", "two"),
    ]
    assert (again["status"] == "ok").all()
    with pytest.raises(pipeline.FingerprintMismatch, match="model"):
        pipeline.run(
            data,
            out,
            base_url=sim.base_url,
            progress=False,
            prompt_column="q",
            model=["m-a", "m-b", "m-c"],
        )


def test_scores_per_row_and_model_and_a_comparison_table(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    data = pd.DataFrame(
        {
            "q": ["first [[sim:label=yes]]", "second [[sim:label=no]]"],
            "gold": ["yes", "yes"],
        }
    )
    out = tmp_path / "o.parquet"
    frame = pipeline.run(
        data,
        out,
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        labels="yes,no",
        expected_column="gold",
        score="exact",
        model=["gpt-4o-mini", "gpt-4.1"],
    )
    assert frame["score"].tolist() == [1.0, 1.0, 0.0, 0.0]
    table = {row["model"]: row for row in frame.attrs["summary"]["models"]}
    assert table["gpt-4o-mini"]["mean_score"] == 0.5 and table["gpt-4.1"]["scored"] == 2
    assert table["gpt-4.1"]["latency_p50_ms"] is not None

    report = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", str(out), "--html", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    assert "gpt-4o-mini" in report.stdout and "0.5" in report.stdout
    page = (tmp_path / "r.html").read_text()
    assert page.count('class="bar"') == 2 and "http" not in page.replace("http://www.w3.org", "")


def test_a_new_scorer_needs_no_new_request(simulator: SimulatorThread, tmp_path: Path):
    data = pd.DataFrame({"q": ["a"], "gold": ["answer to: a"]})
    out = tmp_path / "o.parquet"
    first = pipeline.run(
        data,
        out,
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        expected_column="gold",
        score="exact",
    )
    simulator.simulator.reset()
    frame = pipeline.run(
        data,
        out,
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        expected_column="gold",
        score="contains",
    )
    assert simulator.simulator.requests == []
    # nothing was sent, yet OUTPUT is rewritten with the new scores
    assert (first.loc[0, "score"], frame.loc[0, "score"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"labels": "onlyone"}, "label"),
        ({"score": "exact"}, "--expected-column"),
        ({"score": "fuzzy", "expected_column": "q"}, "not a scorer"),
        ({"json_schema": "missing.json"}, "missing.json"),
        ({"labels": "a,b", "json_schema": "x.json"}, "not both"),
    ],
)
def test_bad_answer_options_are_usage_errors(tmp_path: Path, options: dict, message: str):
    with pytest.raises(pipeline.UsageError, match=message):
        pipeline.run(
            pd.DataFrame({"q": ["a"]}),
            tmp_path / "o.parquet",
            base_url="http://127.0.0.1:9/v1",
            prompt_column="q",
            **options,
        )
