"""K samples per row (--n K): native n or seeded requests, list or long OUTPUT, and every
guarantee of a run (resume, retries, budgets, dedup, cache, scores, totals) per sample.

Everything goes over real HTTP to the simulator on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_pipeline as run_cli

import pipeline
from pipeline import todo
from pipeline.config import RunConfig
from pipeline.estimating import estimate_job
from pipeline.fingerprint import fingerprint
from pipeline.pricing import PriceTable
from pipeline.records import RESULT_COLUMNS
from pipeline.simulator import SimulatorThread

MakeSimulator = Callable[..., SimulatorThread]
ROWS = pd.DataFrame({"id": ["a", "b", "c"], "q": ["first", "second", "third"]})
# Result columns that hold one value per sample in the list layout.
PER_SAMPLE = ("completion", "finish_reason")


def bodies(sim: SimulatorThread) -> list[dict[str, Any]]:
    return [r.body for r in sim.simulator.requests if r.body is not None]


def prompt_of(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def run(sim: SimulatorThread, out: Path, data: pd.DataFrame = ROWS, **options: Any) -> pd.DataFrame:
    opts: dict[str, Any] = {"prompt_column": "q", "id_column": "id", **options}
    return pipeline.run(data, out, base_url=sim.base_url, progress=False, **opts)


def recording_transport(usages: list[dict[str, Any]]) -> httpx.MockTransport:
    """Forwards every request to the server over HTTP and keeps the usage of each 200."""

    async def forward(request: httpx.Request) -> httpx.Response:
        async with httpx.AsyncClient() as http:
            response = await http.request(
                request.method, request.url, headers=request.headers, content=request.content
            )
        if response.status_code == 200:
            usages.append(response.json()["usage"])
        return httpx.Response(
            response.status_code, headers=response.headers, content=response.content
        )

    return httpx.MockTransport(forward)


# -- how samples are asked for ---------------------------------------------------------------


def test_native_n_asks_once_per_row_and_lists_k_distinct_samples_per_row(
    simulator: SimulatorThread, tmp_path: Path, request_schema: dict[str, Any]
) -> None:
    out = tmp_path / "o.parquet"
    frame = run(simulator, out, n=3)

    sent = bodies(simulator)
    assert sorted(prompt_of(b) for b in sent) == ["first", "second", "third"]  # one a row
    for body in sent:
        assert body["n"] == 3 and "seed" not in body
        jsonschema.validate(body, request_schema)
    assert frame["id"].tolist() == ["a", "b", "c"]  # one OUTPUT row per input row, in order
    for q, completions, reasons in zip(
        frame["q"], frame["completion"], frame["finish_reason"], strict=True
    ):
        assert len(completions) == 3 and len(set(completions)) == 3
        assert all(text.startswith(f"Simulated answer to: {q}") for text in completions)
        assert list(reasons) == ["stop"] * 3
    types = {f.name: f.type for f in pq.read_schema(out)}
    assert types["completion"] == pa.list_(pa.string())
    assert types["finish_reason"] == pa.list_(pa.string())
    assert types["prompt_tokens"] == pa.int64() and types["status"] == pa.string()
    assert (frame["status"] == "ok").all()
    assert (frame["cost_source"] == "table").all()


def test_long_layout_has_a_row_per_sample_and_each_request_counted_once(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    usages: list[dict[str, Any]] = []
    frame = pipeline.run(
        ROWS,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        n=3,
        samples="long",
        transport=recording_transport(usages),
    )

    assert frame["q"].tolist() == ["first"] * 3 + ["second"] * 3 + ["third"] * 3
    assert frame["sample"].tolist() == [0, 1, 2] * 3
    assert frame.groupby("q")["completion"].nunique().tolist() == [3, 3, 3]
    first, shared = frame[frame["sample"] == 0], frame[frame["sample"] > 0]
    # the response's usage and cost are on sample 0; the other samples share its request
    assert first["completion_tokens"].tolist() == [u["completion_tokens"] for u in usages]
    assert (first["attempts"] == 1).all() and (first["cost_usd"] > 0).all()
    assert shared["prompt_tokens"].isna().all() and shared["cost_usd"].isna().all()
    assert (shared["cost_source"] == "shared").all() and (shared["attempts"] == 0).all()
    assert frame["completion_tokens"].sum() == sum(u["completion_tokens"] for u in usages)


@pytest.mark.parametrize(("seed", "seeds"), [(None, [1, 2, 3]), (7, [7, 8, 9])])
def test_seeds_mode_sends_k_requests_with_seeds_base_to_base_plus_k_minus_1(
    simulator: SimulatorThread,
    tmp_path: Path,
    request_schema: dict[str, Any],
    seed: int | None,
    seeds: list[int],
) -> None:
    options = {} if seed is None else {"seed": seed}
    frame = run(simulator, tmp_path / "o.parquet", n=3, n_mode="seeds", samples="long", **options)

    sent = bodies(simulator)
    for q in ROWS["q"]:
        mine = [b for b in sent if prompt_of(b) == q]
        assert sorted(b["seed"] for b in mine) == seeds
        assert all("n" not in b for b in mine)
    for body in sent:
        jsonschema.validate(body, request_schema)  # seed >= 1 is the schema's minimum
    # sample s is the answer to the request with seed base + s
    for _, row in frame.iterrows():
        assert row["completion"].endswith(f"(seed {seeds[row['sample']]})")
    assert (frame["attempts"] == 1).all() and frame["prompt_tokens"].notna().all()


def test_auto_falls_back_to_seeds_for_a_server_that_ignores_n(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(ignore_n=True)
    frame = run(sim, tmp_path / "o.parquet", n=3, samples="long", concurrency=1)

    sent = bodies(sim)
    # the first request asked n=3 and got one choice, kept as sample 0; its other samples
    # and every later row go one request per sample: nothing is asked twice
    assert sent[0]["n"] == 3 and "seed" not in sent[0]
    assert all("n" not in b for b in sent[1:])
    assert [prompt_of(b) for b in sent] == ["first"] * 3 + ["second"] * 3 + ["third"] * 3
    assert sorted(b["seed"] for b in sent[1:3]) == [2, 3]
    assert sorted(b["seed"] for b in sent[3:6]) == [1, 2, 3]
    assert frame.groupby("q")["completion"].nunique().tolist() == [3, 3, 3]
    assert (frame["status"] == "ok").all()
    # no request is counted twice: each holds its usage on the sample it answered
    assert frame["prompt_tokens"].notna().sum() == len(sent)


def test_native_mode_against_a_server_that_ignores_n_reports_the_missing_samples(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(ignore_n=True)
    frame = run(sim, tmp_path / "o.parquet", n=2, n_mode="native", samples="long")

    assert len(bodies(sim)) == 3
    assert (frame.loc[frame["sample"] == 0, "status"] == "ok").all()
    missing = frame[frame["sample"] == 1]
    assert (missing["status"] == "error").all()
    assert (missing["error_type"] == "MissingChoice").all()
    assert missing["error_message"].str.contains("--n-mode auto or seeds").all()
    assert frame.attrs["summary"]["exit_code"] == 1


# -- K = 1 is what it always was -------------------------------------------------------------


def test_n_1_changes_nothing_in_bodies_columns_or_fingerprint(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.parquet"
    run(simulator, plain)
    plain_bodies = bodies(simulator)
    simulator.simulator.reset()
    explicit = tmp_path / "explicit.parquet"
    run(simulator, explicit, n=1, samples="long", n_mode="seeds")

    assert pq.read_schema(explicit) == pq.read_schema(plain)
    assert pq.read_schema(plain).names == ["id", "q", *RESULT_COLUMNS]
    assert sorted(map(str, bodies(simulator))) == sorted(map(str, plain_bodies))
    assert all(set(b) == {"model", "messages"} for b in plain_bodies)
    config = pipeline.build_config(options={"n": 1, "samples": "long", "n_mode": "seeds"})
    assert fingerprint(config) == fingerprint(pipeline.build_config())
    # and a checkpoint made without --n resumes with --n 1: nothing to send
    simulator.simulator.reset()
    again = run(simulator, plain, n=1)
    assert simulator.simulator.requests == []
    assert again.attrs["summary"]["resumed"] == 3


# -- resume, fingerprint, retries ------------------------------------------------------------


def test_a_rerun_after_an_interrupted_run_sends_only_the_missing_samples(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator()
    data = pd.DataFrame(
        {"id": ["a", "b", "c"], "q": ["first", "second [[sim:fail=1,quota]]", "third"]}
    )
    out = tmp_path / "o.parquet"
    options = {"n": 3, "n_mode": "seeds", "samples": "long", "concurrency": 1}
    with pytest.raises(pipeline.RunAborted):
        run(sim, out, data, **options)  # the quota answer stops the run
    first = pd.read_parquet(out)
    done = {(r.id, r.sample) for r in first.itertuples() if r.status == "ok"}
    assert done and len(done) < 9  # some samples done, some not
    mark = len(sim.simulator.requests)

    again = run(sim, out, data, **options)

    resent = {
        (data.loc[data["q"] == prompt_of(b), "id"].item(), b["seed"] - 1)
        for b in bodies(sim)[mark:]
    }
    every = {(i, s) for i in data["id"] for s in range(3)}
    assert resent == every - done
    assert len(bodies(sim)) - mark == len(every - done)  # each sent once
    assert (again["status"] == "ok").all() and len(again) == 9
    assert again.attrs["summary"]["resumed"] == len(done)


def test_a_checkpoint_made_with_one_sample_is_refused_with_three_naming_n(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    run(simulator, out)
    with pytest.raises(pipeline.FingerprintMismatch, match=r"\n  n: 1 -> 3\n") as caught:
        run(simulator, out, n=3)
    assert "--restart" in str(caught.value)
    assert "body_parameters" not in str(caught.value)  # only what changed is named
    run(simulator, out, n=3, restart=True)  # the way out the message names


def test_retry_failed_resends_only_the_failed_samples(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator()
    data = pd.DataFrame({"id": ["a", "b"], "q": ["fine", "flaky [[sim:fail=2,status=400]]"]})
    out = tmp_path / "o.parquet"
    options = {"n": 3, "n_mode": "seeds", "concurrency": 1}
    frame = run(sim, out, data, **options)
    flaky = [b["seed"] - 1 for b in bodies(sim) if prompt_of(b).startswith("flaky")]
    failed = sorted(flaky[:2])  # the first two requests of that prompt got the 400

    row = frame.set_index("id").loc["b"]
    assert row["status"] == "error" and row["error_type"] == "BadRequest"
    assert row["error_message"].startswith(
        f"samples {failed[0]}, {failed[1]} error; sample {failed[0]}: HTTP 400"
    )
    completions = list(row["completion"])
    assert [i for i, text in enumerate(completions) if text is None] == failed
    mark = len(sim.simulator.requests)

    again = run(sim, out, data, retry_failed=True, **options)

    assert sorted(b["seed"] - 1 for b in bodies(sim)[mark:]) == failed
    assert (again["status"] == "ok").all()
    assert all(text is not None for text in again.set_index("id").loc["b", "completion"])


# -- budgets, dedup, cache -------------------------------------------------------------------


def test_max_cost_reserves_k_completions_per_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prices = PriceTable.load()
    # room for one completion of max_tokens, not for three
    budget = prices.cost("gpt-3.5-turbo", 0, 2000)
    assert budget is not None
    data = pd.DataFrame({"id": ["a"], "q": ["hi"]})
    with pytest.raises(pipeline.RunAborted) as caught:
        run(simulator, tmp_path / "o.parquet", data, n=3, max_tokens=1000, max_cost=budget)
    assert caught.value.summary.exit_code == 4  # type: ignore[attr-defined]
    assert simulator.simulator.requests == []

    # the same budget lets K=3 go when three completions fit
    roomy = prices.cost("gpt-3.5-turbo", 10, 3000)
    assert roomy is not None
    frame = run(simulator, tmp_path / "p.parquet", data, n=3, max_tokens=1000, max_cost=roomy)
    assert len(frame.loc[0, "completion"]) == 3


def test_duplicate_rows_and_cached_responses_get_every_sample_without_a_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    data = pd.DataFrame({"q": ["same", "same", "other"]})
    cache = tmp_path / "cache"
    frame = pipeline.run(
        data,
        tmp_path / "a.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        n=3,
        cache=str(cache),
    )
    assert len(bodies(simulator)) == 2  # "same" once, "other" once
    assert list(frame.loc[1, "completion"]) == list(frame.loc[0, "completion"])
    assert frame.loc[1, "cost_source"] == "dedup" and frame.loc[1, "attempts"] == 0
    assert frame.attrs["summary"]["deduplicated"] == 3  # three samples copied

    simulator.simulator.reset()
    cached = pipeline.run(
        data,
        tmp_path / "b.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        n=3,
        cache=str(cache),
    )
    assert simulator.simulator.requests == []
    assert [list(c) for c in cached["completion"]] == [list(c) for c in frame["completion"]]
    assert cached.attrs["summary"]["cache_hits"] == 2  # one a request, not one a sample


# -- answers, scores, totals -----------------------------------------------------------------


LABELS = "alpha,beta,gamma,delta"


@pytest.mark.parametrize("layout", ["list", "long"])
def test_scores_are_per_sample_in_both_layouts(
    simulator: SimulatorThread, tmp_path: Path, layout: str
) -> None:
    data = pd.DataFrame({"id": ["a", "b"], "q": ["one", "two"], "gold": ["alpha", "beta"]})
    out = tmp_path / "o.parquet"
    frame = run(
        simulator,
        out,
        data,
        n=8,
        samples=layout,
        labels=LABELS,
        expected_column="gold",
        score="exact",
    )

    if layout == "list":
        assert len(frame) == 2
        pairs = [
            (label, score, gold)
            for labels, scores, gold in zip(
                frame["label"], frame["score"], frame["gold"], strict=True
            )
            for label, score in zip(labels, scores, strict=True)
        ]
    else:
        assert len(frame) == 16
        pairs = list(zip(frame["label"], frame["score"], frame["gold"], strict=True))
    assert len(pairs) == 16
    assert all(score == float(label == gold) for label, score, gold in pairs)
    assert 0 < sum(score for _, score, _ in pairs) < 16  # the samples differ
    mean = sum(score for _, score, _ in pairs) / 16
    (table,) = frame.attrs["summary"]["models"]
    assert table["scored"] == 16 and table["mean_score"] == pytest.approx(mean)
    labels = frame.attrs["summary"]["labels"]
    assert sum(labels.values()) == 16 and set(labels) <= set(LABELS.split(","))

    report = run_cli(tmp_path, "report", str(out), "--json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)[0]["mean_score"] == pytest.approx(mean)


def test_schema_columns_are_typed_lists_and_each_sample_is_reasked_by_itself(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"stars": {"type": "integer"}, "city": {"type": "string"}},
                "required": ["stars", "city"],
                "additionalProperties": False,
            }
        )
    )
    usages: list[dict[str, Any]] = []
    out = tmp_path / "o.parquet"
    frame = pipeline.run(
        pd.DataFrame({"q": ["rate it [[sim:wrong=1]]"]}),
        out,
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        n=3,
        json_schema=str(schema),
        model="gpt-4o-mini",
        transport=recording_transport(usages),
    )

    types = {f.name: f.type for f in pq.read_schema(out)}
    assert types["stars"] == pa.list_(pa.int64()) and types["city"] == pa.list_(pa.string())
    # the first answer (all three choices) was wrong: one re-ask per sample, each n=1
    sent = bodies(simulator)
    assert [b.get("n") for b in sent] == [3, None, None, None]
    assert all(b["messages"][-2]["role"] == "assistant" for b in sent[1:])
    assert frame.loc[0, "status"] == "ok" and len(frame.loc[0, "stars"]) == 3
    assert frame.loc[0, "attempts"] == 4
    # the row's usage is all four responses, nothing counted twice
    assert frame.loc[0, "prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    summary = frame.attrs["summary"]
    assert summary["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert summary["completion_tokens"] == sum(u["completion_tokens"] for u in usages)


@pytest.mark.parametrize(
    ("layout", "mode"), [("list", "native"), ("long", "native"), ("long", "seeds")]
)
def test_summary_token_totals_equal_what_the_server_reported(
    simulator: SimulatorThread, tmp_path: Path, layout: str, mode: str
) -> None:
    usages: list[dict[str, Any]] = []
    data = pd.DataFrame({"q": ["one [[sim:wrong=1]]", "two", "three [[sim:wrong=2]]"]})
    frame = pipeline.run(
        data,
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        n=4,
        samples=layout,
        n_mode=mode,
        labels="yes,no",
        max_reasks=2,
        transport=recording_transport(usages),
    )

    reported_in = sum(u["prompt_tokens"] for u in usages)
    reported_out = sum(u["completion_tokens"] for u in usages)
    assert len(usages) > (3 if mode == "native" else 12)  # re-asks happened
    summary = frame.attrs["summary"]
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (reported_in, reported_out)
    assert summary["total_tokens"] == sum(u["total_tokens"] for u in usages)
    # and OUTPUT's own columns add up to the same
    assert frame["prompt_tokens"].sum() == reported_in
    assert frame["completion_tokens"].sum() == reported_out
    assert frame["attempts"].sum() == len(usages)


# -- several models, layout changes ----------------------------------------------------------


def test_several_models_long_and_wide_with_samples(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    data = pd.DataFrame({"id": ["a", "b"], "q": ["one", "two"]})
    models = ["m-a", "m-b"]
    long = run(simulator, tmp_path / "long.parquet", data, n=2, samples="long", model=models)
    assert long["id"].tolist() == ["a"] * 4 + ["b"] * 4
    assert long["model"].tolist() == ["m-a", "m-a", "m-b", "m-b"] * 2
    assert long["sample"].tolist() == [0, 1] * 4
    assert (long["response_model"] == long["model"]).all()
    assert pq.read_schema(tmp_path / "long.parquet").names[:4] == ["id", "q", "model", "sample"]

    wide = run(simulator, tmp_path / "wide.parquet", data, n=2, model=models, wide=True)
    assert len(wide) == 2
    for model in models:
        assert all(len(c) == 2 for c in wide[f"{model}__completion"])
        assert (wide[f"{model}__status"] == "ok").all()
    report = run_cli(tmp_path, "report", "wide.parquet", "--json")
    assert report.returncode == 0, report.stderr
    assert [row["model"] for row in json.loads(report.stdout)] == models


def test_the_start_line_and_summary_count_input_rows_and_results_apart(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("q\none\ntwo\nthree\n")
    args = ["run", "in.csv", "--prompt-column", "q", "--base-url", simulator.base_url]
    result = run_cli(
        tmp_path,
        *args,
        "-o",
        "o.parquet",
        "--no-progress",
        "--n",
        "2",
        "--model",
        "m-a",
        "--model",
        "m-b",
    )
    assert result.returncode == 0, result.stderr
    assert "3 input rows x 2 models x 2 samples = 12 results; 0 already done, 12 to send" in (
        result.stderr
    )
    assert "results: 12 total (3 input rows) | 12 ok" in result.stderr
    plain = run_cli(tmp_path, *args, "-o", "plain.parquet", "--no-progress")
    assert "3 rows; 0 already done, 3 to send" in plain.stderr
    assert "rows: 3 total | 3 ok" in plain.stderr


def test_switching_the_layout_rewrites_output_without_a_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    run(simulator, out, n=2)
    simulator.simulator.reset()

    frame = run(simulator, out, n=2, samples="long")

    assert simulator.simulator.requests == []
    assert frame["sample"].tolist() == [0, 1] * 3
    back = run(simulator, out, n=2)
    assert len(back) == 3 and simulator.simulator.requests == []


def test_the_estimate_counts_k_completions_and_the_requests_each_mode_sends(
    tmp_path: Path,
) -> None:
    (tmp_path / "in.csv").write_text("q\none\ntwo\n", encoding="utf-8")
    base = ["estimate", "in.csv", "--prompt-column", "q", "--max-tokens", "10", "--json"]
    base += ["--base-url", "http://127.0.0.1:9/v1", "--n", "3"]
    native = run_cli(tmp_path, *base, "--n-mode", "native")
    seeds = run_cli(tmp_path, *base, "--n-mode", "seeds")
    plain = run_cli(tmp_path, *base[:-2])
    assert native.returncode == seeds.returncode == plain.returncode == 0, native.stderr
    one, by_n, by_seed = (json.loads(r.stdout) for r in (plain, native, seeds))

    assert (by_n["requests"], by_seed["requests"]) == (2, 6)
    assert by_n["completion_tokens"]["high"] == by_seed["completion_tokens"]["high"] == 60
    assert by_n["prompt_tokens"] == one["prompt_tokens"]
    assert by_seed["prompt_tokens"] == 3 * one["prompt_tokens"]  # each request resends it


# -- bad options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--n", "0"], "--n 0: samples per row must be at least 1"),
        (["--n", "-2"], "--n -2"),
        (["--n", "200"], "--n-mode seeds"),
        (["--n", "200", "--n-mode", "native"], "128"),
        (["--param", "n=3"], "--n"),
        (["--samples", "wide"], "--samples"),
        (["--n-mode", "guess"], "--n-mode"),
    ],
)
def test_a_bad_sample_option_exits_2_naming_the_option(
    tmp_path: Path, args: list[str], named: str
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhi\n", encoding="utf-8")
    result = run_cli(
        tmp_path, "run", "in.csv", "-o", "o.parquet", "--base-url", "http://127.0.0.1:9/v1", *args
    )
    assert result.returncode == 2
    assert named in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_n_in_a_config_file_is_checked_like_the_option(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhi\n", encoding="utf-8")
    (tmp_path / "run.toml").write_text('n = 0\nsamples = "long"\n', encoding="utf-8")
    result = run_cli(tmp_path, "run", "in.csv", "-o", "o.parquet", "--config", "run.toml")
    assert result.returncode == 2 and "--n 0" in result.stderr


def test_an_input_column_named_sample_clashes_only_with_the_long_layout(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    data = pd.DataFrame({"id": ["a"], "q": ["x"], "sample": [5]})
    with pytest.raises(pipeline.InputError, match="'sample'"):
        run(simulator, tmp_path / "o.parquet", data, n=2, samples="long")
    frame = run(simulator, tmp_path / "p.parquet", data, n=2)
    assert frame.loc[0, "sample"] == 5


@pytest.mark.parametrize("at_once", [1 << 20, 8], ids=["all rows at once", "8 rows at a time"])
def test_an_estimate_leaves_out_each_models_rows_that_have_every_sample(
    simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_once: int
) -> None:
    monkeypatch.setattr(todo, "PLAN_ROWS", at_once)
    frame = pd.DataFrame({"prompt": [f"question {i}" for i in range(21)]})
    out = tmp_path / "o.parquet"
    options: dict[str, Any] = {"model": ["m-a", "m-b"], "n": 2, "progress": False}
    pipeline.run(frame.iloc[:13], out, base_url=simulator.base_url, **options)
    config = RunConfig(models=("m-a", "m-b"), n=2, progress=False)
    data = tmp_path / "in.csv"
    frame.to_csv(data, index=False)

    estimates = estimate_job(data, out, config)

    assert [e.model for e in estimates] == ["m-a", "m-b"]
    for estimate in estimates:
        assert estimate.rows == 8  # the 8 rows no earlier run answered
        assert any("13 rows already done" in note for note in estimate.notes)
