"""One job over several processes: ``--shard I/N`` on one OUTPUT.

Each shard answers the rows whose key falls in it (rows with one prompt together), every
run counts every shard's results as done (so N may change between runs), the shard that
finds the job complete writes OUTPUT, ``pipeline merge`` writes it on demand and ``pipeline
status`` shows each shard. The kill test runs real processes killed with a real SIGKILL
against the simulator over real HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import kill_job, run_job, run_pipeline, spawn, wait_for, write_csv

import pipeline
from pipeline import array_file, index_join, result_index, spill
from pipeline import shards as shards_module
from pipeline import status as status_module
from pipeline.checkpoint import Checkpoint
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.merging import merge_output
from pipeline.records import RowResult
from pipeline.shards import MAX_SHARDS, Shard, shard_of, share_limits
from pipeline.simulator import SimulatorThread

MakeSimulator = Callable[..., SimulatorThread]
ANSWER = "Simulated answer to: "


def received(sim: SimulatorThread) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in sim.simulator.requests if r.body]


def assert_complete(output: Path, prompts: list[str]) -> None:
    """OUTPUT holds every prompt once, in input order, each ok with its own answer."""
    frame = pd.read_parquet(output)
    assert frame["prompt"].tolist() == prompts
    assert frame["status"].tolist() == ["ok"] * len(prompts)
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]


# -- which rows a shard takes ---------------------------------------------------------------


@pytest.mark.parametrize("at_once", [1 << 20, 8], ids=["all at once", "8 rows at a time"])
def test_the_shards_of_any_n_split_the_rows_exactly_once_and_evenly(
    at_once: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards_module, "MASK_ROWS", at_once)
    keys = np.random.default_rng(7).integers(0, 2**63, 30_000, dtype=np.uint64)
    ids = np.arange(30_001, dtype=np.uint64)  # keys made from small ids spread evenly too
    for count in (1, 2, 3, 7):
        for some in (keys, ids):
            packed = [Shard(i, count).rows(some) for i in range(count)]
            masks = [mask[:] for mask in packed]
            assert (np.sum(masks, axis=0) == 1).all()
            assert masks[0].tolist() == (shard_of(some, count) == 0).tolist()
            sizes = [int(m.sum()) for m in masks]
            assert sizes == [mask.count() for mask in packed]
            assert max(sizes) - min(sizes) < 0.05 * len(some) / count + 50, sizes
    # stable: the same key goes to the same shard in every version (a checkpoint outlives it)
    pinned = shard_of(np.array([1, 2, 3, 12345, 2**63], dtype=np.uint64), 5)
    assert pinned.tolist() == [4, 0, 1, 3, 0]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1/0", "a/b", "1", f"0/{MAX_SHARDS + 1}"])
def test_a_malformed_shard_is_refused_naming_the_form(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--shard .*I/N"):
        Shard.parse(text)


def test_rpm_and_tpm_are_the_keys_totals_each_shard_takes_its_share() -> None:
    config = share_limits(RunConfig(rpm=600, tpm=90_000, shard="1/3"))
    assert (config.rpm, config.tpm) == (200, 30_000)
    assert share_limits(RunConfig(rpm=600)).rpm == 600


def test_a_shard_refuses_restart_and_batch_before_anything_is_sent(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "in.csv", ["a", "b"])
    for extra in ("--restart", "--batch"):
        result = run_pipeline(
            tmp_path, "run", str(source), "-o", "out.parquet", "--base-url",
            simulator.base_url, "--shard", "0/2", extra,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert f"--shard 0/2 with {extra}" in result.stderr
    assert simulator.simulator.requests == []


# -- a job over shards, in this process ------------------------------------------------------


def test_shards_answer_their_rows_once_and_the_last_one_writes_output(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"question {i}" for i in range(120)] + ["the same prompt"] * 12
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    summaries = []
    for index in range(3):
        assert not output.exists()  # no shard writes OUTPUT before the job is complete
        summaries.append(run_job(source, output, base_url=simulator.base_url, shard=(index, 3)))
    assert_complete(output, prompts)
    # every distinct prompt was sent once over all shards: the 12 equal rows went together
    assert Counter(received(simulator)) == Counter(dict.fromkeys(set(prompts), 1))
    assert sum(s.rows_total for s in summaries) == len(prompts)
    assert [s.shard for s in summaries] == ["0/3", "1/3", "2/3"]
    assert summaries[-1].job_pending == 0 and summaries[0].job_pending > 0
    assert all(s.exit_code == 0 and s.ok == s.rows_total for s in summaries)


def test_n_may_change_between_runs_and_only_rows_without_a_result_are_sent(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"row {i}" for i in range(90)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    first = run_job(source, output, base_url=simulator.base_url, shard="0/3")
    for index in range(2):
        run_job(source, output, base_url=simulator.base_url, shard=f"{index}/2")
    assert_complete(output, prompts)
    assert sorted(received(simulator)) == sorted(prompts)  # none twice
    # and a run of the whole job afterwards finds everything done
    again = run_job(source, output, base_url=simulator.base_url)
    assert (again.sent, again.resumed) == (0, 90)
    assert first.rows_total < 90


def test_merge_writes_output_now_with_pending_rows_and_names_the_shards_that_owe(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"item {i}" for i in range(60)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    for index in (0, 2):
        run_job(source, output, base_url=simulator.base_url, shard=(index, 3))
    result = run_pipeline(tmp_path, "merge", "out.parquet", "--json")
    assert result.returncode == 1, result.stderr  # rows pending
    merged = json.loads(result.stdout)
    frame = pd.read_parquet(output)
    assert frame["prompt"].tolist() == prompts
    pending = frame["status"] == "pending"
    assert merged["pending"] == int(pending.sum()) > 0
    assert merged["missing_by_shard"] == {"0/3": 0, "1/3": int(pending.sum()), "2/3": 0}
    assert frame.loc[~pending, "completion"].tolist() == [
        ANSWER + p for p, missing in zip(prompts, pending, strict=True) if not missing
    ]
    text = run_pipeline(tmp_path, "merge", "out.parquet")
    assert "missing: shard 1/3:" in text.stdout
    # the last shard finishes the job and replaces the merged OUTPUT (it wrote it)
    last = run_job(source, output, base_url=simulator.base_url, shard=(1, 3))
    assert last.exit_code == 0 and last.sent == merged["pending"]
    assert_complete(output, prompts)


def test_status_shows_each_shard(simulator: SimulatorThread, tmp_path: Path) -> None:
    prompts = [f"p{i}" for i in range(40)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    run_job(source, output, base_url=simulator.base_url, shard=(1, 2))
    state = json.loads(run_pipeline(tmp_path, "status", "out.parquet", "--json").stdout)
    shards = {s["shard"]: s for s in state["shards"]}
    assert set(shards) == {"0/2", "1/2"}
    assert shards["1/2"]["state"] == "done" and shards["1/2"]["pending"] == 0
    assert shards["0/2"]["state"] == "not started" and shards["0/2"]["done"] == 0
    assert shards["0/2"]["pending"] + shards["1/2"]["results"] == len(prompts)
    assert state["pending"] == shards["0/2"]["pending"]
    text = run_pipeline(tmp_path, "status", "out.parquet").stdout
    assert "shard 0/2: 0/" in text and "not started" in text


def test_status_and_merge_count_a_window_of_keys_at_a_time_as_they_would_all_at_once(
    simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two models: the recorded keys are model after model, so windows cross from one
    # model's rows to the next; one shard of three has run; the index in blocks of 8 keys
    monkeypatch.setattr(spill, "BUCKET_KEYS", 8)
    source = write_csv(tmp_path / "in.csv", [f"p{i}" for i in range(41)])
    output = tmp_path / "out.parquet"
    models = ["gpt-3.5-turbo", "gpt-4o-mini"]
    run_job(source, output, base_url=simulator.base_url, shard=(1, 3), models=tuple(models))
    at_once = pipeline.run_status(output)

    merged = merge_output(output, destination=tmp_path / "preview.parquet")
    preview = pd.read_parquet(tmp_path / "preview.parquet")

    monkeypatch.setattr(status_module, "STATUS_KEYS", 7)
    monkeypatch.setattr(index_join, "PLACES_WINDOW", 5)
    monkeypatch.setattr(index_join, "MIN_WINDOW_ROWS", 2)
    monkeypatch.setattr(array_file, "GATHER", 3)
    monkeypatch.setattr(result_index, "CACHED_KEYS", 0)  # joined with the keys, block by block
    by_window = pipeline.run_status(output)
    merged_by_window = merge_output(output, destination=tmp_path / "preview-5.parquet")

    # (the cost is summed a window at a time: the same to the last bits of a float)
    assert by_window.spent_usd == pytest.approx(at_once.spent_usd, rel=1e-9)
    assert dataclasses.replace(by_window, spent_usd=0.0) == dataclasses.replace(
        at_once, spent_usd=0.0
    )
    assert merged_by_window == dataclasses.replace(merged, output=merged_by_window.output)
    assert pd.read_parquet(tmp_path / "preview-5.parquet").equals(preview)
    assert sum(merged.missing_by_shard.values()) == at_once.pending > 0
    assert at_once.rows_total == 82 and 0 < at_once.pending < 82
    shards = {s["shard"]: s for s in at_once.shards}
    assert shards["1/3"]["pending"] == 0 and shards["0/3"]["done"] == shards["2/3"]["done"] == 0
    assert sum(s["results"] for s in shards.values()) == 82
    assert merged.missing_by_shard == {name: s["pending"] for name, s in shards.items()}


def test_the_python_api_runs_a_shard_and_returns_the_job_so_far(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pd.DataFrame({"prompt": [f"api {i}" for i in range(30)]}, index=range(100, 130))
    output = tmp_path / "out.parquet"
    with pytest.raises(ConfigError, match="shard= needs output="):
        pipeline.run(frame, base_url=simulator.base_url, shard=(0, 2), progress=False)
    first = pipeline.run(frame, output, base_url=simulator.base_url, shard=(0, 2), quiet=True)
    assert list(first.index) == list(frame.index)
    done = first["status"] == "ok"
    assert 0 < done.sum() < 30 and set(first["status"]) == {"ok", "pending"}
    assert first.attrs["summary"]["shard"] == "0/2"
    assert not output.exists()  # OUTPUT is left to the shard that finishes the job
    second = pipeline.run(frame, output, base_url=simulator.base_url, shard="1/2", quiet=True)
    assert (second["status"] == "ok").all() and output.exists()
    assert second["completion"].tolist() == [ANSWER + p for p in frame["prompt"]]


# -- locks: what may run beside what ---------------------------------------------------------


def test_a_running_shard_excludes_its_twin_another_n_and_a_whole_run(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=200)
    source = write_csv(tmp_path / "in.csv", [f"slow {i}" for i in range(200)])
    base = ["run", source, "-o", "out.parquet", "--base-url", sim.base_url, "--no-progress"]
    proc = spawn([*base, "--shard", "0/2", "--concurrency", "2"], tmp_path / "shard.log")
    try:
        wait_for(lambda: len(sim.simulator.requests) >= 2, "its first requests", proc)
        twin = run_pipeline(tmp_path, *map(str, base), "--shard", "0/2")
        assert twin.returncode == 8 and "shard 0/2 of" in twin.stderr, twin.stderr
        other_n = run_pipeline(tmp_path, *map(str, base), "--shard", "1/3")
        assert other_n.returncode == 8 and "another N are running" in other_n.stderr
        whole = run_pipeline(tmp_path, *map(str, base))
        assert whole.returncode == 8, whole.stderr
        state = json.loads(run_pipeline(tmp_path, "status", "out.parquet", "--json").stdout)
        assert state["running"] and "shard 0/2" in state["running_by"]
        assert state["exit_code"] == 8
        # its sibling runs beside it
        sibling = run_pipeline(tmp_path, *map(str, base), "--shard", "1/2")
        assert sibling.returncode == 0, sibling.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    state = json.loads(run_pipeline(tmp_path, "status", "out.parquet", "--json").stdout)
    assert {s["shard"]: s["state"] for s in state["shards"]}["0/2"] == "interrupted"
    # the killed shard's rerun takes its lock over and finishes the job
    again = run_pipeline(tmp_path, *map(str, base), "--shard", "0/2")
    assert again.returncode == 0, again.stderr
    assert pd.read_parquet(tmp_path / "out.parquet")["status"].eq("ok").all()


# -- SIGKILL: 3 shard processes killed once each, then N = 2 for the rest ---------------------

KILL_ROWS = 900
KILL_CONCURRENCY = 8
CHECKPOINT_SECONDS = 0.25
LOSS_WINDOW = CHECKPOINT_SECONDS + 1.75  # as in test_resume: checkpoint period + slack


@pytest.mark.slow
def test_three_shards_killed_at_random_points_then_two_finish_every_row_once_in_order(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=50)
    rng, prompts, base = kill_job(
        tmp_path, sim.base_url, "out.parquet", seed=3, rows=KILL_ROWS,
        concurrency=KILL_CONCURRENCY, checkpoint_seconds=CHECKPOINT_SECONDS,
    )  # fmt: skip
    requests = sim.simulator.requests
    procs = [spawn([*base, "--shard", f"{i}/3"], tmp_path / f"s{i}.log") for i in range(3)]
    kills: list[float] = []
    for proc in procs:  # each at its own random point, the others still sending
        target = len(requests) + rng.randrange(40, 120)
        wait_for(lambda t=target: len(requests) >= t, f"{target} requests", proc)
        proc.send_signal(signal.SIGKILL)
        kills.append(time.time())
        assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not (tmp_path / "out.parquet").exists()
    sent_before = len(requests)
    rate = sent_before / max(kills[-1] - requests[0].time, 0.05)

    finals = [spawn([*base, "--shard", f"{i}/2"], tmp_path / f"t{i}.log") for i in range(2)]
    for i, proc in enumerate(finals):
        assert proc.wait(timeout=120) == 0, (tmp_path / f"t{i}.log").read_text()

    assert_complete(tmp_path / "out.parquet", prompts)
    counts = Counter(received(sim))
    assert set(counts) == set(prompts)
    assert max(counts.values()) <= 2
    # sent again: at most what was in flight or not yet checkpointed at each kill
    resent = sum(n - 1 for n in counts.values())
    assert resent <= 3 * (rate * LOSS_WINDOW + KILL_CONCURRENCY), (resent, rate)
    state = json.loads(run_pipeline(tmp_path, "status", "out.parquet", "--json").stdout)
    assert state["pending"] == 0 and state["exit_code"] == 0
    assert [s["state"] for s in state["shards"]] == ["done", "done"]


def test_shards_running_at_once_never_pass_the_jobs_budget_together(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "in.csv", [f"budget row {i}" for i in range(200)])
    output = tmp_path / "out.parquet"
    budget = 0.0006  # about 90 of the 200 answers at the table's price
    first = run_job(source, output, base_url=simulator.base_url, shard="0/2", max_cost=budget)
    assert first.exit_code == 4  # budget: shard 0 took its half of the budget, not all of it
    assert 0 < first.cost_usd <= budget / 2
    second = run_job(source, output, base_url=simulator.base_url, shard="1/2", max_cost=budget)
    assert second.exit_code == 4
    # the second gets half of what was left when it started: together never past the budget
    assert first.cost_usd + second.cost_usd <= first.cost_usd + (budget - first.cost_usd) / 2


def test_an_index_saved_by_one_shard_never_hides_a_part_another_wrote_meanwhile(
    tmp_path: Path,
) -> None:
    output = tmp_path / "out.parquet"
    first, second = Checkpoint(output), Checkpoint(output)
    for checkpoint, shard in ((first, Shard(0, 2)), (second, Shard(1, 2))):
        checkpoint.acquire_lock(shard)
        checkpoint.prepare()
        checkpoint.end_setup()
    first.write_part([RowResult(key=1, status="ok", completion="first's")])
    index = first.load_index()
    second.write_part([RowResult(key=2, status="ok", completion="second's")])
    first.save_index(index)  # built before the second's part: it must not claim it
    for checkpoint in (first, second):
        checkpoint.release_lock()
    assert sorted(Checkpoint(output).load_index().read_keys().tolist()) == [1, 2]


def test_a_shard_that_takes_no_row_says_so_not_that_the_input_is_empty(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    write_csv(tmp_path / "in.csv", ["hello", "hello", "world"])
    taken = [
        int(Shard(i, 2).rows(np.array(keys_of(tmp_path / "in.csv"), dtype=np.uint64)).count())
        for i in range(2)
    ]
    assert 0 in taken  # (row keys are stable: these 3 rows all go to one shard of 2)
    empty = taken.index(0)
    base = ["run", "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url]
    result = run_pipeline(tmp_path, *base, "--shard", f"{empty}/2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"shard {empty}/2 takes none of in.csv's rows: nothing to send" in result.stderr
    assert "a header only" not in result.stderr


def keys_of(path: Path) -> list[int]:
    """The shard key of each row of ``path`` (its prompt's first row's key)."""
    from pipeline.keys import compute_keys
    from pipeline.reader import open_input

    row_keys = compute_keys(open_input(path), id_column=None, content_columns=["prompt"])
    return [int(k) for k in row_keys.prompt_keys()[:]]
