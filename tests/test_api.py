"""The Python API: a DataFrame in, the same DataFrame with result columns out; reruns resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from pipeline.records import RESULT_COLUMNS
from pipeline.simulator import SimulatorThread


def test_a_dataframe_comes_back_with_result_columns_in_input_order(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pd.DataFrame({"q": [f"question {i}" for i in range(50)], "k": range(50)})
    result = pipeline.run(
        frame,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        prompt_column="q",
        concurrency=8,
        progress=False,
    )
    assert list(result.columns) == ["q", "k", *RESULT_COLUMNS]
    assert result["k"].tolist() == list(range(50))
    assert all(c.endswith(q) for c, q in zip(result["completion"], frame["q"], strict=True))
    assert result.attrs["summary"]["ok"] == 50


def test_a_rerun_in_a_notebook_resumes_and_sends_only_new_rows(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    frame = pd.DataFrame({"prompt": [f"p{i}" for i in range(10)]})
    pipeline.run(frame, out, base_url=simulator.base_url, progress=False)
    assert len(simulator.simulator.requests) == 10
    bigger = pd.concat([frame, pd.DataFrame({"prompt": ["p10", "p11"]})], ignore_index=True)
    result = pipeline.run(bigger, out, base_url=simulator.base_url, progress=False)
    assert len(simulator.simulator.requests) == 12
    assert result["prompt"].tolist() == bigger["prompt"].tolist()
    assert (result["status"] == "ok").all()
    assert result.attrs["summary"]["resumed"] == 10


def test_works_inside_a_running_event_loop_like_jupyter(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    async def notebook_cell() -> pd.DataFrame:
        return pipeline.run(
            pd.DataFrame({"prompt": ["hi"]}),
            tmp_path / "o.parquet",
            base_url=simulator.base_url,
            progress=False,
        )

    result = asyncio.run(notebook_cell())
    assert result.loc[0, "status"] == "ok"


def test_bad_options_raise_a_usage_error_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(pipeline.UsageError, match="no column 'nope'"):
        pipeline.run(
            pd.DataFrame({"text": ["x"]}),
            tmp_path / "o.parquet",
            base_url="http://127.0.0.1:9/v1",
            prompt_column="nope",
        )
    with pytest.raises(pipeline.ConfigError, match="temperature"):
        pipeline.run(
            pd.DataFrame({"text": ["x"]}),
            tmp_path / "o.parquet",
            base_url="http://127.0.0.1:9/v1",
            prompt_column="text",
            temperature=9,
        )
    assert not (tmp_path / "o.parquet").exists()


def test_a_file_path_works_as_input_too(simulator: SimulatorThread, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "meta": {"x": 1}}\n{"prompt": "b", "meta": null}\n')
    result = pipeline.run(src, tmp_path / "o.parquet", base_url=simulator.base_url, progress=False)
    assert result["prompt"].tolist() == ["a", "b"]
    assert result.loc[0, "meta"] == '{"x": 1}'
    assert (result["status"] == "ok").all()
