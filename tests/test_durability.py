"""Every answer received reaches the checkpoint and OUTPUT, a row's own failure is that row's
error, and a checkpoint that cannot be written stops the run without losing what came back.

Each test checks every row against its own prompt (the simulator echoes it), so a lost
answer, a repeated request or an answer on the wrong row all fail.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import run_job as run

from pipeline import spill
from pipeline.checkpoint import Checkpoint, part_number
from pipeline.errors import EXIT_STORAGE
from pipeline.keys import compute_keys
from pipeline.progress import Reporter
from pipeline.reader import open_input
from pipeline.records import RowResult
from pipeline.simulator import SimulatorConfig, SimulatorThread

ANSWER = "Simulated answer to: "


def prompts(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"row {i}" for i in range(n)]})


def assert_every_row_has_its_own_answer(output: Path, frame: pd.DataFrame) -> None:
    result = pd.read_parquet(output)
    assert result["status"].tolist() == ["ok"] * len(frame)
    assert result["completion"].tolist() == [ANSWER + p for p in frame["prompt"]]


class BusyLoopAt(Reporter):
    """A reporter that keeps the event loop busy (like a heavy notebook callback or a GC
    pause) for ``seconds`` when the ``at``-th result is recorded."""

    def __init__(self, at: int, seconds: float) -> None:
        super().__init__(progress=False, quiet=True)
        self.at, self.seconds = at, seconds

    def row_done(self, result: RowResult) -> None:
        super().row_done(result)
        if self.done == self.at:
            time.sleep(self.seconds)


def test_a_busy_event_loop_as_the_run_ends_loses_no_answer(tmp_path: Path) -> None:
    # Before: the periodic checkpoint write was cancelled while its thread still wrote,
    # and every row of this run was left pending in OUTPUT (and paid again on rerun).
    frame = prompts(40)
    with SimulatorThread(SimulatorConfig(latency_ms=5)) as sim:
        summary = run(
            frame, tmp_path / "o.parquet", BusyLoopAt(40, 3.0), base_url=sim.base_url,
            concurrency=4,
        )  # fmt: skip
        assert summary.ok == 40 and summary.pending == 0
        assert_every_row_has_its_own_answer(tmp_path / "o.parquet", frame)
        again = run(frame, tmp_path / "o.parquet", base_url=sim.base_url)
        assert again.sent == 0
        assert len(sim.simulator.requests) == 40


def test_checkpoint_writes_many_times_a_second_lose_no_answer(tmp_path: Path) -> None:
    frame = prompts(1500)
    with SimulatorThread(SimulatorConfig(latency_ms=20, latency_jitter_ms=15)) as sim:
        for attempt in range(3):
            out = tmp_path / f"o{attempt}.parquet"
            summary = run(
                frame, out, base_url=sim.base_url, concurrency=64, checkpoint_seconds=0.01,
                checkpoint_rows=37,
            )  # fmt: skip
            assert (summary.ok, summary.pending, summary.exit_code) == (1500, 0, 0)
            assert_every_row_has_its_own_answer(out, frame)
        assert len(sim.simulator.requests) == 3 * 1500


# -- one row's failure is that row's error --------------------------------------------------


class HostileServer:
    """An OpenAI-like server on 127.0.0.1 that answers a prompt containing ``bomb`` with a
    200 body of 400 KB of nested JSON arrays, and every other prompt normally."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = json.loads(buf[:length]), buf[length:]
                self.requests += 1
                prompt = body["messages"][-1]["content"]
                if "bomb" in prompt or body.get("seed") == 8:
                    payload = b"[" * 200_000 + b"]" * 200_000
                else:
                    payload = json.dumps(
                        {
                            "id": "x",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": ANSWER + prompt},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": 1,
                                "completion_tokens": 1,
                                "total_tokens": 2,
                            },
                        }
                    ).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(payload) + payload
                )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.close()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_response_that_breaks_the_parser_fails_its_row_and_the_run_goes_on(
    hostile: HostileServer, tmp_path: Path, concurrency: int
) -> None:
    # Before: the RecursionError killed the worker; the run ended with rows pending, exit 1,
    # no message (or hung at concurrency 1).
    frame = pd.DataFrame({"prompt": ["a", "bomb 1", "b", "c", "bomb 2", *map(str, range(20))]})
    summary = run(
        frame, tmp_path / "o.parquet", base_url=hostile.base_url, concurrency=concurrency,
        max_retries=1,
    )  # fmt: skip
    assert (summary.ok, summary.error, summary.pending, summary.exit_code) == (23, 2, 0, 1)
    result = pd.read_parquet(tmp_path / "o.parquet")
    bombs = result["prompt"].str.startswith("bomb")
    assert result.loc[bombs, "status"].tolist() == ["error", "error"]
    assert result.loc[bombs, "error_message"].str.contains("recursion").all()
    ok = result[~bombs]
    assert (ok["completion"] == ANSWER + ok["prompt"]).all()


