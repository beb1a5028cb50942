"""``pipeline batch cancel`` when it is killed or a create is in flight: the cancel is
journaled before the provider is asked (a killed cancel still keeps the rows from being sent
again, and the next cancel asks again), and a part whose create went out without its id
being saved is found by its tag and cancelled, not forgotten while its batch runs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from batch_server import BatchServer, Faults
from conftest import run_job

from pipeline.batch.cancelling import cancel_batches

FAST = {"batch": True, "poll_interval": 0.01}


def _input(path: Path, count: int = 12) -> Path:
    pd.DataFrame({"prompt": [f"item {i}" for i in range(count)]}).to_csv(path, index=False)
    return path


def _child(code: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def _kill_when(child: subprocess.Popen[bytes], ready: object) -> None:
    deadline = time.monotonic() + 30
    try:
        while not ready() and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)


def test_a_cancel_killed_before_the_provider_answered_is_asked_again_and_holds_the_rows(
    tmp_path: Path,
) -> None:
    data, output = _input(tmp_path / "in.csv"), tmp_path / "out.parquet"
    journal = output.with_name(output.name + ".checkpoint") / "batch" / "batches.jsonl"
    with BatchServer(Faults(polls_running=10_000)) as server:
        run_job(data, output, base_url=server.base_url, wait=False, **FAST)
        server.faults.delay = 0.5  # the cancel request is slow: the child dies waiting
        child = _child(
            "import asyncio; from pipeline.batch.cancelling import cancel_batches; "
            f"asyncio.run(cancel_batches({str(output)!r}))"
        )
        _kill_when(child, lambda: '"cancelled"' in journal.read_text())
        server.faults.delay = 0.0  # the killed request lands before or after the next one

        (again,) = asyncio.run(cancel_batches(output))
        assert again.outcome == "cancelled"  # asked again, or found already cancelled
        (batch_id,) = server.batches
        assert server.cancelled == [batch_id]
        collected = run_job(data, output, base_url=server.base_url, **FAST)
        assert len(server.creates) == 1  # the rows it did not answer are not sent again
    assert (collected.ok, collected.pending) == (4, 8)


def test_a_part_whose_create_is_in_flight_is_found_by_its_tag_and_cancelled(
    tmp_path: Path,
) -> None:
    data, output = _input(tmp_path / "in.csv"), tmp_path / "out.parquet"
    held = threading.Event()
    with BatchServer(Faults(hold_create=held, polls_running=10_000)) as server:
        child = _child(
            "from pipeline import run_batch; from pipeline.config import RunConfig; "
            f"run_batch({str(data)!r}, {str(output)!r}, RunConfig(progress=False, "
            f"base_url={server.base_url!r}, batch=True, poll_interval=0.01))"
        )
        _kill_when(child, lambda: bool(server.creates))  # created; its id never saved
        held.set()
        server.faults.hold_create = None

        (done,) = asyncio.run(cancel_batches(output))
        (batch_id,) = server.batches
        assert (done.outcome, done.batch_id) == ("cancelled", batch_id)
        assert server.cancelled == [batch_id]
        collected = run_job(data, output, base_url=server.base_url, **FAST)
        assert len(server.creates) == 1
    assert (collected.ok, collected.pending) == (4, 8)
