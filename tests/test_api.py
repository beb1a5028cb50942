"""The Python API: a DataFrame in, the same DataFrame with result columns out; reruns resume."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import http.server
import inspect
import json
import pydoc
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline.config import RunConfig
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


def test_a_run_leaves_the_host_processs_garbage_collector_as_it_found_it(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # while sending, the collector runs less often (and the run's start-up objects are left
    # out of its passes); a notebook's own settings come back after the run, even a failed one
    gc.set_threshold(1234, 11, 12)
    try:
        frame = pd.DataFrame({"prompt": ["a", "b", "c"]})
        pipeline.run(frame, tmp_path / "out.parquet", base_url=simulator.base_url, quiet=True)
        assert gc.get_threshold() == (1234, 11, 12)
        assert gc.get_freeze_count() == 0
        with pytest.raises(pipeline.RunAborted):
            pipeline.run(
                pd.DataFrame({"prompt": ["[[sim:status=401]] no key"]}),
                tmp_path / "failed.parquet",
                base_url=simulator.base_url,
                quiet=True,
            )
        assert gc.get_threshold() == (1234, 11, 12)
        assert gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(700, 10, 10)


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


# -- the result lines up with the input (issue 14, item 1) --------------------------------


def test_assigning_a_result_column_back_lands_on_the_right_rows(
    simulator: SimulatorThread,
) -> None:
    frame = pd.DataFrame({"text": ["zero", "one", "two"]})
    sub = frame.iloc[[2, 0]].copy()
    sub["answer"] = pipeline.run(sub, template="{text}", base_url=simulator.base_url, quiet=True)[
        "completion"
    ]
    assert sub.loc[2, "answer"] == "Simulated answer to: two"
    assert sub.loc[0, "answer"] == "Simulated answer to: zero"


@pytest.mark.parametrize(
    "index",
    [
        pd.Index(["r7", "r3", "r9"], name="review_id"),
        pd.MultiIndex.from_tuples([("a", 2), ("a", 1), ("b", 1)], names=["shop", "n"]),
        pd.Index([5, 5, 1]),  # unnamed, with a duplicate label
    ],
)
def test_the_result_keeps_the_input_index_and_columns(
    simulator: SimulatorThread, index: pd.Index
) -> None:
    frame = pd.DataFrame(
        {"text": ["a", "b", "c"], "when": pd.to_datetime(["2026-01-01"] * 3)}, index=index
    )
    result = pipeline.run(frame, template="{text}", base_url=simulator.base_url, quiet=True)
    assert result.index.equals(frame.index)
    assert result.index.names == frame.index.names
    assert result[["text", "when"]].dtypes.equals(frame.dtypes)
    answers = [f"Simulated answer to: {t}" for t in frame["text"]]
    assert result["completion"].tolist() == answers


def test_several_models_repeat_each_input_label_once_per_model(
    simulator: SimulatorThread,
) -> None:
    frame = pd.DataFrame({"text": ["a", "b", "c"]}, index=pd.Index([30, 10, 20], name="id"))
    result = pipeline.run(
        frame, template="{text}", base_url=simulator.base_url, model=["m1", "m2"], quiet=True
    )
    assert result.index.tolist() == [30, 30, 10, 10, 20, 20]
    assert result["model"].tolist() == ["m1", "m2"] * 3
    assert (result["completion"].str.removeprefix("Simulated answer to: ") == result["text"]).all()
    limited = pipeline.run(
        frame, template="{text}", base_url=simulator.base_url, limit=2, quiet=True
    )
    assert limited.index.tolist() == [30, 10]


# -- stable dtypes (item 4) -----------------------------------------------------------------

NULLABLE_INT_COLUMNS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "http_status",
    "attempts",
]


def test_result_dtypes_are_the_same_whether_or_not_some_rows_failed(
    simulator: SimulatorThread,
) -> None:
    def dtypes(prompts: list[str]) -> pd.Series:
        frame = pd.DataFrame({"prompt": prompts})
        result = pipeline.run(frame, base_url=simulator.base_url, max_retries=0, quiet=True)
        return result.dtypes

    all_ok = dtypes(["a", "b"])
    one_failed = dtypes(["a", "b [[sim:status=400]]"])
    assert all_ok.equals(one_failed)
    assert all(all_ok[c] == "Int64" for c in NULLABLE_INT_COLUMNS)
    assert all_ok["latency_ms"] == "float64" and all_ok["cost_usd"] == "float64"


def test_a_file_input_gets_nullable_integer_columns_too(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi", "stars": 5}\n{"prompt": "ho", "stars": null}\n')
    result = pipeline.run(src, base_url=simulator.base_url, quiet=True)
    assert result["stars"].dtype == "Int64" and result["stars"].tolist()[0] == 5
    assert result["http_status"].dtype == "Int64"


# -- what a run prints, and where its rows are (item 5) -----------------------------------


def test_quiet_prints_nothing_and_json_logs_are_json(
    simulator: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = pd.DataFrame({"prompt": ["a", "b"]})
    pipeline.run(frame, base_url=simulator.base_url, quiet=True)
    assert capsys.readouterr().err == ""
    pipeline.run(frame, base_url=simulator.base_url, log_format="json")
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events[0] == "run_start" and events[-1] == "summary"


def test_progress_false_drops_the_progress_lines(
    simulator: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    # one slow row spans several ticks; log_interval=0 logs at every tick
    frame = pd.DataFrame({"prompt": ["slow [[sim:sleep_ms=1500]]"]})
    options = {"base_url": simulator.base_url, "log_format": "json", "log_interval": 0.0}
    pipeline.run(frame, **options)
    shown = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert "progress" in shown
    pipeline.run(frame, progress=False, **options)
    hidden = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert "progress" not in hidden and "summary" in hidden


def test_without_output_no_path_of_a_removed_file_is_printed(
    simulator: SimulatorThread, capsys: pytest.CaptureFixture[str]
) -> None:
    result = pipeline.run(pd.DataFrame({"prompt": ["a"]}), base_url=simulator.base_url)
    err = capsys.readouterr().err
    assert "output.parquet" not in err and tempfile.gettempdir() not in err
    assert "temporary" in err
    assert result.attrs["summary"]["output"] is None


def test_a_stopped_run_without_output_keeps_its_rows_and_says_where(
    simulator: SimulatorThread,
) -> None:
    frame = pd.DataFrame({"prompt": ["a", "b", "c [[sim:quota]]", "d", "e"]})
    options = {"base_url": simulator.base_url, "concurrency": 1, "quiet": True}
    with pytest.raises(pipeline.RunAborted) as caught:
        pipeline.run(frame, **options)
    partial = caught.value.frame  # type: ignore[attr-defined]
    assert partial["status"].tolist()[:2] == ["ok", "ok"]
    assert partial["prompt"].tolist() == frame["prompt"].tolist()
    kept = re.search(r"output='([^']+)'", str(caught.value))
    assert kept is not None and Path(kept.group(1)).exists()
    sent = len(simulator.simulator.requests)
    fixed = frame.replace({"c [[sim:quota]]": "c"})
    with pytest.raises(pipeline.FingerprintMismatch):  # an edited row is another row: fine
        pipeline.run(fixed, kept.group(1), **options, model="other")
    result = pipeline.run(fixed, kept.group(1), **options)
    assert (result["status"] == "ok").all()
    assert len(simulator.simulator.requests) == sent + 3  # only c, d and e were sent again
    shutil.rmtree(Path(kept.group(1)).parent)


def test_summary_json_is_written_and_dry_run_is_refused(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pd.DataFrame({"prompt": ["a"]})
    pipeline.run(frame, base_url=simulator.base_url, summary_json=tmp_path / "s.json", quiet=True)
    assert json.loads((tmp_path / "s.json").read_text())["ok"] == 1
    with pytest.raises(pipeline.ConfigError, match="dry_run"):
        pipeline.run(frame, base_url=simulator.base_url, dry_run=True)
    assert len(simulator.simulator.requests) == 1


# -- help, dir, typos, Python values (item 6) ------------------------------------------------


def test_help_lists_every_option_with_its_default_and_meaning() -> None:
    from pipeline.api import OPTION_HELP

    text = pydoc.render_doc(pipeline.run, renderer=pydoc.plaintext)
    for f in dataclasses.fields(RunConfig):
        assert f"    {f.name} (" in text, f.name
        assert OPTION_HELP[f.name].strip(), f.name
    assert "concurrency (32): requests in flight at most." in text
    params = inspect.signature(pipeline.run).parameters
    assert params["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["concurrency"].default == 32
    assert set(inspect.signature(pipeline.arun).parameters) == set(params)


def test_run_and_arun_are_in_dir_of_the_package() -> None:
    assert {"run", "arun", "RunAborted"} <= set(dir(pipeline))


def test_a_mistyped_option_gets_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(pipeline.ConfigError, match=r"'temprature'\. Did you mean temperature"):
        pipeline.run(pd.DataFrame({"prompt": ["x"]}), tmp_path / "o.parquet", temprature=0)
    with pytest.raises(pipeline.ConfigError, match="Did you mean concurrency"):
        pipeline.build_config(None, {"concurency": 2})


def test_python_values_are_accepted_where_python_users_pass_them(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    template = tmp_path / "prompt.txt"
    template.write_text("Review: {text}")
    frame = pd.DataFrame({"text": ["great", "awful"]})
    options: dict[str, object] = {
        "base_url": simulator.base_url,
        "template": template,
        "labels": ["positive", "negative"],
        "timeout": datetime.timedelta(seconds=30),
        "concurrency": np.int64(4),
        "quiet": True,
    }
    result = pipeline.run(frame, tmp_path / "o.parquet", **options)
    assert set(result["label"]) <= {"positive", "negative"}
    first = simulator.simulator.requests[0]
    assert first.body is not None
    assert first.body["messages"][-1]["content"].startswith("Review: ")
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    scored = pipeline.run(
        frame,
        tmp_path / "s.parquet",
        base_url=simulator.base_url,
        json_schema=schema,
        prompt_column="text",
        quiet=True,
    )
    assert scored["score"].tolist() == [1, 1] and scored["score"].dtype == "Int64"
    again = pipeline.run(
        frame,
        tmp_path / "s.parquet",
        base_url=simulator.base_url,
        json_schema=schema,
        prompt_column="text",
        quiet=True,
    )
    assert again.attrs["summary"]["sent"] == 0  # the same dict: the same run, resumed
    with pytest.raises(pipeline.ConfigError, match="contains a comma"):
        pipeline.run(frame, base_url=simulator.base_url, prompt_column="text", labels=["a,b", "c"])


# -- arun: the caller's event loop stays free (item 3) -------------------------------------


class _GateServer:
    """Answers a chat completion only once the test opens the gate (or after 10 s, with a 500)."""

    def __init__(self) -> None:
        gate = self
        self.received = threading.Event()
        self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                gate.received.set()
                opened = gate.release.wait(10)
                body = json.dumps(
                    {
                        "id": "x",
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "opened"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200 if opened else 500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_arun_leaves_the_event_loop_free_while_it_runs(tmp_path: Path) -> None:
    gate = _GateServer()

    async def notebook_cell() -> tuple[pd.DataFrame, int]:
        run = asyncio.ensure_future(
            pipeline.arun(
                pd.DataFrame({"prompt": ["hi"]}),
                tmp_path / "o.parquet",
                base_url=gate.base_url,
                max_retries=0,
                quiet=True,
            )
        )
        ticks = 0
        while not gate.received.is_set() and ticks < 400:  # a 50 ms ticker on the same loop
            await asyncio.sleep(0.05)
            ticks += 1
        gate.release.set()  # only a loop that is not blocked gets here before the answer
        return await run, ticks

    try:
        result, ticks = asyncio.run(notebook_cell())
    finally:
        gate.close()
    assert result.loc[0, "completion"] == "opened" and result.loc[0, "status"] == "ok"
    assert ticks >= 1


def test_the_readme_dtype_table_matches_the_result(simulator: SimulatorThread) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    table = re.search(r"\| columns \| dtype \|\n\|---\|---\|\n((?:\|.*\n)+)", section)
    assert table is not None
    documented: dict[str, str] = {}
    for line in table.group(1).splitlines():
        names, dtype = line.strip("|").split("|")[:2]
        for name in re.findall(r"`([a-z_]+)`", names):
            documented[name] = re.findall(r"`([^`]+)`", dtype)[0]
    frame = pd.DataFrame({"text": ["yes please", "no way"], "want": ["yes", "no"]})
    result = pipeline.run(
        frame,
        template="{text}",
        base_url=simulator.base_url,
        model=["m1", "m2"],
        labels=["yes", "no"],
        expected_column="want",
        score="exact",
        n=2,
        samples="long",
        quiet=True,
    )
    added = [c for c in result.columns if c not in frame.columns]
    assert set(added) <= set(documented)
    assert {c: str(result[c].dtype) for c in added} == {c: documented[c] for c in added}
