"""The checkpoint directory beside OUTPUT: crash-safe parts, latest result wins, manifest, lock.

Unit tests of ``pipeline.checkpoint``; no HTTP. The end-to-end behaviour (resume after
SIGKILL, fingerprint refusal, ...) is in ``test_resume.py``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import checkpoint as checkpoint_module
from pipeline import result_index as result_index_module
from pipeline.checkpoint import Checkpoint, checkpoint_dir, part_number
from pipeline.errors import FingerprintMismatch, LockHeld, OutputError
from pipeline.records import STATUS_CODES, RowResult, Usage
from pipeline.simulator import SimulatorThread

BIG_KEY = 2**64 - 5  # keys are uint64: the top bit must survive a round trip


def ok(key: int, text: str = "fine", tokens: tuple[int, int] = (3, 4)) -> RowResult:
    return RowResult(
        key=key,
        status="ok",
        completion=text,
        finish_reason="stop",
        usage=Usage(prompt_tokens=tokens[0], completion_tokens=tokens[1], total_tokens=sum(tokens)),
        response_model="gpt-3.5-turbo",
        response_id=f"chatcmpl-{key}",
        http_status=200,
        attempts=1,
        latency_ms=12.5,
    )


def error(key: int, message: str = "boom") -> RowResult:
    return RowResult(
        key=key,
        status="error",
        error_type="ServerError",
        error_message=message,
        http_status=503,
        attempts=1,
    )


def skipped(key: int) -> RowResult:
    return RowResult(key=key, status="skipped", error_message="column 'prompt' is empty")


@pytest.fixture
def ckpt(tmp_path: Path) -> Checkpoint:
    checkpoint = Checkpoint(tmp_path / "out.parquet")
    checkpoint.prepare()
    return checkpoint


def result_of(ckpt: Checkpoint, key: int) -> dict[str, Any]:
    """The result the index picks for ``key``, read back from its part."""
    index = ckpt.load_index()
    pos = int(index.lookup(np.array([key], dtype=np.uint64))[0])
    assert pos >= 0, f"key {key} has no result"
    part, row = index.locate(np.array([pos]))
    table = ckpt.read_part(int(part[0]))
    return table.slice(int(row[0]), 1).to_pylist()[0]


# -- where it lives ------------------------------------------------------------------------


def test_checkpoint_directory_sits_beside_output_with_a_checkpoint_suffix(tmp_path: Path) -> None:
    output = tmp_path / "results.parquet"
    assert checkpoint_dir(output) == tmp_path / "results.parquet.checkpoint"
    checkpoint = Checkpoint(output)
    checkpoint.prepare()
    part = checkpoint.write_part([ok(1)])
    assert part.parent.parent == tmp_path / "results.parquet.checkpoint"
    assert not output.exists(), "writing a part must not touch OUTPUT itself"


# -- parts and the index -------------------------------------------------------------------


def test_a_written_part_reads_back_with_every_result_field(ckpt: Checkpoint) -> None:
    ckpt.write_part([ok(BIG_KEY, "hello", (7, 9)), error(2, "server said no"), skipped(3)])

    got = result_of(ckpt, BIG_KEY)
    assert got["key"] == BIG_KEY
    assert got["status"] == "ok"
    assert got["completion"] == "hello"
    assert got["finish_reason"] == "stop"
    assert (got["prompt_tokens"], got["completion_tokens"], got["total_tokens"]) == (7, 9, 16)
    assert got["response_id"] == f"chatcmpl-{BIG_KEY}"
    assert got["latency_ms"] == 12.5

    failed = result_of(ckpt, 2)
    assert failed["status"] == "error"
    assert failed["error_type"] == "ServerError"
    assert failed["error_message"] == "server said no"
    assert failed["http_status"] == 503
    assert failed["completion"] is None

    assert result_of(ckpt, 3)["status"] == "skipped"


def test_index_holds_every_key_once_with_its_status_and_tokens(ckpt: Checkpoint) -> None:
    ckpt.write_part([ok(10, tokens=(1, 2)), error(20)])
    ckpt.write_part([skipped(30), ok(40, tokens=(5, 6))])

    index = ckpt.load_index()

    assert sorted(index.read_keys().tolist()) == [10, 20, 30, 40]
    assert index.counts() == {"ok": 2, "error": 1, "skipped": 1, "invalid": 0}
    assert int(index.read_column("prompt_tokens").sum()) == 6
    assert int(index.read_column("completion_tokens").sum()) == 8


def test_the_latest_part_wins_when_a_key_has_several_results(ckpt: Checkpoint) -> None:
    # the --retry-failed case: an error first, a success in a later part
    ckpt.write_part([error(1, "first try"), ok(2, "two")])
    ckpt.write_part([ok(3, "three")])
    ckpt.write_part([ok(1, "second try")])

    index = ckpt.load_index()

    assert len(index.read_keys()) == 3
    assert index.counts() == {"ok": 3, "error": 0, "skipped": 0, "invalid": 0}
    assert result_of(ckpt, 1)["completion"] == "second try"
    assert result_of(ckpt, 2)["completion"] == "two"


def test_a_later_error_replaces_an_earlier_success_too(ckpt: Checkpoint) -> None:
    # "latest wins" is about order, not about which status is better
    ckpt.write_part([ok(1)])
    ckpt.write_part([error(1, "newer")])
    assert result_of(ckpt, 1)["error_message"] == "newer"
    assert ckpt.load_index().counts()["error"] == 1


def test_within_one_part_the_last_row_of_a_key_wins(ckpt: Checkpoint) -> None:
    ckpt.write_part([error(5, "old"), ok(6), ok(5, "new")])
    assert result_of(ckpt, 5)["completion"] == "new"
    assert len(ckpt.load_index().read_keys()) == 2


def test_lookup_gives_minus_one_for_keys_without_a_result(ckpt: Checkpoint) -> None:
    ckpt.write_part([ok(100), ok(BIG_KEY)])
    index = ckpt.load_index()

    pos = index.lookup(np.array([BIG_KEY, 7, 100, 2**63], dtype=np.uint64))

    assert pos[1] == -1 and pos[3] == -1
    # a position is the result's place among all results, part by part, row by row
    assert pos[0] == 1 and pos[2] == 0
    assert result_of(ckpt, BIG_KEY)["key"] == BIG_KEY


def test_places_give_each_keys_part_and_row_in_the_order_asked_and_minus_one_for_none(
    ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(result_index_module, "LOOKUP_CHUNK", 2)  # several chunks of 5 keys
    ckpt.write_part([ok(10), ok(20), ok(30)])
    ckpt.write_part([ok(20, "newer"), ok(40)])
    index = ckpt.load_index()

    places = index.places(
        [np.array([40, 7, 10, 20, 30], dtype=np.uint64), np.array([99], dtype=np.uint64)]
    )

    part, row = places.locate(0, slice(None))
    assert part.tolist() == [2, -1, 1, 2, 1]
    assert row[[0, 2, 3, 4]].tolist() == [1, 0, 0, 2]
    assert places.missing(0).tolist() == [False, True, False, False, False]
    assert places.locate(1, slice(None))[0].tolist() == [-1]
    assert places.missing(1).tolist() == [True]
    assert places.at[0].itemsize == 4  # 4 bytes a key


def test_an_empty_checkpoint_has_an_empty_index(ckpt: Checkpoint) -> None:
    index = ckpt.load_index()
    assert len(index.read_keys()) == 0
    assert index.counts() == {"ok": 0, "error": 0, "skipped": 0, "invalid": 0}
    assert index.lookup(np.array([1, 2], dtype=np.uint64)).tolist() == [-1, -1]


def test_counts_can_be_limited_to_the_rows_of_the_current_input(ckpt: Checkpoint) -> None:
    ckpt.write_part([ok(1), error(2), ok(3)])
    index = ckpt.load_index()
    pos = index.lookup(np.array([1, 2], dtype=np.uint64))  # key 3 left the input
    assert index.counts(pos) == {"ok": 1, "error": 1, "skipped": 0, "invalid": 0}
    assert STATUS_CODES.keys() == index.counts().keys()


# -- crash safety ----------------------------------------------------------------------------


def test_leftover_temp_files_of_a_crashed_run_are_ignored_and_cleaned(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    first = Checkpoint(output)
    first.prepare()
    first.write_part([ok(1, "kept")])
    first.write_part([ok(2, "kept too")])
    # a run killed while writing part 3: only its temp file exists, half written
    leftover = first.parts_dir / ".part-000003.parquet.99999.tmp"
    leftover.write_bytes(b"PAR1 half a parquet file")

    assert sorted(first.load_index().read_keys().tolist()) == [1, 2]

    second = Checkpoint(output)  # the rerun
    second.prepare()
    assert not leftover.exists()
    new_part = second.write_part([ok(3, "after the crash")])
    assert part_number(new_part) == 3
    assert sorted(second.load_index().read_keys().tolist()) == [1, 2, 3]
    assert result_of(second, 1)["completion"] == "kept"


def test_a_rerun_numbers_its_parts_after_the_existing_ones(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    first = Checkpoint(output)
    first.prepare()
    for key in range(3):
        first.write_part([error(key)])

    second = Checkpoint(output)
    second.prepare()
    second.write_part([ok(0, "retried")])

    assert [part_number(p) for p in second.part_paths()][-1] == 4
    assert result_of(second, 0)["completion"] == "retried"


def test_a_part_is_fsynced_under_a_temp_name_before_it_is_renamed_into_place(
    ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)

    path = ckpt.write_part([ok(1)])

    renames = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(renames) == 1, events
    src, dst = events[renames[0]][1].split(" -> ")
    assert Path(dst) == path and Path(src) != path and Path(src).parent == path.parent
    assert ("fsync", str(Path(src).resolve())) in events[: renames[0]], "data fsynced first"
    assert ("fsync", str(path.parent.resolve())) in events[renames[0] :], "then the directory"


def test_a_failed_part_write_leaves_no_part_behind(
    ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt.write_part([ok(1)])

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_part([ok(2)])
    monkeypatch.undo()

    assert [part_number(p) for p in ckpt.part_paths()] == [1]
    assert ckpt.load_index().read_keys().tolist() == [1]


# -- manifest --------------------------------------------------------------------------------


def test_manifest_round_trips_and_gets_a_format_version_and_timestamp(
    ckpt: Checkpoint,
) -> None:
    manifest = {
        "fingerprint": "0123456789abcdef",
        "fingerprint_parts": {"model": "m", "body_parameters": {"temperature": 0.5}},
        "rows_total": 12,
        "input": "in.csv",
    }
    ckpt.write_manifest(manifest)

    back = ckpt.read_manifest()

    assert {k: back[k] for k in manifest} == manifest
    assert isinstance(back["format_version"], int)
    assert back["updated_at"] > 0
    assert ckpt.exists()
    # written whole, under its own name only
    assert json.loads(ckpt.manifest_path.read_text()) == back
    assert not [p for p in ckpt.dir.iterdir() if p.name.endswith(".tmp")]


def test_a_missing_manifest_reads_as_empty(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "out.parquet")
    assert checkpoint.read_manifest() == {}
    assert not checkpoint.exists()


def test_a_corrupt_manifest_is_an_error_that_points_to_restart(ckpt: Checkpoint) -> None:
    ckpt.manifest_path.write_text('{"fingerprint": "abc", ')
    with pytest.raises(OutputError, match="--restart"):
        ckpt.read_manifest()


# -- fingerprint -----------------------------------------------------------------------------

PARTS = {
    "base_url": "http://127.0.0.1:1/v1",
    "model": "gpt-3.5-turbo",
    "body_parameters": {"temperature": 0.2},
    "prompt_source": {"kind": "column", "value": "prompt"},
    "system_prompt": None,
}


def test_same_fingerprint_resumes_and_a_new_checkpoint_accepts_any(ckpt: Checkpoint) -> None:
    ckpt.check_fingerprint(PARTS)  # no manifest yet
    ckpt.write_manifest({"fingerprint_parts": PARTS})
    ckpt.check_fingerprint(dict(PARTS))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "gpt-4o"),
        ("base_url", "http://127.0.0.1:2/v1"),
        ("body_parameters", {"temperature": 0.9}),
        ("prompt_source", {"kind": "template", "value": "Q: {prompt}"}),
        ("system_prompt", "Be terse."),
    ],
)
def test_another_fingerprint_is_refused_naming_the_field_and_restart(
    ckpt: Checkpoint, field: str, value: Any
) -> None:
    ckpt.write_manifest({"fingerprint_parts": PARTS})
    with pytest.raises(FingerprintMismatch) as caught:
        ckpt.check_fingerprint({**PARTS, field: value})
    message = str(caught.value)
    assert field in message
    assert repr(value) in message and repr(PARTS[field]) in message
    assert "--restart" in message
    other_fields = [name for name in PARTS if name != field]
    assert not any(f"  {name}:" in message for name in other_fields), message


def test_set_aside_moves_the_checkpoint_to_a_new_backup_name_each_time(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    backups = []
    for round_ in range(2):
        checkpoint = Checkpoint(output)
        checkpoint.prepare()
        checkpoint.write_manifest({"round": round_})
        checkpoint.write_part([ok(round_)])
        backups.append(checkpoint.set_aside())
        assert not checkpoint.dir.exists()

    assert backups[0] != backups[1]
    for round_, backup in enumerate(backups):
        assert backup is not None and backup.parent == tmp_path
        assert backup.name.startswith("out.parquet.checkpoint")
        assert json.loads((backup / "manifest.json").read_text())["round"] == round_
        assert len(list((backup / "parts").glob("part-*.parquet"))) == 1


# -- lock ------------------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_holder_naming_pid_and_host(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    first, second = Checkpoint(output), Checkpoint(output)
    assert first.acquire_lock() is None
    try:
        with pytest.raises(LockHeld) as caught:
            second.acquire_lock()
        assert f"pid {os.getpid()}" in str(caught.value)
        assert socket.gethostname() in str(caught.value)
        holder = Checkpoint.lock_holder(output)
        assert holder is not None and f"pid {os.getpid()}" in holder
    finally:
        first.release_lock()

    assert Checkpoint.lock_holder(output) is None
    assert second.acquire_lock() is None, "a cleanly released lock is no takeover"
    second.release_lock()


def test_a_lock_file_left_by_a_dead_run_is_taken_over_with_a_note(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    checkpoint = Checkpoint(output)
    checkpoint.dir.mkdir()
    # what a SIGKILLed run leaves: its line in the lock file, but no flock (the kernel drops it)
    (checkpoint.dir / "lock").write_text("pid 4242 on host elsewhere since yesterday\n")

    assert Checkpoint.lock_holder(output) is None
    note = checkpoint.acquire_lock()
    try:
        assert note is not None and "pid 4242" in note
        holder = Checkpoint.lock_holder(output)
        assert holder is not None and f"pid {os.getpid()}" in holder
    finally:
        checkpoint.release_lock()


def test_a_run_writes_parts_of_checkpoint_rows_not_one_per_result(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    frame = pd.DataFrame({"prompt": [f"row {i}" for i in range(3000)]})
    pipeline.run(
        frame,
        out,
        base_url=simulator.base_url,
        progress=False,
        concurrency=64,
        checkpoint_rows=500,
        checkpoint_seconds=600,
    )
    parts = sorted((tmp_path / "o.parquet.checkpoint" / "parts").glob("part-*.parquet"))
    sizes = [pq.read_metadata(p).num_rows for p in parts]
    assert sum(sizes) == 3000
    # full parts while the run goes, one last partial part at the end
    assert len(parts) <= 3000 // 500 + 1
    assert min(sizes[:-1]) >= 500


def test_a_checkpoint_from_another_format_version_is_refused_with_the_way_out(
    tmp_path: Path,
) -> None:
    checkpoint = Checkpoint(tmp_path / "out.parquet")
    checkpoint.dir.mkdir()
    checkpoint.manifest_path.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(OutputError, match="--restart"):
        checkpoint.check_fingerprint({"model": "m"})
