"""Input files in, one Parquet out: CSV, Parquet and JSONL, and the shape of OUTPUT.

OUTPUT holds every input column in input order followed by the result columns, one row per
input row in input order. CSV cells are text. A null or empty prompt is skipped with a
reason and never sent. Exit code 0 means every row is ok or skipped, 1 that some failed,
3 that the run was aborted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, run_job

import pipeline
from pipeline import reader, writer
from pipeline.simulator import SimulatorThread

RESULT_COLUMNS = [
    "completion",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "response_model",
    "response_id",
    "status",
    "error_type",
    "error_message",
    "http_status",
    "attempts",
    "latency_ms",
    "cost_usd",
    "cost_source",
]
ANSWER = "Simulated answer to: "


def sent_prompts(sim: SimulatorThread) -> list[str]:
    """The user message of every request the simulator received, in arrival order."""
    prompts = []
    for request in sim.simulator.requests:
        assert request.body is not None
        prompts.append(request.body["messages"][-1]["content"])
    return prompts


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# -- the shape of OUTPUT ---------------------------------------------------------------------


def test_output_has_input_columns_in_input_order_then_the_result_columns(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text(
        "zeta,prompt,alpha\nz1,What is 2+2?,a1\nz2,Name a colour,a2\n", encoding="utf-8"
    )

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    output = pq.read_table(tmp_path / "out.parquet")
    assert output.column_names == ["zeta", "prompt", "alpha", *RESULT_COLUMNS]
    rows = output.to_pylist()
    assert [r["zeta"] for r in rows] == ["z1", "z2"]
    assert [r["alpha"] for r in rows] == ["a1", "a2"]
    for row in rows:
        assert row["status"] == "ok"
        assert row["completion"] == ANSWER + row["prompt"]
        assert row["finish_reason"] == "stop"
        assert row["prompt_tokens"] > 0
        assert row["completion_tokens"] > 0
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["response_model"]
        assert row["response_id"]
        assert row["http_status"] == 200
        assert row["attempts"] == 1
        assert row["error_type"] is None
        assert row["error_message"] is None
        assert row["latency_ms"] >= 0


def test_rows_come_back_in_input_order_each_with_its_own_answer(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # Earlier rows answer later, so completion order is the reverse of input order.
    prompts = [f"question {i} [[sim:sleep_ms={(12 - i) * 25}]]" for i in range(12)]
    write_jsonl(tmp_path / "in.jsonl", [{"n": i, "prompt": p} for i, p in enumerate(prompts)])

    result = run_cli(
        tmp_path,
        "in.jsonl",
        "-o",
        "out.parquet",
        "--concurrency",
        "12",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["n"].tolist() == list(range(12))
    assert output["prompt"].tolist() == prompts
    assert output["completion"].tolist() == [ANSWER + p for p in prompts]


# -- formats -------------------------------------------------------------------------------


def test_csv_cells_are_read_as_text(simulator: SimulatorThread, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text(
        "id,zip,flag,price,prompt\n007,01234,true,1.50,0042\n010,90210,false,2,1e3\n",
        encoding="utf-8",
    )

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    output = pq.read_table(tmp_path / "out.parquet")
    for name in ("id", "zip", "flag", "price", "prompt"):
        assert output.schema.field(name).type == pa.string(), name
    assert output.column("id").to_pylist() == ["007", "010"]
    assert output.column("zip").to_pylist() == ["01234", "90210"]
    assert output.column("flag").to_pylist() == ["true", "false"]
    assert output.column("price").to_pylist() == ["1.50", "2"]
    assert sorted(sent_prompts(simulator)) == ["0042", "1e3"]


def test_a_csv_cell_of_several_megabytes_is_read_whole_and_no_row_is_lost_or_repeated(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    """pyarrow's CSV reader fails on a row longer than its block; the block grows and reading
    resumes past the rows already read, so the rows around the long one are all there once."""
    long_text = "a long document " * 200_000  # 3.2 MB, more than one block of any default
    prompts = [f"short {i}" for i in range(20_000)]
    prompts[15_000] = long_text
    prompts[15_001] = 'quoted, with "quotes"\nand a newline'
    pd.DataFrame({"id": range(len(prompts)), "prompt": prompts}).to_csv(
        tmp_path / "in.csv", index=False
    )

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    output = pq.read_table(tmp_path / "out.parquet", columns=["id", "prompt", "status"])
    assert output.column("id").to_pylist() == [str(i) for i in range(len(prompts))]
    assert output.column("prompt").to_pylist() == prompts
    assert set(output.column("status").to_pylist()) == {"ok"}
    assert len(simulator.simulator.requests) == len(prompts)
    # OUTPUT keeps row groups of thousands of rows, not one per small read block
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups <= 4


def test_output_gathers_small_input_batches_into_row_groups_of_bounded_size(
    simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the Parquet writer holds ~15 KB a row group until OUTPUT is closed: a row group per
    # input batch of 8,192 rows held 190 MB at 100M rows. Here batches of 100 rows are
    # gathered into row groups of 1,200 rows, or of 300 KB with long rows
    monkeypatch.setattr(reader, "BATCH_ROWS", 100)
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 1200)
    prompts = [f"p{i}" for i in range(5000)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet")
    summary = run_job(
        tmp_path / "in.parquet", tmp_path / "out.parquet", base_url=simulator.base_url
    )
    assert summary.ok == 5000
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1200] * 4 + [200]
    assert pq.read_table(tmp_path / "out.parquet").column("prompt").to_pylist() == prompts

    monkeypatch.setattr(writer, "ROW_GROUP_BYTES", 300_000)
    long = [f"p{i} " + "x" * 1000 for i in range(1000)]
    pq.write_table(pa.table({"prompt": long}), tmp_path / "long.parquet")
    run_job(tmp_path / "long.parquet", tmp_path / "long-out.parquet", base_url=simulator.base_url)
    meta = pq.ParquetFile(tmp_path / "long-out.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 1000 and 3 <= len(sizes) <= 10 and max(sizes) < 1000


def test_parquet_input_keeps_its_column_types_and_values(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    table = pa.table(
        {
            "n": pa.array([1, 2, 3], pa.int64()),
            "score": pa.array([0.5, None, 2.25], pa.float64()),
            "prompt": ["first", "second", "third"],
            "flag": [True, False, None],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")

    result = run_cli(tmp_path, "in.parquet", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    output = pq.read_table(tmp_path / "out.parquet")
    assert output.select(table.column_names).equals(table)
    assert output.column("status").to_pylist() == ["ok", "ok", "ok"]
    assert sorted(sent_prompts(simulator)) == ["first", "second", "third"]


def test_jsonl_input_is_read_line_by_line(simulator: SimulatorThread, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"id": 1, "prompt": "alpha", "meta": "x"}\n'
        '{"id": 2, "prompt": "beta"}\n'  # a key missing from one line is null there
        '{"id": 3, "prompt": "gamma", "meta": "z"}\n'
        "\n",  # a trailing blank line is not a row
        encoding="utf-8",
    )

    result = run_cli(tmp_path, "in.jsonl", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    output = pq.read_table(tmp_path / "out.parquet")
    assert output.column_names[:3] == ["id", "prompt", "meta"]
    assert output.schema.field("id").type == pa.int64()
    assert output.column("id").to_pylist() == [1, 2, 3]
    assert output.column("meta").to_pylist() == ["x", None, "z"]
    assert output.column("status").to_pylist() == ["ok", "ok", "ok"]
    assert sorted(sent_prompts(simulator)) == ["alpha", "beta", "gamma"]


def _csv(path: Path) -> None:
    path.write_text("prompt,n\nfrom csv,1\n", encoding="utf-8")


def _jsonl(path: Path) -> None:
    write_jsonl(path, [{"prompt": "from jsonl", "n": 1}])


def _parquet(path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["from parquet"], "n": [1]}), path)


@pytest.mark.parametrize(
    ("file_name", "writer", "input_format", "expected_prompt"),
    [
        pytest.param("export.csv", _jsonl, "jsonl", "from jsonl", id="jsonl-in-a-.csv-file"),
        pytest.param("rows.txt", _csv, "csv", "from csv", id="csv-in-a-.txt-file"),
        pytest.param("table.bin", _parquet, "parquet", "from parquet", id="parquet-in-a-.bin"),
    ],
)
def test_input_format_option_overrides_the_extension(
    file_name: str,
    writer: Any,
    input_format: str,
    expected_prompt: str,
    simulator: SimulatorThread,
    tmp_path: Path,
) -> None:
    writer(tmp_path / file_name)

    result = run_cli(
        tmp_path,
        file_name,
        "-o",
        "out.parquet",
        "--input-format",
        input_format,
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["prompt"].tolist() == [expected_prompt]
    assert output["status"].tolist() == ["ok"]
    assert sent_prompts(simulator) == [expected_prompt]


# -- null and empty prompts --------------------------------------------------------------


def _csv_with_gaps(path: Path) -> None:
    # row 2 has an empty prompt cell, row 4 a quoted empty string
    path.write_text('id,prompt\n1,hello\n2,\n3,world\n4,""\n', encoding="utf-8")


def _jsonl_with_gaps(path: Path) -> None:
    write_jsonl(
        path,
        [
            {"id": 1, "prompt": "hello"},
            {"id": 2, "prompt": None},
            {"id": 3, "prompt": "world"},
            {"id": 4, "prompt": ""},
        ],
    )


def _parquet_with_gaps(path: Path) -> None:
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "prompt": ["hello", None, "world", ""]}), path)


@pytest.mark.parametrize(
    ("file_name", "writer"),
    [
        pytest.param("in.csv", _csv_with_gaps, id="csv"),
        pytest.param("in.jsonl", _jsonl_with_gaps, id="jsonl"),
        pytest.param("in.parquet", _parquet_with_gaps, id="parquet"),
    ],
)
def test_null_or_empty_prompt_is_skipped_with_a_reason_and_not_sent(
    file_name: str, writer: Any, simulator: SimulatorThread, tmp_path: Path
) -> None:
    writer(tmp_path / file_name)

    result = run_cli(tmp_path, file_name, "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr  # skipped rows are not failures
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["status"].tolist() == ["ok", "skipped", "ok", "skipped"]
    for reason in output["error_message"][output["status"] == "skipped"]:
        assert "prompt" in reason  # names the column that was null or empty
    assert output["completion"][output["status"] == "skipped"].isna().all()
    assert sorted(sent_prompts(simulator)) == ["hello", "world"]


# -- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "exit_code", "statuses"),
    [
        pytest.param(["fine", "", "also fine"], 0, ["ok", "skipped", "ok"], id="ok-and-skipped-0"),
        pytest.param(
            ["fine", "rejected [[sim:status=400]]", "also fine"],
            1,
            ["ok", "error", "ok"],
            id="a-failed-row-1",
        ),
    ],
)
def test_exit_code_tells_how_the_run_ended(
    rows: list[str],
    exit_code: int,
    statuses: list[str],
    simulator: SimulatorThread,
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": r} for r in rows])

    result = run_cli(
        tmp_path,
        "in.jsonl",
        "-o",
        "out.parquet",
        "--concurrency",
        "1",
        "--max-retries",
        "0",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == exit_code, result.stderr
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["status"].tolist() == statuses


def test_a_rejected_api_key_aborts_the_run_with_exit_code_3(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "bad key [[sim:status=401]]"}, {"prompt": "b"}])

    result = run_cli(
        tmp_path,
        "in.jsonl",
        "-o",
        "out.parquet",
        "--concurrency",
        "1",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 3, result.stderr
    assert len(simulator.simulator.requests) == 1  # nothing more is sent after the 401
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["prompt"].tolist() == ["bad key [[sim:status=401]]", "b"]
    assert "ok" not in output["status"].tolist()


# -- entry points ----------------------------------------------------------------------------


def test_pipeline_console_script_runs_like_python_m_pipeline(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    script = shutil.which("pipeline")
    assert script is not None, "the `pipeline` command should be on PATH after installing"
    (tmp_path / "in.csv").write_text("prompt\nhi there\n", encoding="utf-8")

    result = run_cli(
        tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url, command=[script]
    )

    assert result.returncode == 0, result.stderr
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["completion"].tolist() == [ANSWER + "hi there"]


def test_python_api_returns_the_input_with_result_columns(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pd.DataFrame({"topic": ["tea", "coffee", "water"], "prompt": ["Tea?", "Coffee?", None]})

    result = pipeline.run(
        frame, output=tmp_path / "out.parquet", base_url=simulator.base_url, progress=False
    )

    assert list(result.columns) == ["topic", "prompt", *RESULT_COLUMNS]
    assert result["topic"].tolist() == ["tea", "coffee", "water"]
    assert result["status"].tolist() == ["ok", "ok", "skipped"]
    assert result["completion"].tolist()[:2] == [ANSWER + "Tea?", ANSWER + "Coffee?"]
    assert result.attrs["summary"]["exit_code"] == 0
    # the same values as OUTPUT; the result's integer columns are nullable (Int64)
    stored = pd.read_parquet(tmp_path / "out.parquet").astype(result.dtypes.to_dict())
    pd.testing.assert_frame_equal(stored, result)
