"""Cost before, during and after a run: cost columns, budgets, dedup, the response cache, estimates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import write_csv

import pipeline
from pipeline.simulator import SimulatorThread

# configs/prices.toml: gpt-3.5-turbo at $0.50 in / $1.50 out per 1M tokens
IN_PRICE, OUT_PRICE = 0.50, 1.50


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_each_row_has_its_cost_from_usage_and_the_price_table(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["one two three", "four five"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
    )
    for _, row in frame.iterrows():
        expected = (row["prompt_tokens"] * IN_PRICE + row["completion_tokens"] * OUT_PRICE) / 1e6
        assert row["cost_usd"] == pytest.approx(expected)
        assert row["cost_source"] == "table"
    assert frame.attrs["summary"]["cost_usd"] == pytest.approx(frame["cost_usd"].sum(), abs=1e-6)


def test_the_servers_reported_spend_wins_and_says_so(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-3.5-turbo",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            "meta": {"usage": {"credits_used": 5, "usd_spent": 0.000123}},
        }
        return httpx.Response(200, json=body, headers={"x-aimlapi-usd-spent": "0.0042"})

    frame = pipeline.run(
        pd.DataFrame({"prompt": ["a"]}),
        tmp_path / "o.parquet",
        base_url="http://127.0.0.1:9/v1",
        progress=False,
        transport=httpx.MockTransport(handler),
    )
    assert frame.loc[0, "cost_usd"] == pytest.approx(0.0042)
    assert frame.loc[0, "cost_source"] == "reported"


def test_an_unpriced_model_leaves_cost_empty_but_the_run_goes_on(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["a"]}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        model="my-local-llama",
        progress=False,
    )
    assert frame.loc[0, "status"] == "ok"
    assert pd.isna(frame.loc[0, "cost_usd"]) and pd.isna(frame.loc[0, "cost_source"])


def test_identical_prompts_are_sent_once_and_every_row_gets_the_answer(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = ["same", "other", "same", "same", "other", "third"]
    frame = pipeline.run(
        pd.DataFrame({"prompt": prompts}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
    )
    sent = sorted(r.body["messages"][-1]["content"] for r in simulator.simulator.requests)
    assert sent == ["other", "same", "third"]
    assert (frame["status"] == "ok").all()
    assert frame["completion"].tolist() == [f"Simulated answer to: {p}" for p in prompts]
    assert frame["cost_source"].tolist() == ["table", "table", "dedup", "dedup", "dedup", "table"]
    assert frame.loc[frame["cost_source"] == "dedup", "cost_usd"].sum() == 0
    assert frame.attrs["summary"]["deduplicated"] == 3


def test_no_dedup_sends_every_row(simulator: SimulatorThread, tmp_path: Path) -> None:
    pipeline.run(
        pd.DataFrame({"prompt": ["same"] * 4}),
        tmp_path / "o.parquet",
        base_url=simulator.base_url,
        progress=False,
        dedup=False,
    )
    assert len(simulator.simulator.requests) == 4


def test_a_duplicate_added_later_copies_the_stored_answer_without_a_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    pipeline.run(
        pd.DataFrame({"prompt": ["a", "b"]}), out, base_url=simulator.base_url, progress=False
    )
    simulator.simulator.reset()
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["a", "b", "b"]}), out, base_url=simulator.base_url, progress=False
    )
    assert simulator.simulator.requests == []
    assert frame["completion"].tolist()[2] == "Simulated answer to: b"
    assert frame.loc[2, "cost_source"] == "dedup"


def test_duplicates_added_later_copy_their_own_prompts_answer_when_answers_sit_in_many_parts(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    words = [f"word {i}" for i in range(6)]
    for k in range(1, len(words) + 1):  # a run per prompt: each answer in a part of its own
        pipeline.run(
            pd.DataFrame({"prompt": words[:k]}), out, base_url=simulator.base_url, progress=False
        )
    simulator.simulator.reset()
    # each prompt again, in the opposite order: every copy's answer is in another part
    frame = pipeline.run(
        pd.DataFrame({"prompt": words + words[::-1]}),
        out,
        base_url=simulator.base_url,
        progress=False,
    )
    assert simulator.simulator.requests == []
    assert frame["completion"].tolist() == [f"Simulated answer to: {p}" for p in frame["prompt"]]
    assert frame["cost_source"].tolist()[6:] == ["dedup"] * 6


def test_copies_spend_none_of_the_token_budget_and_status_counts_only_what_was_sent(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"{'word ' * 60}{i}" for i in (1, 2)] * 3  # 2 requests, 4 dedup copies
    src = write_csv(tmp_path / "in.csv", prompts)
    out = tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--base-url", simulator.base_url, "--no-progress"]
    args += ["--max-tokens", "5"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    frame = pd.read_parquet(out)
    sent = frame[frame["cost_source"] != "dedup"]
    assert len(sent) == 2 == len(simulator.simulator.requests)
    spent = int(sent["total_tokens"].sum())
    status = json.loads(_cli("status", str(out), "--json").stdout)
    assert status["prompt_tokens"] + status["completion_tokens"] == spent

    # room for one more short request, but not for the copies' tokens counted again (3x)
    write_csv(src, [*prompts, "one more"])
    second = _cli(*args, "--max-total-tokens", str(spent + 40))
    assert second.returncode == 0, second.stderr
    assert len(simulator.simulator.requests) == 3
    assert (pd.read_parquet(out)["status"] == "ok").all()


def test_max_cost_stops_before_crossing_and_a_larger_budget_finishes_the_job(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src = write_csv(tmp_path / "in.csv", [f"prompt number {i} " + "word " * 40 for i in range(60)])
    out = tmp_path / "o.parquet"
    args = [
        "run",
        str(src),
        "-o",
        str(out),
        "--base-url",
        simulator.base_url,
        "--no-progress",
        "--max-tokens",
        "20",
        "--concurrency",
        "4",
    ]
    # each request: ~45 prompt tokens and at most 20 out: about $0.00005 worst case
    first = _cli(*args, "--max-cost", "0.001")
    assert first.returncode == 4, first.stderr
    assert "budget reached" in first.stderr
    frame = pd.read_parquet(out)
    spent = frame["cost_usd"].sum()
    assert spent <= 0.001
    assert 0 < (frame["status"] == "ok").sum() < 60
    assert set(frame["status"]) == {"ok", "pending"}
    sent_first = len(simulator.simulator.requests)
    second = _cli(*args, "--max-cost", "1")
    assert second.returncode == 0, second.stderr
    final = pd.read_parquet(out)
    assert (final["status"] == "ok").all()
    assert len(simulator.simulator.requests) == 60  # nothing sent twice
    assert sent_first < 60


def test_max_total_tokens_caps_the_tokens_of_the_whole_output(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src = write_csv(tmp_path / "in.csv", [f"row {i} alpha beta gamma" for i in range(40)])
    out = tmp_path / "o.parquet"
    result = _cli(
        "run",
        str(src),
        "-o",
        str(out),
        "--base-url",
        simulator.base_url,
        "--no-progress",
        "--max-tokens",
        "10",
        "--max-total-tokens",
        "300",
        "--concurrency",
        "2",
    )
    assert result.returncode == 4, result.stderr
    frame = pd.read_parquet(out)
    assert frame["total_tokens"].sum() <= 300
    assert (frame["status"] == "pending").any()


def test_the_cache_answers_a_rerun_into_another_output_without_requests(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    data = pd.DataFrame({"prompt": ["x", "y", "z"]})
    pipeline.run(
        data,
        tmp_path / "a.parquet",
        base_url=simulator.base_url,
        progress=False,
        cache=str(cache),
        api_key_env="CACHE_TEST_KEY",
    )
    assert len(simulator.simulator.requests) == 3
    simulator.simulator.reset()
    frame = pipeline.run(
        data, tmp_path / "b.parquet", base_url=simulator.base_url, progress=False, cache=str(cache)
    )
    assert simulator.simulator.requests == []
    assert frame["cost_source"].tolist() == ["cache"] * 3
    assert frame["completion"].tolist() == [f"Simulated answer to: {p}" for p in "xyz"]
    assert frame.attrs["summary"]["cache_hits"] == 3

    stats = _cli("cache", "stats", str(cache), "--json")
    assert json.loads(stats.stdout)["entries"] == 3
    pruned = _cli("cache", "prune", str(cache), "--max-size", "0")
    assert pruned.returncode == 0 and "removed 3 entries" in pruned.stdout


def test_the_cache_never_stores_the_api_key(simulator: SimulatorThread, tmp_path: Path):
    secret = "sk-cache-secret-5555"
    cache = tmp_path / "cache"
    src = write_csv(tmp_path / "in.csv", ["p1", "p2"])
    result = _cli(
        "run",
        str(src),
        "-o",
        str(tmp_path / "o.parquet"),
        "--base-url",
        simulator.base_url,
        "--cache",
        str(cache),
        "--api-key-env",
        "K",
        env={"K": secret},
    )
    assert result.returncode == 0
    blobs = b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())
    assert blobs and secret.encode() not in blobs


def test_estimate_sends_nothing_and_gives_ranges(simulator: SimulatorThread, tmp_path: Path):
    src = write_csv(tmp_path / "in.csv", ["alpha beta", "gamma", "alpha beta", ""])
    result = _cli(
        "estimate", str(src), "--base-url", simulator.base_url, "--max-tokens", "50", "--json"
    )
    assert result.returncode == 0, result.stderr
    est = json.loads(result.stdout)
    assert simulator.simulator.requests == []
    assert est["rows"] == 4 and est["skipped"] == 1 and est["duplicates"] == 1
    assert est["requests"] == 2
    assert est["completion_tokens"]["low"] == 0 and est["completion_tokens"]["high"] == 100
    assert est["cost_usd"]["low"] < est["cost_usd"]["high"]
    dry = _cli(
        "run",
        str(src),
        "-o",
        str(tmp_path / "o.parquet"),
        "--base-url",
        simulator.base_url,
        "--dry-run",
    )
    assert dry.returncode == 0 and "requests to send" in dry.stdout
    assert not (tmp_path / "o.parquet").exists()
    assert simulator.simulator.requests == []


def test_estimate_leaves_out_rows_the_output_already_has(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src = write_csv(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "o.parquet"
    assert _cli("run", str(src), "-o", str(out), "--base-url", simulator.base_url).returncode == 0
    write_csv(src, ["a", "b", "c"])
    est = json.loads(_cli("estimate", str(src), "-o", str(out), "--json").stdout)
    assert est["requests"] == 1


def test_estimate_counts_what_the_run_sends_when_added_rows_repeat_answered_prompts(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # rows added later that repeat an answered prompt copy its stored answer: the
    # estimate counts them as duplicates, not requests (it counted each as a request)
    src = write_csv(tmp_path / "in.csv", ["a", "b", "c"])
    out = tmp_path / "o.parquet"
    assert _cli("run", str(src), "-o", str(out), "--base-url", simulator.base_url).returncode == 0
    write_csv(src, ["a", "b", "c", "a", "b", "d", "d"])
    est = json.loads(_cli("estimate", str(src), "-o", str(out), "--json").stdout)
    assert (est["rows"], est["duplicates"], est["requests"]) == (4, 3, 1)

    sent = len(simulator.simulator.requests)
    ran = _cli("run", str(src), "-o", str(out), "--base-url", simulator.base_url)
    assert ran.returncode == 0, ran.stderr
    assert len(simulator.simulator.requests) - sent == est["requests"] == 1
    answers = pd.read_parquet(out)["completion"].tolist()
    assert answers[3:5] == answers[0:2] and answers[5] == answers[6] != answers[0]


def test_estimate_with_several_models_counts_each_models_own_rows_and_sums_them(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    src = write_csv(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "o.parquet"
    two = ["--model", "gpt-3.5-turbo", "--model", "gpt-4o"]
    ran = _cli("run", str(src), "-o", str(out), "--base-url", simulator.base_url, *two)
    assert ran.returncode == 0, ran.stderr
    write_csv(src, ["a", "b", "c"])
    three = [*two, "--model", "gpt-4o-mini", "--max-tokens", "10"]
    result = _cli("estimate", str(src), "-o", str(out), *three, "--json")
    assert result.returncode == 0, result.stderr
    est = json.loads(result.stdout)
    by_model = {e["model"]: e for e in est["models"]}
    # the first two models have rows a and b already; the new one has none of them
    assert {m: e["requests"] for m, e in by_model.items()} == {
        "gpt-3.5-turbo": 1,
        "gpt-4o": 1,
        "gpt-4o-mini": 3,
    }
    # each model is priced as itself, and the total is the sum
    costs = [e["cost_usd"]["high"] for e in est["models"]]
    assert len(set(costs)) == 3
    assert est["total"]["requests"] == 5
    assert est["total"]["cost_usd"]["high"] == pytest.approx(sum(costs))
    assert est["total"]["prompt_tokens"] == sum(e["prompt_tokens"] for e in est["models"])

    text = _cli("estimate", str(src), "-o", str(out), *three)
    assert text.returncode == 0, text.stderr
    assert "Estimate for model gpt-4o-mini" in text.stdout
    assert "Total over 3 models (gpt-3.5-turbo, gpt-4o, gpt-4o-mini)" in text.stdout
    assert len(simulator.simulator.requests) == 4  # the first run's; estimates send nothing


def test_a_row_added_before_an_answered_one_with_the_same_prompt_copies_its_answer(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # With --id-column a new id is a new row: put before the answered row of its prompt, it
    # is that prompt's first row. Before, it was sent (the prompt paid twice); now the
    # answer on the later row serves it.
    out = tmp_path / "o.parquet"
    options = {"base_url": simulator.base_url, "progress": False, "id_column": "id"}
    pipeline.run(pd.DataFrame({"id": ["b", "c"], "prompt": ["hello", "world"]}), out, **options)
    simulator.simulator.reset()
    frame = pipeline.run(
        pd.DataFrame({"id": ["a", "b", "c", "d"], "prompt": ["hello", "hello", "world", "hello"]}),
        out,
        **options,
    )
    assert simulator.simulator.requests == []
    assert frame["completion"].tolist() == [f"Simulated answer to: {p}" for p in frame["prompt"]]
    assert frame["cost_source"].tolist()[0] == frame["cost_source"].tolist()[3] == "dedup"