def test_one_broken_sample_of_a_row_is_that_samples_error_and_the_others_are_kept(
    hostile: HostileServer, tmp_path: Path
) -> None:
    # Before: the other samples went on unattended, were recorded twice (once as the
    # broken sample's error), and the last row's answers were never saved.
    frame = prompts(4)
    out = tmp_path / "o.parquet"
    summary = run(
        frame, out, base_url=hostile.base_url, n=3, n_mode="seeds", seed=7, concurrency=2,
        max_retries=0, samples="long",
    )  # fmt: skip
    assert (summary.ok, summary.error, summary.pending) == (8, 4, 0)
    result = pd.read_parquet(out)
    assert len(result) == 12
    broken = result[result["sample"] == 1]
    assert broken["error_type"].tolist() == ["RecursionError"] * 4
    kept = result[result["sample"] != 1]
    assert all(
        c.startswith(ANSWER + p) for c, p in zip(kept["completion"], kept["prompt"], strict=True)
    )
    parts = pd.concat(
        pd.read_parquet(p) for p in (tmp_path / "o.parquet.checkpoint" / "parts").glob("*.parquet")
    )
    assert parts["key"].is_unique  # each sample recorded once


def test_half_a_surrogate_pair_in_an_answer_is_kept_with_a_replacement_character(
    tmp_path: Path,
) -> None:
    frame = pd.DataFrame({"prompt": ["a", "b"]})
    with SimulatorThread() as sim:
        run(frame, tmp_path / "o.parquet", base_url=sim.base_url)
    checkpoint = Checkpoint(tmp_path / "x.parquet")
    checkpoint.prepare()
    checkpoint.write_part([RowResult(key=1, status="ok", completion="cut emoji \ud83d here")])
    stored = pd.read_parquet(next(checkpoint.parts_dir.glob("*.parquet")))
    assert stored["completion"].tolist() == ["cut emoji \ufffd here"]


# -- a checkpoint that cannot be written ------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root; skipped elsewhere), unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def rescue_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    place = tmp_path / "tmp"
    place.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(place))
    return place


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_a_full_disk_stops_the_run_and_a_rerun_pays_for_nothing_twice(
    small_disk: Path, rescue_place: Path, tmp_path: Path
) -> None:
    frame = prompts(20_000)
    out = small_disk / "o.parquet"
    with SimulatorThread(SimulatorConfig(latency_ms=1)) as sim:
        summary = run(frame, out, base_url=sim.base_url, concurrency=16, checkpoint_rows=250)
        assert summary.exit_code == EXIT_STORAGE
        assert summary.aborted is not None and "checkpoint write failed" in summary.aborted
        first = len(sim.simulator.requests)
        # it stopped at once: far from all 20,000 rows were sent
        assert first < 10_000
        # nothing received was thrown away: what the full disk could not take was rescued
        assert list((rescue_place / "pipeline-rescue-0").rglob("rescued-*.parquet"))
        remount(small_disk, "size=64m")
        again = run(frame, out, base_url=sim.base_url, concurrency=16)
        assert again.exit_code == 0
        assert len(sim.simulator.requests) == 20_000  # each row sent exactly once
        assert_every_row_has_its_own_answer(out, frame)
    assert not list((rescue_place / "pipeline-rescue-0").rglob("rescued-*.parquet"))


def test_a_key_pass_on_a_full_disk_is_made_in_memory_with_the_same_keys(
    small_disk: Path, rescue_place: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill, "BUCKET_KEYS", 1 << 12)  # buckets in files, were there room
    source = tmp_path / "in.csv"
    prompts(40_000).to_csv(source, index=False)  # 320 KB of hashes: more than the disk
    expected = compute_keys(open_input(source), id_column=None, content_columns=["prompt"])
    fill_up(small_disk)
    subprocess.run(["chattr", "+i", str(rescue_place)], capture_output=True)  # $TMPDIR too

    try:
        got = compute_keys(
            open_input(source),
            id_column=None,
            content_columns=["prompt"],
            stage=small_disk / ".o.parquet.input-keys.1.tmp",
            scratch=small_disk,
        )
    finally:
        subprocess.run(["chattr", "-i", str(rescue_place)], capture_output=True)

    assert got.keys[:].tolist() == expected.keys[:].tolist()
    assert got.duplicates.tolist() == expected.duplicates.tolist()
    assert got.key_pass is not None and got.key_pass.path is None  # not kept: nowhere to
    assert not list(small_disk.glob("*.tmp"))


