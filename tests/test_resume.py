"""Rerunning the same command resumes: only rows without a result are sent, and OUTPUT ends
with every input row exactly once, in input order.

The SIGKILL tests run ``python -m pipeline run`` as a real subprocess and kill it with a real
signal; the others call the real CLI in this process (``click.testing.CliRunner``), which is
the same code path minus the interpreter start-up. Every test talks to the simulator over
real HTTP and reads what it received from ``simulator.requests``.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import cli, write_csv

from pipeline.simulator import RecordedRequest, SimulatorThread

MakeSimulator = Callable[..., SimulatorThread]
ANSWER = "Simulated answer to: "


# -- helpers -------------------------------------------------------------------------------


def prompt_of(request: RecordedRequest) -> str:
    assert request.body is not None
    content: str = request.body["messages"][-1]["content"]
    return content


def received(sim: SimulatorThread, since: int = 0) -> list[str]:
    """The prompts (last user message) the simulator received, in arrival order."""
    return [prompt_of(r) for r in sim.simulator.requests[since:]]


def run_args(sim: SimulatorThread, source: Path, output: Path, *extra: Any) -> list[str]:
    return [
        "run",
        str(source),
        "-o",
        str(output),
        "--base-url",
        sim.base_url,
        "--no-progress",
        *(str(e) for e in extra),
    ]


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m pipeline ARGS`` as a real process; stdout and stderr go to ``log``."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
        )


def wait_until(
    condition: Callable[[], bool],
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 60,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def read_output(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def assert_complete(output: Path, prompts: list[str]) -> pd.DataFrame:
    """OUTPUT holds every prompt once, in input order, each ok with its own answer."""
    frame = read_output(output)
    assert frame["prompt"].tolist() == prompts
    assert frame["status"].tolist() == ["ok"] * len(prompts)
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]
    return frame


# -- SIGKILL at random points, then the same command again --------------------------------

KILL_ROWS = 1500
KILL_LATENCY_MS = 50
KILL_CONCURRENCY = 8  # about 160 rows/s: each run sends for seconds, longer than LOSS_WINDOW
CHECKPOINT_SECONDS = 0.25
# What a SIGKILL may lose: the responses since the last checkpoint (persisted at least every
# CHECKPOINT_SECONDS), those in flight, and scheduling slack on a busy machine.
LOSS_WINDOW = CHECKPOINT_SECONDS + 1.75


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_rerun_after_sigkills_at_random_points_finishes_every_row_once_in_order(
    make_simulator: MakeSimulator, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    sim = make_simulator(latency_ms=KILL_LATENCY_MS)
    prompts = [f"row {i}: what about {rng.randrange(10**6)}?" for i in range(KILL_ROWS)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    config = tmp_path / "job.toml"
    config.write_text(f"checkpoint_seconds = {CHECKPOINT_SECONDS}\n")
    args = run_args(sim, source, output, "--config", config, "--concurrency", KILL_CONCURRENCY)
    log = tmp_path / "runs.log"
    requests = sim.simulator.requests

    # (start, kill time) of each run; the last one runs to the end
    runs: list[tuple[float, float | None]] = []
    for _ in range(3):
        not_yet_received = KILL_ROWS - len(set(received(sim)))
        target = len(requests) + max(1, int(not_yet_received * rng.uniform(0.2, 0.4)))
        start = time.time()
        proc = spawn(args, log)
        wait_until(lambda t=target: len(requests) >= t, f"{target} requests", proc)
        time.sleep(rng.uniform(0, 0.05))
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        runs.append((start, killed_at))

    runs.append((time.time(), None))
    final = spawn(args, log)
    assert final.wait(timeout=90) == 0, log.read_text()

    assert_complete(output, prompts)

    # Which run sent each request: the last run started before it arrived.
    starts = [start for start, _ in runs]

    def run_of(t: float) -> int:
        return max(i for i, s in enumerate(starts) if s <= t)

    receipts: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for request in requests:
        receipts[prompt_of(request)].append((request.time, run_of(request.time)))
    assert set(receipts) == set(prompts)

    problems = []
    resent_per_run = [0] * len(runs)
    for prompt, times in receipts.items():
        for (first, run), (again, rerun) in pairwise(times):
            if rerun == run:
                problems.append(f"{prompt!r} sent twice by run {run}")
                continue
            killed_at = runs[run][1]
            assert killed_at is not None
            resent_per_run[run] += 1
            if killed_at - first > LOSS_WINDOW:
                problems.append(
                    f"{prompt!r} first sent {killed_at - first:.2f}s before kill {run + 1} "
                    f"and sent again {again - killed_at:.2f}s after it"
                )
    assert not problems, f"{len(problems)} rows sent twice without cause:\n" + "\n".join(
        problems[:20]
    )

    # and the number resent is bounded by what arrives in one loss window
    arrivals: dict[int, list[float]] = defaultdict(list)
    for request in requests:
        arrivals[run_of(request.time)].append(request.time)
    for run, (_, killed_at) in enumerate(runs[:-1]):
        assert killed_at is not None
        if not arrivals[run]:
            assert resent_per_run[run] == 0
            continue
        rate = len(arrivals[run]) / max(killed_at - min(arrivals[run]), 0.05)
        bound = rate * LOSS_WINDOW + KILL_CONCURRENCY
        assert resent_per_run[run] <= bound, (run, resent_per_run[run], rate)


@pytest.mark.slow
def test_checkpoint_rows_from_the_config_file_bound_what_a_sigkill_loses(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    # checkpoint_seconds is far off, so only checkpoint_rows makes results durable in time
    sim = make_simulator(latency_ms=40)
    prompts = [f"row {i}" for i in range(300)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    config = tmp_path / "job.toml"
    config.write_text("checkpoint_seconds = 600\ncheckpoint_rows = 10\n")
    args = run_args(sim, source, output, "--config", config, "--concurrency", 2)
    requests = sim.simulator.requests
    proc = spawn(args, tmp_path / "run.log")
    wait_until(lambda: len(requests) >= 160, "160 requests", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    before_kill = set(received(sim))
    sim.simulator.config = replace(sim.simulator.config, latency_ms=0)

    mark = len(requests)
    rerun = cli(*args)

    assert rerun.exit_code == 0, rerun.output
    resent = set(received(sim, mark)) & before_kill
    # Lost: the batch not yet at checkpoint_rows, the requests in flight, and the rows that
    # finished while a part was being written: a few batches of 10, never the whole run so
    # far (all 160 rows if nothing had been persisted before the kill).
    assert len(resent) <= 40, len(resent)
    assert_complete(output, prompts)


# -- nothing new, appended, removed, edited rows ---------------------------------------------


def test_rerun_with_nothing_new_sends_nothing_and_exits_0(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"question {i}" for i in range(12)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output)).exit_code == 0
    before = read_output(output)
    sent = len(simulator.simulator.requests)
    assert sent == 12

    again = cli(*run_args(simulator, source, output))

    assert again.exit_code == 0, again.output
    assert len(simulator.simulator.requests) == sent
    pd.testing.assert_frame_equal(assert_complete(output, prompts), before)


def test_rows_appended_to_the_input_are_the_only_rows_sent_on_rerun(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    first = ["alpha", "same", "beta", "same"]
    source = write_csv(tmp_path / "in.csv", first)
    output = tmp_path / "out.parquet"
    # --no-dedup: every row is its own request, so what is sent shows which rows are new
    assert cli(*run_args(simulator, source, output, "--no-dedup")).exit_code == 0
    assert sorted(received(simulator)) == sorted(first)

    grown = [*first, "gamma", "same", "delta"]
    write_csv(source, grown)
    mark = len(simulator.simulator.requests)
    result = cli(*run_args(simulator, source, output, "--no-dedup"))

    assert result.exit_code == 0, result.output
    # a third "same" is a new row (its occurrence number is new); the first two are not
    assert sorted(received(simulator, mark)) == ["delta", "gamma", "same"]
    assert_complete(output, grown)


def test_rows_removed_from_the_input_leave_the_output_without_any_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"item {i}" for i in range(10)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output)).exit_code == 0

    kept = [p for i, p in enumerate(prompts) if i not in (0, 4, 9)]
    write_csv(source, kept)
    mark = len(simulator.simulator.requests)
    result = cli(*run_args(simulator, source, output))

    assert result.exit_code == 0, result.output
    assert received(simulator, mark) == []
    assert_complete(output, kept)


def test_an_edited_row_is_sent_again_and_no_other(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = ["one", "two", "three", "four"]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output)).exit_code == 0

    edited = ["one", "two, reworded", "three", "four"]
    write_csv(source, edited)
    mark = len(simulator.simulator.requests)
    assert cli(*run_args(simulator, source, output)).exit_code == 0

    assert received(simulator, mark) == ["two, reworded"]
    assert_complete(output, edited)


# -- --id-column ----------------------------------------------------------------------------


def test_id_column_resume_survives_reordering_and_sends_only_new_ids(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    ids = [f"r{i:03d}" for i in range(20)]
    prompts = [f"describe thing {i}" for i in range(20)]
    source = write_csv(tmp_path / "in.csv", prompts, id=ids)
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output, "--id-column", "id")).exit_code == 0
    assert len(simulator.simulator.requests) == 20

    order = list(range(20))
    random.Random(7).shuffle(order)
    new_ids = [ids[i] for i in order] + ["r100"]
    new_prompts = [prompts[i] for i in order] + ["describe the new thing"]
    write_csv(source, new_prompts, id=new_ids)
    mark = len(simulator.simulator.requests)
    result = cli(*run_args(simulator, source, output, "--id-column", "id"))

    assert result.exit_code == 0, result.output
    assert received(simulator, mark) == ["describe the new thing"]
    frame = assert_complete(output, new_prompts)
    assert frame["id"].tolist() == new_ids


def test_duplicate_ids_are_refused_before_any_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "in.csv", ["a", "b", "c", "d"], id=["x1", "x2", "x1", "x3"])
    output = tmp_path / "out.parquet"

    result = cli(*run_args(simulator, source, output, "--id-column", "id"))

    assert result.exit_code == 2
    assert "duplicate" in result.stderr and "x1" in result.stderr
    assert simulator.simulator.requests == []
    assert not output.exists()


# -- fingerprint -----------------------------------------------------------------------------

BASE_SETTINGS = [
    "--model",
    "gpt-3.5-turbo",
    "--temperature",
    "0.2",
    "--template",
    "Answer briefly: {prompt}",
    "--system",
    "You are terse.",
]


def with_setting(flag: str, value: str) -> list[str]:
    settings = list(BASE_SETTINGS)
    settings[settings.index(flag) + 1] = value
    return settings


def checkpoint_snapshot(output: Path) -> dict[str, bytes]:
    directory = output.with_name(output.name + ".checkpoint")
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--model", "gpt-4o", "model"),
        ("--temperature", "0.9", "temperature"),
        ("--template", "Answer at length: {prompt}", "template"),
        ("--system", "You are verbose.", "system"),
    ],
)
def test_resuming_under_changed_settings_is_refused_naming_the_change(
    simulator: SimulatorThread, tmp_path: Path, flag: str, value: str, named: str
) -> None:
    source = write_csv(tmp_path / "in.csv", [f"q{i}" for i in range(6)])
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output, *BASE_SETTINGS)).exit_code == 0
    output_before = output.read_bytes()
    checkpoint_before = checkpoint_snapshot(output)
    sent = len(simulator.simulator.requests)

    result = cli(*run_args(simulator, source, output, *with_setting(flag, value)))

    assert result.exit_code == 2
    assert named in result.stderr
    assert value in result.stderr, "the message shows the new setting"
    assert "--restart" in result.stderr
    assert len(simulator.simulator.requests) == sent, "nothing may be sent"
    assert output.read_bytes() == output_before
    assert checkpoint_snapshot(output) == checkpoint_before


def test_another_base_url_is_refused_too(make_simulator: MakeSimulator, tmp_path: Path) -> None:
    first, second = make_simulator(), make_simulator()
    source = write_csv(tmp_path / "in.csv", ["q1", "q2"])
    output = tmp_path / "out.parquet"
    assert cli(*run_args(first, source, output)).exit_code == 0

    result = cli(*run_args(second, source, output))

    assert result.exit_code == 2
    assert "base_url" in result.stderr and "--restart" in result.stderr
    assert second.simulator.requests == []


def test_restart_starts_over_and_keeps_the_old_checkpoint_aside(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"q{i}" for i in range(8)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    assert cli(*run_args(simulator, source, output, "--model", "old-model")).exit_code == 0
    old_checkpoint = checkpoint_snapshot(output)
    mark = len(simulator.simulator.requests)

    result = cli(*run_args(simulator, source, output, "--model", "new-model", "--restart"))

    assert result.exit_code == 0, result.output
    resent = simulator.simulator.requests[mark:]
    assert sorted(prompt_of(r) for r in resent) == sorted(prompts)
    assert {r.body["model"] for r in resent if r.body} == {"new-model"}
    frame = assert_complete(output, prompts)
    assert set(frame["response_model"]) == {"new-model"}

    backups = [
        p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("out.parquet.checkpoint.")
    ]
    assert len(backups) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert backups[0].name in result.stderr, "the user is told where the old checkpoint went"
    kept = {
        str(p.relative_to(backups[0])): p.read_bytes()
        for p in sorted(backups[0].rglob("*"))
        if p.is_file() and p.name != "lock"
    }
    assert kept == old_checkpoint

    # the new checkpoint resumes under the new settings
    mark = len(simulator.simulator.requests)
    assert cli(*run_args(simulator, source, output, "--model", "new-model")).exit_code == 0
    assert received(simulator, mark) == []


# -- --retry-failed ----------------------------------------------------------------------------


def test_retry_failed_resends_only_the_rows_that_ended_in_error(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    flaky = {2, 5, 7}
    prompts = [f"q{i} [[sim:fail=1,status=503]]" if i in flaky else f"q{i}" for i in range(10)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(simulator, source, output, "--max-retries", 0)

    first = cli(*args)

    assert first.exit_code == 1, first.output
    frame = read_output(output)
    assert frame["status"].tolist() == ["error" if i in flaky else "ok" for i in range(10)]
    assert (frame.loc[list(flaky), "http_status"] == 503).all()
    assert len(simulator.simulator.requests) == 10

    # a plain rerun keeps the errors: nothing is sent and the exit code still says "failed rows"
    plain = cli(*args)
    assert plain.exit_code == 1, plain.output
    assert len(simulator.simulator.requests) == 10

    mark = len(simulator.simulator.requests)
    retried = cli(*args, "--retry-failed")

    assert retried.exit_code == 0, retried.output
    assert sorted(received(simulator, mark)) == sorted(prompts[i] for i in flaky)
    assert_complete(output, prompts)


# -- aborts: 401 / quota ------------------------------------------------------------------------


def test_quota_exhausted_aborts_with_exit_3_and_the_rerun_sends_only_the_rest(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # one row at a time, so "done before the quota ran out" is exactly rows 0-4
    prompts = [f"q{i}" for i in range(12)]
    prompts[5] = "q5 [[sim:fail=1,quota]]"  # insufficient_quota once, then fine
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(simulator, source, output, "--concurrency", 1)

    aborted = cli(*args)

    assert aborted.exit_code == 3, aborted.output
    assert "quota" in aborted.stderr.lower()
    frame = read_output(output)
    assert frame["prompt"].tolist() == prompts
    assert frame["status"].tolist() == ["ok"] * 5 + ["pending"] * 7
    assert frame["completion"].tolist()[:5] == [ANSWER + p for p in prompts[:5]]
    status = json.loads(cli("status", output, "--json").stdout)
    assert (status["ok"], status["pending"], status["running"]) == (5, 7, False)

    mark = len(simulator.simulator.requests)
    resumed = cli(*args)

    assert resumed.exit_code == 0, resumed.output
    assert received(simulator, mark) == prompts[5:]
    assert_complete(output, prompts)


def test_rejected_api_key_aborts_with_exit_3_and_a_rerun_with_the_right_key_completes(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(require_api_key="sk-right")
    prompts = [f"q{i}" for i in range(8)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(sim, source, output, "--api-key-env", "BPP_TEST_KEY", "--concurrency", 2)

    aborted = cli(*args, env={"BPP_TEST_KEY": "sk-wrong"})

    assert aborted.exit_code == 3, aborted.output
    assert "401" in aborted.stderr or "key" in aborted.stderr.lower()
    assert "sk-wrong" not in aborted.output, "the key is never printed"
    assert 1 <= len(sim.simulator.requests) <= 2, "the run stops at the first 401"
    assert read_output(output)["status"].tolist() == ["pending"] * 8

    fixed = cli(*args, env={"BPP_TEST_KEY": "sk-right"})

    assert fixed.exit_code == 0, fixed.output
    assert_complete(output, prompts)


# -- one run at a time ----------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_on_the_same_output_is_refused_at_once_naming_pid_and_host(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=300)  # slow until the second run has been refused
    prompts = [f"slow question {i}" for i in range(60)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(sim, source, output, "--concurrency", 2)
    requests = sim.simulator.requests
    first = spawn(args, tmp_path / "first.log")
    try:
        wait_until(lambda: len(requests) >= 2, "the first run to start sending", first)

        second = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert second.returncode == 8, second.stderr  # locked: apart from usage errors (2)
        assert f"pid {first.pid}" in second.stderr
        assert socket.gethostname() in second.stderr
        assert first.poll() is None, "refused while the first run was still going"
        sim.simulator.config = replace(sim.simulator.config, latency_ms=5)
        assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    # every row was sent once: the refused run sent nothing
    assert sorted(received(sim)) == sorted(prompts)
    assert_complete(output, prompts)

    mark = len(requests)
    after = cli(*args)
    assert after.exit_code == 0, after.output
    assert received(sim, mark) == []


@pytest.mark.slow
def test_lock_left_by_a_sigkilled_run_is_taken_over_by_the_next_run(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=30)
    prompts = [f"question {i}" for i in range(200)]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(sim, source, output, "--concurrency", 4)
    requests = sim.simulator.requests
    doomed = spawn(args, tmp_path / "doomed.log")
    wait_until(lambda: len(requests) >= 20, "some requests", doomed)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    lock = output.with_name(output.name + ".checkpoint") / "lock"
    assert f"pid {doomed.pid}" in lock.read_text(), "the dead run's lock is left behind"

    status = json.loads(cli("status", output, "--json").stdout)
    assert status["running"] is False

    result = cli(*args)

    assert result.exit_code == 0, result.output
    assert_complete(output, prompts)


@pytest.mark.parametrize("n", [1, 2])
def test_a_reordered_frame_with_nothing_to_send_gets_each_rows_own_answer(
    simulator: SimulatorThread, tmp_path: Path, n: int
) -> None:
    # Before: the same rows in another order changed nothing OUTPUT's state recorded, so
    # OUTPUT was not rewritten and the returned frame paired row i with the old row i's answer.
    import pipeline

    out = tmp_path / "o.parquet"
    options: dict[str, Any] = {"base_url": simulator.base_url, "progress": False, "n": n}
    prompts = [f"prompt {i}" for i in range(6)]
    pipeline.run(pd.DataFrame({"prompt": prompts}), out, **options)
    sent = len(simulator.simulator.requests)
    shuffled = [prompts[i] for i in (3, 0, 4, 2, 5, 1)]

    frame = pipeline.run(pd.DataFrame({"prompt": shuffled}), out, **options)

    assert len(simulator.simulator.requests) == sent  # nothing sent again
    for result in (frame, pd.read_parquet(out)):
        assert result["prompt"].tolist() == shuffled
        answers = [c if n == 1 else c[0] for c in result["completion"]]
        assert answers == [f"Simulated answer to: {p}" for p in shuffled]


def test_a_frame_with_another_column_edited_rewrites_output_without_sending(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # Before: OUTPUT kept the old values (a DataFrame has no file signature), while the
    # returned frame had the new ones.
    import pipeline

    out = tmp_path / "o.parquet"
    options: dict[str, Any] = {"base_url": simulator.base_url, "progress": False}
    pipeline.run(pd.DataFrame({"prompt": ["a", "b"], "note": ["x", "y"]}), out, **options)
    sent = len(simulator.simulator.requests)

    frame = pipeline.run(pd.DataFrame({"prompt": ["a", "b"], "note": ["X", "Y"]}), out, **options)

    assert len(simulator.simulator.requests) == sent
    assert frame["note"].tolist() == pd.read_parquet(out)["note"].tolist() == ["X", "Y"]
