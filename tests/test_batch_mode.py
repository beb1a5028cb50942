"""Batch mode (``--batch``) against a Files + Batches server on 127.0.0.1 (tests/batch_server.py):
the same OUTPUT as an online run, parts cut by count, lines that expire sent again, failures
as error rows, ``--no-wait`` exits 9 and a rerun collects, and a create whose answer is lost
(a kill, a dropped connection) is found by its tag instead of being created twice.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from batch_server import BatchServer, Faults, answer
from click.testing import CliRunner
from conftest import run_job

from pipeline.batch import executor as executor_module
from pipeline.cli import main
from pipeline.errors import EXIT_BATCHES_RUNNING, EXIT_FAILED_ROWS, EXIT_OK, ConfigError

FAST = {"batch": True, "poll_interval": 0.01}


def _input(path: Path, count: int = 30) -> Path:
    prompts = [f"item {i % 25}" for i in range(count)]  # the last 5 repeat the first 5
    pd.DataFrame({"prompt": prompts}).to_csv(path, index=False)
    return path


def _compare(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["latency_ms", "cost_usd", "cost_source", "response_id"])


def test_a_batch_run_writes_the_output_of_an_online_run(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv")
    with BatchServer() as server:
        online = run_job(data, tmp_path / "online.parquet", base_url=server.base_url)
        summary = run_job(
            data, tmp_path / "batch.parquet", base_url=server.base_url,
            batch_max_requests=10, **FAST,
        )  # fmt: skip
        assert len(server.creates) == 3  # 25 distinct prompts in parts of at most 10
    assert online.exit_code == summary.exit_code == EXIT_OK
    assert (summary.ok, summary.deduplicated) == (30, 5)
    batch = pd.read_parquet(tmp_path / "batch.parquet")
    pd.testing.assert_frame_equal(
        _compare(batch), _compare(pd.read_parquet(tmp_path / "online.parquet"))
    )
    first = batch[batch["cost_source"] != "dedup"]
    # the price table's own batch price of gpt-3.5-turbo (half its list price)
    assert (first["cost_source"] == "batch_table").all()
    paid = pd.read_parquet(tmp_path / "online.parquet").loc[first.index, "cost_usd"]
    assert first["cost_usd"].tolist() == pytest.approx((paid / 2).tolist())


def test_a_model_without_batch_prices_is_billed_half_its_price_and_says_so(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv", count=6)
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-3.5-turbo"]\ninput = 2.0\noutput = 4.0\n')
    with BatchServer() as server:
        run_job(data, tmp_path / "b.parquet", base_url=server.base_url, prices=str(prices), **FAST)
    frame = pd.read_parquet(tmp_path / "b.parquet")
    assert set(frame["cost_source"]) == {"batch"}
    usage = frame["prompt_tokens"] * 2.0 + frame["completion_tokens"] * 4.0
    assert frame["cost_usd"].tolist() == pytest.approx((usage / 1e6 / 2).tolist())


def test_expired_lines_are_sent_again_in_a_new_part_and_end_ok(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv")
    with BatchServer(Faults(expire_prompts={"item 3", "item 7"})) as server:
        summary = run_job(data, tmp_path / "out.parquet", base_url=server.base_url, **FAST)
        assert len(server.creates) == 2  # the first part, then the two expired lines
        second = json.loads(
            server.files[server.batches[list(server.batches)[-1]]["input_file_id"]].splitlines()[0]
        )
    assert summary.exit_code == EXIT_OK and summary.ok == 30
    assert second["body"]["messages"][-1]["content"] in {"item 3", "item 7"}
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert (frame["completion"] == "Simulated answer to: " + frame["prompt"]).all()


def test_lines_that_fail_every_round_end_as_error_rows_with_their_status(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv", 5)
    with BatchServer(Faults(fail_all=True)) as server:
        summary = run_job(data, tmp_path / "out.parquet", base_url=server.base_url, **FAST)
        assert len(server.creates) == 3  # a 500 line may be sent again: 3 rounds
    assert summary.exit_code == EXIT_FAILED_ROWS and summary.error == 5
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert (frame["http_status"] == 500).all() and (frame["attempts"] == 3).all()
    assert frame["error_message"].str.contains("server error").all()


def test_a_batch_that_fails_validation_fails_its_rows_loudly_naming_the_line(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv", 5)
    with BatchServer(Faults(invalid=True)) as server:
        summary = run_job(data, tmp_path / "out.parquet", base_url=server.base_url, **FAST)
    assert summary.exit_code == EXIT_FAILED_ROWS and summary.error == 5
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert frame["error_message"].str.contains("line 2: invalid_request").all()


def test_no_wait_exits_9_with_rows_pending_and_a_rerun_collects_without_resubmitting(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv")
    output = tmp_path / "out.parquet"
    with BatchServer(Faults(polls_running=2)) as server:
        first = run_job(data, output, base_url=server.base_url, wait=False, **FAST)
        assert first.exit_code == EXIT_BATCHES_RUNNING and first.pending == 30
        assert (pd.read_parquet(output)["status"] == "pending").all()
        second = run_job(data, output, base_url=server.base_url, wait=False, **FAST)
        assert second.exit_code == EXIT_BATCHES_RUNNING  # still running (2 polls say so)
        # status shows the batch from the journal, without asking the server
        (batch_id,) = server.batches
        polls = server.batches[batch_id]["_polls"]
        state = json.loads(CliRunner().invoke(main, ["status", str(output), "--json"]).stdout)
        (batch,) = state["batches"]
        assert (batch["stage"], batch["batch_id"]) == ("submitted", batch_id)
        assert (batch["lines"], batch["model"]) == (25, "gpt-3.5-turbo")
        assert 0 <= batch["age_s"] < 60
        assert server.batches[batch_id]["_polls"] == polls  # no request to the server
        text = CliRunner().invoke(main, ["status", str(output)]).stdout
        assert f"batch part 1 (gpt-3.5-turbo, 25 lines): submitted, {batch['batch_id']}" in text
        third = run_job(data, output, base_url=server.base_url, wait=False, **FAST)
        assert third.exit_code == EXIT_OK and third.ok == 30
        assert len(server.creates) == 1  # one batch, collected by the third run
        assert server.lines_answered == 25


def test_a_create_whose_answer_is_lost_is_found_by_its_tag_not_created_again(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv")
    with BatchServer(Faults(drop_create=True)) as server:
        summary = run_job(data, tmp_path / "out.parquet", base_url=server.base_url, **FAST)
        assert len(server.creates) == 1
    assert summary.exit_code == EXIT_OK and summary.ok == 30


def _batch_child(data: Path, output: Path, base_url: str) -> subprocess.Popen[bytes]:
    """The batch run of ``data`` in a child process (to be killed)."""
    code = (
        "from pipeline import run_batch; from pipeline.config import RunConfig; "
        f"run_batch({str(data)!r}, {str(output)!r}, RunConfig(progress=False, "
        f"base_url={base_url!r}, batch=True, poll_interval=0.01))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_a_run_killed_while_its_create_is_in_flight_resumes_with_one_batch(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv")
    output = tmp_path / "out.parquet"
    held = threading.Event()
    with BatchServer(Faults(hold_create=held)) as server:
        child = _batch_child(data, output, server.base_url)
        deadline = time.monotonic() + 30
        while not server.creates and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.creates, "the run never created its batch"
        child.send_signal(signal.SIGKILL)  # the batch exists; the run never learned its id
        child.wait(10)
        held.set()
        server.faults.hold_create = None

        summary = run_job(data, output, base_url=server.base_url, **FAST)
        assert len(server.creates) == 1  # found by its tag: not created (or paid) twice
        assert server.lines_answered == 25
    assert summary.exit_code == EXIT_OK and summary.ok == 30
    frame = pd.read_parquet(output)
    assert (frame["completion"] == "Simulated answer to: " + frame["prompt"]).all()


def test_the_command_line_batch_run_exits_9_then_0_and_its_help_is_true(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv")
    output = tmp_path / "out.parquet"
    with BatchServer(Faults(polls_running=1)) as server:
        args = ["run", str(data), "-o", str(output), "--base-url", server.base_url]
        args += ["--batch", "--poll-interval", "0.01", "--no-progress"]
        first = CliRunner().invoke(main, [*args, "--no-wait"])
        assert first.exit_code == EXIT_BATCHES_RUNNING, first.output
        assert "run the same command again later" in first.stderr
        # waiting on batches is the expected outcome of --no-wait, not a failure
        assert "stopped: batches running" in first.output
        assert "aborted" not in first.output + first.stderr
        second = CliRunner().invoke(main, args)
        assert second.exit_code == EXIT_OK, second.output
        assert len(server.creates) == 1
    assert (pd.read_parquet(output)["status"] == "ok").all()


def test_the_command_line_exports_and_imports_openai_batch_files(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv", 6)
    requests = tmp_path / "requests.jsonl"
    exported = CliRunner().invoke(main, ["batch", "export", str(data), "-o", str(requests)])
    assert exported.exit_code == 0 and "6 requests" in exported.output
    results = tmp_path / "results.jsonl"
    with open(results, "w") as fh:
        for raw in requests.read_text().splitlines():
            line = json.loads(raw)
            body = {"status_code": 200, "body": answer(line["body"])}
            fh.write(json.dumps({"custom_id": line["custom_id"], "response": body}) + "\n")
    output = tmp_path / "out.parquet"
    imported = CliRunner().invoke(
        main, ["batch", "import", str(data), "-o", str(output), "--results", str(results)]
    )
    assert imported.exit_code == EXIT_OK, imported.output
    frame = pd.read_parquet(output)
    assert (frame["completion"] == "Simulated answer to: " + frame["prompt"]).all()


def _kill_after_journal_lines(data: Path, output: Path, base_url: str, lines: int) -> int:
    """Run the job in a child process and SIGKILL it once the journal has ``lines`` lines
    (the server answers slowly: the child is then waiting on its next remote call)."""
    journal = output.with_name(output.name + ".checkpoint") / "batch" / "batches.jsonl"
    child = _batch_child(data, output, base_url)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= lines:
                break
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    return journal.read_text().count("\n") if journal.exists() else 0


def test_a_rerun_while_the_killed_runs_create_is_still_being_made_creates_no_second_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the provider received the create and makes the batch a second later; the run was
    # killed meanwhile and rerun at once: its list does not show the batch yet
    monkeypatch.setattr(executor_module, "CREATE_SETTLE", 3.0)
    data = _input(tmp_path / "in.csv")
    output = tmp_path / "out.parquet"
    with BatchServer(Faults(create_delay=1.0)) as server:
        child = _batch_child(data, output, server.base_url)
        deadline = time.monotonic() + 30
        while not server.creates_received and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert server.creates_received == 1 and not server.creates  # received, not made yet

        summary = run_job(data, output, base_url=server.base_url, **FAST)

        assert len(server.creates) == 1, server.creates  # found by its tag once it was made
        assert server.lines_answered == 25
    assert summary.exit_code == EXIT_OK and summary.ok == 30


def test_kill_9_after_each_journal_step_then_a_rerun_finishes_every_row_once_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_module, "CREATE_SETTLE", 0.5)  # past the server's delay
    data = _input(tmp_path / "in.csv", 12)
    # one part: part, upload, uploaded, create, created, polled (in_progress), ended,
    # merged; "uploaded" and the create intent are written back to back, every other step
    # is followed by a remote call
    killed_at = set()
    for step in range(1, 8):
        output = tmp_path / f"out-{step}.parquet"
        with BatchServer(Faults(delay=0.15, polls_running=1)) as server:
            written = _kill_after_journal_lines(data, output, server.base_url, step)
            assert step <= written < 8  # killed after that step, before the run ended
            killed_at.add(written)
            server.faults.delay = 0.0
            summary = run_job(data, output, base_url=server.base_url, **FAST)
            tags = [(c["bpp_part"], c["bpp_attempt"]) for c in server.creates]
            assert len(tags) == len(set(tags)), f"step {step}: a part created twice: {tags}"
            assert len(server.creates) == 1, f"step {step}: {server.creates}"
            assert server.lines_answered == 12, f"step {step}: lines paid {server.lines_answered}"
        assert summary.exit_code == EXIT_OK and summary.ok == 12, f"step {step}"
        frame = pd.read_parquet(output)
        assert (frame["completion"] == "Simulated answer to: " + frame["prompt"]).all()
    assert killed_at >= {1, 2, 4, 5, 6, 7}  # between each step and the next remote call


def test_cancel_keeps_what_the_batch_answered_and_its_other_rows_are_not_sent_again(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv")
    output = tmp_path / "out.parquet"
    with BatchServer(Faults(polls_running=1000)) as server:
        first = run_job(data, output, base_url=server.base_url, wait=False, **FAST)
        assert first.exit_code == EXIT_BATCHES_RUNNING
        cancelled = CliRunner().invoke(main, ["batch", "cancel", str(output)])
        assert cancelled.exit_code == 0, cancelled.output
        (batch_id,) = server.batches
        assert server.cancelled == [batch_id]
        assert f"part 1: batch {batch_id} cancelled" in cancelled.stdout
        # the next run collects the third it answered (8 of 25 prompts, 5 of them asked
        # twice in the input: 13 rows), and sends nothing again
        second = run_job(data, output, base_url=server.base_url, **FAST)
        assert len(server.creates) == 1 and server.lines_answered == 8
        frame = pd.read_parquet(output)
        assert frame["status"].value_counts().to_dict() == {"ok": 13, "pending": 17}
        assert second.exit_code == EXIT_FAILED_ROWS and second.pending == 17
        assert (server.cancelled, len(server.creates)) == ([batch_id], 1)
        again = CliRunner().invoke(main, ["batch", "cancel", str(output)])
        assert "no open batch to cancel" in again.stdout
        # asked, they go in a new batch (which finishes at once)
        server.faults.polls_running = 0
        third = run_job(data, output, base_url=server.base_url, resubmit_cancelled=True, **FAST)
        assert third.exit_code == EXIT_OK and len(server.creates) == 2
        assert server.lines_answered == 25
    assert (pd.read_parquet(output)["status"] == "ok").all()


def test_one_list_call_a_poll_cycle_asks_about_every_running_batch(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv")
    with BatchServer(Faults(polls_running=3)) as server:
        summary = run_job(
            data, tmp_path / "out.parquet", base_url=server.base_url,
            batch_max_requests=10, **FAST,
        )  # fmt: skip
        assert summary.exit_code == EXIT_OK and len(server.batches) == 3
        # 3 batches each polled until it ends: cycles of one list call, no per-batch GET
        assert server.polls["get"] == 0
        assert 1 <= server.polls["list"] <= 5


def test_a_part_whose_worst_case_would_pass_the_budget_is_not_created(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.csv")  # 25 distinct prompts: parts of 10, 10 and 5
    prices = tmp_path / "prices.toml"
    # $1 an output token at batch prices, input free: a line's worst case is max_tokens 20
    # -> $20 (10 lines: $200), its actual cost its answer's 5 words -> $5
    prices.write_text(
        '[models."gpt-3.5-turbo"]\ninput = 0\noutput = 1\nbatch_input = 0\nbatch_output = 1000000\n'
    )
    options = {"batch_max_requests": 10, "max_tokens": 20, "prices": str(prices), **FAST}
    with BatchServer() as server:
        first = run_job(data, tmp_path / "out.parquet", base_url=server.base_url,
                        max_cost=240.0, **options)  # fmt: skip
        # one 10-line part ($200) fits; the other does not, and the 5-line part ($100)
        # does once the first has cost its actual $50
        assert first.exit_code == 4, first.aborted
        assert len(server.creates) == 2 and first.cost_usd <= 240
        assert re.search(r"budget reached: batch part\(s\) \d not created", first.aborted or "")
        frame = pd.read_parquet(tmp_path / "out.parquet")
        assert (frame["status"] == "pending").sum() == first.pending > 0
        # a larger budget creates the part held back, and only that one
        second = run_job(data, tmp_path / "out.parquet", base_url=server.base_url,
                         max_cost=1000.0, **options)  # fmt: skip
        assert second.exit_code == EXIT_OK and len(server.creates) == 3
    assert (pd.read_parquet(tmp_path / "out.parquet")["status"] == "ok").all()
    # without --max-tokens a part's worst case is unbounded: refused before anything is sent
    with pytest.raises(ConfigError, match="needs --max-tokens"):
        run_job(data, tmp_path / "other.parquet", base_url="http://127.0.0.1:9/v1",
                batch=True, max_cost=1.0)  # fmt: skip


def test_a_poll_answered_429_with_retry_after_waits_that_long_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    data = _input(tmp_path / "in.csv", 12)
    # more refusals in a row than a call's retries: the cycles wait, the run does not fail
    faults = Faults(polls_running=1, polls_429=7, retry_after=0.1)
    with BatchServer(faults) as server:
        summary = run_job(data, tmp_path / "out.parquet", base_url=server.base_url, **FAST)
        polls = list(server.poll_times)
    assert summary.exit_code == EXIT_OK and summary.ok == 12  # not a fatal error
    assert [status for _, status in polls[:7]] == [429] * 7
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(polls[:8])]
    assert min(gaps) >= 0.1  # no poll before the Retry-After had passed
