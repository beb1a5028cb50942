"""Ctrl-C in a notebook: a real SIGINT to a real process whose event loop is running.

The child process runs ``pipeline.run`` (or ``await pipeline.arun``) from a coroutine, the way
a Jupyter cell does, against a slow simulator in this process; the test sends SIGINT once
requests are flowing. The run must stop (rows left unsent), keep what is done, release
OUTPUT's lock and raise, and a rerun in this process must resume without ``LockHeld``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from pipeline.checkpoint import Checkpoint
from pipeline.runner import Seams
from pipeline.simulator import SimulatorConfig, SimulatorThread

ROWS = 400  # 4 in flight x 300 ms each: 30 s if the interrupt were ignored

CHILD = """
import asyncio, json, sys, threading
import pandas as pd
import pipeline
from pipeline.checkpoint import Checkpoint

mode, base_url, output = sys.argv[1:4]
frame = pd.DataFrame({"prompt": [f"p{i}" for i in range(%(rows)d)]})
options = dict(base_url=base_url, concurrency=4, quiet=True)

async def cell():
    if mode == "arun":
        return await pipeline.arun(frame, output, **options)
    return pipeline.run(frame, output, **options)

outcome = {}
try:
    if mode == "script":  # no event loop at all
        pipeline.run(frame, output, **options)
    elif mode == "jupyter":  # a loop like ipykernel's: SIGINT keeps Python's default handler
        asyncio.new_event_loop().run_until_complete(cell())
    else:
        asyncio.run(cell())
    outcome["raised"] = None
except BaseException as exc:
    outcome["raised"] = type(exc).__name__
    outcome["message"] = str(exc)
outcome["run_thread_alive"] = any(t.name == "pipeline-run" for t in threading.enumerate())
outcome["lock_holder"] = Checkpoint.lock_holder(__import__("pathlib").Path(output))
print(json.dumps(outcome), flush=True)
"""


@pytest.mark.parametrize("mode", ["script", "run", "jupyter", "arun"])
def test_ctrl_c_in_a_running_event_loop_stops_keeps_rows_and_unlocks(
    mode: str, make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=300)
    output = tmp_path / "o.parquet"
    script = tmp_path / "cell.py"
    script.write_text(CHILD % {"rows": ROWS})
    child = subprocess.Popen(
        [sys.executable, str(script), mode, sim.base_url, str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for _ in range(600):  # requests are flowing: at most 60 s of waiting
            if len(sim.simulator.requests) >= 8 or child.poll() is not None:
                break
            time.sleep(0.1)
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=25)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["raised"] == "KeyboardInterrupt", err
    assert outcome["run_thread_alive"] is False
    assert outcome["lock_holder"] is None
    assert "interrupted by SIGINT" in outcome["message"]
    assert "are done and kept in" in outcome["message"]

    # the same call again, now with a fast server: no LockHeld, the kept rows are not resent
    sim.simulator.config = SimulatorConfig()
    frame = pd.DataFrame({"prompt": [f"p{i}" for i in range(ROWS)]})
    sent_before = len(sim.simulator.requests)
    result = pipeline.run(frame, output, base_url=sim.base_url, concurrency=4, quiet=True)
    summary = result.attrs["summary"]
    assert 0 < summary["resumed"] < ROWS  # stopped early, and what was done was kept
    assert summary["sent"] == ROWS - summary["resumed"]
    assert len(sim.simulator.requests) - sent_before == ROWS - summary["resumed"]
    assert (result["status"] == "ok").all()


def test_a_keyboard_interrupt_while_waiting_for_the_run_thread_is_not_lost(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    # Without signal handling (Seams.handle_signals=False) Python's own SIGINT handler raises
    # KeyboardInterrupt in the waiting caller: the run it cannot stop finishes, unlocks, and
    # the interrupt is raised then, naming the complete OUTPUT.
    sim = make_simulator(latency_ms=100)
    output = tmp_path / "o.parquet"
    frame = pd.DataFrame({"prompt": [f"p{i}" for i in range(20)]})
    config = pipeline.build_config(None, {"base_url": sim.base_url, "concurrency": 2})

    def interrupt_once_sending() -> None:
        for _ in range(600):
            if sim.simulator.requests:
                break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    async def cell() -> None:
        pipeline.run_batch(frame, output, config, Seams(handle_signals=False))

    sender = threading.Thread(target=interrupt_once_sending)
    sender.start()
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt, match="is complete"):
            loop.run_until_complete(cell())
    finally:
        loop.close()
        sender.join()
    assert not any(t.name == "pipeline-run" for t in threading.enumerate())
    assert Checkpoint.lock_holder(output) is None
    assert (pd.read_parquet(output)["status"] == "ok").all()


def test_cancelling_an_arun_task_stops_the_run_and_keeps_its_rows(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=300)
    output = tmp_path / "o.parquet"
    frame = pd.DataFrame({"prompt": [f"p{i}" for i in range(40)]})  # 6 s at 2 in flight
    options = {"base_url": sim.base_url, "concurrency": 2, "quiet": True}

    async def cell() -> None:
        run = asyncio.ensure_future(pipeline.arun(frame, output, **options))
        for _ in range(600):
            if len(sim.simulator.requests) >= 4:
                break
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError, match="arun was cancelled"):
            await run

    asyncio.run(cell())
    assert not any(t.name == "pipeline-run" for t in threading.enumerate())
    assert Checkpoint.lock_holder(output) is None
    sim.simulator.config = SimulatorConfig()
    summary = pipeline.run(frame, output, **options).attrs["summary"]
    assert 0 < summary["resumed"] < 40 and summary["sent"] == 40 - summary["resumed"]