def fill_up(disk: Path) -> None:
    with contextlib.suppress(OSError), (disk / "filler").open("wb") as fh:
        while True:
            fh.write(b"x" * 4096)
            fh.flush()


class LockDirectoryAt(Reporter):
    """Makes ``directory`` unwritable (``chattr +i``: root ignores ``chmod a-w``) when the
    ``at``-th result is recorded, and keeps the error lines the run reports."""

    def __init__(self, directory: Path, at: int) -> None:
        super().__init__(progress=False, quiet=True)
        self.directory, self.at = directory, at
        self.messages: list[str] = []

    def row_done(self, result: RowResult) -> None:
        super().row_done(result)
        if self.done == self.at:
            subprocess.run(["chattr", "+i", str(self.directory)], check=True)

    def error(self, message: str, **fields: Any) -> None:
        self.messages.append(message)


def test_a_checkpoint_directory_turned_read_only_mid_run_keeps_every_answer(
    tmp_path: Path, rescue_place: Path
) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    frame = prompts(6000)
    out = tmp_path / "o.parquet"
    parts = tmp_path / "o.parquet.checkpoint" / "parts"
    reporter = LockDirectoryAt(parts, 2500)
    with SimulatorThread(SimulatorConfig(latency_ms=1)) as sim:
        try:
            summary = run(
                frame, out, reporter, base_url=sim.base_url, concurrency=16, checkpoint_rows=200
            )
        finally:
            subprocess.run(["chattr", "-i", str(parts)], check=False)
        assert summary.exit_code == EXIT_STORAGE
        assert len(sim.simulator.requests) < 6000
        assert any("Operation not permitted" in m for m in reporter.messages)
        assert any(str(rescue_place) in m for m in reporter.messages)
        again = run(frame, out, base_url=sim.base_url, concurrency=16)
        assert again.exit_code == 0
        assert len(sim.simulator.requests) == 6000  # each row sent exactly once
        assert_every_row_has_its_own_answer(out, frame)


def test_rescued_answers_of_another_job_or_older_than_the_checkpoint_are_never_used(
    tmp_path: Path, rescue_place: Path
) -> None:
    out = tmp_path / "o.parquet"
    checkpoint = Checkpoint(out)
    checkpoint.prepare()
    checkpoint.write_manifest({"fingerprint": "job-1", "created_at": 1.0})
    checkpoint.rescue_part([RowResult(key=1, status="ok", completion="job 1's answer")])
    # the checkpoint was deleted and the job started again with other settings
    shutil.rmtree(checkpoint.dir)
    again = Checkpoint(out)
    again.prepare()  # no manifest yet: nothing proves whose they are
    assert again.part_paths() == []
    assert list(again.dir.glob("rescued-not-used-*/rescued-*.parquet"))
    # a rescue from before parts that were written since is older than they are
    again.write_manifest({"fingerprint": "job-2", "created_at": 2.0})
    again.rescue_part([RowResult(key=1, status="error", error_type="ServerError")])
    again.write_part([RowResult(key=1, status="ok", completion="newer answer")])
    third = Checkpoint(out)
    notes = third.prepare()
    assert [part_number(p) for p in third.part_paths()] == [1]
    assert "older than what is here" in notes[0]


def test_restart_takes_rescued_answers_away_with_the_old_checkpoint(
    tmp_path: Path, rescue_place: Path
) -> None:
    checkpoint = Checkpoint(tmp_path / "o.parquet")
    checkpoint.prepare()
    checkpoint.rescue_part([RowResult(key=1, status="ok", completion="old settings")])
    backup = checkpoint.set_aside()
    assert backup is not None and list((backup / "rescued").glob("rescued-*.parquet"))
    fresh = Checkpoint(tmp_path / "o.parquet")
    fresh.prepare()
    assert fresh.part_paths() == []
    shutil.rmtree(backup)
