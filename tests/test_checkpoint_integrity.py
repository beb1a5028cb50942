"""A checkpoint part that is damaged, foreign or unprovable is named, set aside and its rows
sent again; never used. Every run's rows are checked against their own prompts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_job as run

from pipeline import planning
from pipeline.checkpoint import Checkpoint, part_number
from pipeline.errors import FingerprintMismatch, OutputError
from pipeline.progress import Reporter
from pipeline.records import RowResult
from pipeline.simulator import SimulatorThread

ANSWER = "Simulated answer to: "


class Notes(Reporter):
    def __init__(self) -> None:
        super().__init__(progress=False, quiet=True)
        self.notes: list[str] = []

    def note(self, text: str, **fields: Any) -> None:
        self.notes.append(text)


def prompts(n: int, word: str = "row") -> pd.DataFrame:
    return pd.DataFrame(
        {"id": [f"id{i}" for i in range(n)], "prompt": [f"{word} {i}" for i in range(n)]}
    )


def assert_every_row_has_its_own_answer(
    output: Path, frame: pd.DataFrame, system: str = ""
) -> None:
    result = pd.read_parquet(output)
    assert result["status"].tolist() == ["ok"] * len(frame)
    assert result["completion"].tolist() == [ANSWER + p for p in frame["prompt"]]


def parts_of(output: Path) -> list[Path]:
    return Checkpoint(output).part_paths()


def test_every_single_byte_flip_in_a_part_is_caught(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "o.parquet")
    checkpoint.identity = {"fingerprint": "f", "job": "j"}
    checkpoint.prepare()
    checkpoint.write_manifest({"fingerprint": "f", "job_id": "j"})
    results = [RowResult(key=k, status="ok", completion=f"answer {k}") for k in range(40)]
    part = checkpoint.write_part(results)
    original = part.read_bytes()
    for position in range(len(original)):
        damaged = bytearray(original)
        damaged[position] ^= 0x10
        part.write_bytes(bytes(damaged))
        again = Checkpoint(tmp_path / "o.parquet")
        notes = again.prepare("f")
        assert again.part_paths() == [], position  # set aside, never read
        assert "set aside 1 checkpoint part" in notes[0]
        shutil.move(str(again.dir / "quarantine" / part.name), str(part))
    part.write_bytes(original)


def test_a_damaged_part_of_a_real_run_is_set_aside_and_only_its_rows_are_sent_again(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, out = prompts(3000), tmp_path / "o.parquet"
    run(frame, out, base_url=simulator.base_url, checkpoint_rows=500, concurrency=16)
    parts = parts_of(out)
    middle = parts[len(parts) // 2]
    rows_in_middle = len(pd.read_parquet(middle))
    data = bytearray(middle.read_bytes())
    data[len(data) // 3] ^= 0x01
    middle.write_bytes(bytes(data))
    before = len(simulator.simulator.requests)
    reporter = Notes()
    summary = run(frame, out, reporter, base_url=simulator.base_url)
    assert summary.exit_code == 0
    assert len(simulator.simulator.requests) - before == rows_in_middle
    assert any(middle.name in n and "set aside" in n for n in reporter.notes)
    assert_every_row_has_its_own_answer(out, frame)


def test_a_part_copied_from_another_job_is_never_used(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # same ids, other prompts: with --id-column the keys match, the answers must not
    ours, theirs = prompts(400), prompts(400, "other")
    run(ours, tmp_path / "a.parquet", base_url=simulator.base_url, id_column="id")
    run(
        theirs,
        tmp_path / "b.parquet",
        base_url=simulator.base_url,
        id_column="id",
        system="Be brief",
    )
    foreign = parts_of(tmp_path / "b.parquet")[0]
    checksum = foreign.name.split("-")[2]  # keep its valid checksum: only its job differs
    shutil.copy(foreign, Checkpoint(tmp_path / "a.parquet").parts_dir / f"part-000099-{checksum}")
    reporter = Notes()
    summary = run(
        ours, tmp_path / "a.parquet", reporter, base_url=simulator.base_url, id_column="id"
    )
    assert summary.exit_code == 0
    assert any("another job" in n for n in reporter.notes)
    assert_every_row_has_its_own_answer(tmp_path / "a.parquet", ours)


def test_truncated_empty_and_stray_files_are_named_and_never_crash_a_run(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, out = prompts(600), tmp_path / "o.parquet"
    run(frame, out, base_url=simulator.base_url, checkpoint_rows=200)
    first = parts_of(out)[0]
    first.write_bytes(first.read_bytes()[:-40])  # truncated
    parts_dir = first.parent
    (parts_dir / "part-abc.parquet").write_bytes(b"not ours")
    (parts_dir / "part-000099.parquet").write_bytes(b"")
    reporter = Notes()
    summary = run(frame, out, reporter, base_url=simulator.base_url)
    assert summary.exit_code == 0
    assert any("part-abc.parquet" in n for n in reporter.notes)
    assert any("part-000099.parquet: empty file" in n for n in reporter.notes)
    assert any(first.name in n for n in reporter.notes)
    assert_every_row_has_its_own_answer(out, frame)


def test_without_manifest_the_parts_prove_the_settings(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, out = prompts(300), tmp_path / "o.parquet"
    run(frame, out, base_url=simulator.base_url)
    (Checkpoint(out).manifest_path).unlink()
    with pytest.raises(FingerprintMismatch, match=r"manifest\.json is missing"):
        run(frame, out, base_url=simulator.base_url, system="Answer in French", overwrite=True)
    before = len(simulator.simulator.requests)
    same = run(frame, out, base_url=simulator.base_url, overwrite=True)
    assert same.exit_code == 0 and len(simulator.simulator.requests) == before  # nothing resent
    assert_every_row_has_its_own_answer(out, frame)


def test_without_manifest_parts_of_the_older_format_refuse_the_run(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "o.parquet")
    checkpoint.prepare()
    checkpoint.write_part([RowResult(key=1, status="ok", completion="old")])  # no identity
    with pytest.raises(OutputError, match="cannot prove the settings"):
        Checkpoint(tmp_path / "o.parquet").prepare("fingerprint-of-this-run")


def test_temp_files_of_killed_runs_are_cleaned_at_the_next_start(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, out = prompts(50), tmp_path / "o.parquet"
    run(frame, out, base_url=simulator.base_url)
    leftovers = [tmp_path / f".o.parquet.{pid}.tmp" for pid in (111111, 222222)] + [
        Checkpoint(out).dir / ".keys.333333.tmp"
    ]
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    run(frame, out, base_url=simulator.base_url)
    assert not any(path.exists() for path in leftovers)


@pytest.mark.parametrize("at_once", [1 << 20, 4], ids=["all keys at once", "4 at a time"])
def test_rows_that_left_the_input_are_counted_once(
    simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_once: int
) -> None:
    monkeypatch.setattr(planning, "DIGEST_KEYS", at_once)
    out = tmp_path / "o.parquet"
    run(prompts(20), out, base_url=simulator.base_url)
    assert run(prompts(17), out, base_url=simulator.base_url).removed == 3
    assert run(prompts(12), out, base_url=simulator.base_url).removed == 5
    assert run(prompts(12), out, base_url=simulator.base_url).removed == 0
    edited = prompts(12)
    edited.loc[5, "prompt"] = "an edited prompt"
    assert run(edited, out, base_url=simulator.base_url).removed == 1  # its old prompt
    assert run(edited, out, base_url=simulator.base_url).removed == 0


def test_with_an_id_column_an_edited_prompt_is_sent_again(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, out = prompts(800), tmp_path / "o.parquet"
    run(frame, out, base_url=simulator.base_url, id_column="id")
    edited = frame.copy()
    edited.loc[[5, 400, 799], "prompt"] = ["edited 5", "edited 400", "edited 799"]
    before = len(simulator.simulator.requests)
    summary = run(edited, out, base_url=simulator.base_url, id_column="id")
    assert len(simulator.simulator.requests) - before == 3
    assert summary.exit_code == 0
    assert_every_row_has_its_own_answer(out, edited)
    # another file with the same ids: every row is new
    other = prompts(800, "other")
    run(other, out, base_url=simulator.base_url, id_column="id")
    assert len(simulator.simulator.requests) - before == 3 + 800
    assert_every_row_has_its_own_answer(out, other)


def test_a_checkpoint_keyed_by_ids_alone_keeps_its_keys(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # a checkpoint of the older key scheme (its manifest has no key_scheme) resumes as before
    frame, out = prompts(100), tmp_path / "o.parquet"
    checkpoint = Checkpoint(out)
    checkpoint.dir.mkdir()
    checkpoint.write_manifest({})
    reporter = Notes()
    run(frame, out, reporter, base_url=simulator.base_url, id_column="id")
    assert any("id alone" in n for n in reporter.notes)
    before = len(simulator.simulator.requests)
    again = run(frame, out, base_url=simulator.base_url, id_column="id")
    assert len(simulator.simulator.requests) == before and again.exit_code == 0
    assert Checkpoint(out).read_manifest()["key_scheme"] == 1


def test_the_rerun_after_its_last_part_was_set_aside_puts_every_answer_on_its_row(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # Before: the resent rows' new part took the number of the part set aside, the saved
    # index (which covered that number) was taken as valid, and rows got other rows' answers.
    out = tmp_path / "o.parquet"
    frame = prompts(30)
    for rows in (10, 20, 30):
        run(frame[:rows], out, base_url=simulator.base_url, concurrency=8)
    last = parts_of(out)[-1]
    pristine = last.read_bytes()
    # near the start, the middle, the end of each last part (the resent rows' part may be
    # shorter than the first one: they can land in two parts)
    for where in (lambda n: 40, lambda n: n // 2, lambda n: n - 30):
        damaged = bytearray(pristine)
        damaged[where(len(pristine))] ^= 0xFF
        last.write_bytes(bytes(damaged))
        summary = run(frame, out, base_url=simulator.base_url, concurrency=8)
        assert summary.exit_code == 0
        assert_every_row_has_its_own_answer(out, frame)
        last = parts_of(out)[-1]
        pristine = last.read_bytes()


def test_status_names_a_damaged_part_instead_of_a_traceback(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "o.parquet"
    run(prompts(20), out, base_url=simulator.base_url)
    part = parts_of(out)[0]
    part.write_bytes(part.read_bytes()[:-10])  # the footer is gone
    (Checkpoint(out).dir / "index.arrays").unlink()
    result = CliRunner().invoke(main, ["status", str(out)])
    assert result.exit_code == 2
    assert part.name in result.output and "sets it aside" in result.output


def make_older_format(out: Path) -> None:
    """What the previous version left: parts named without a checksum and without a job in
    their metadata, a manifest without job_id, no saved index."""
    checkpoint = Checkpoint(out)
    for path in checkpoint.part_paths():
        table = pq.read_table(path).replace_schema_metadata(None)
        pq.write_table(table, path.parent / f"part-{part_number(path):06d}.parquet")
        path.unlink()
    manifest = checkpoint.read_manifest()
    for name in ("job_id", "legacy_upto", "key_scheme"):
        manifest.pop(name, None)
    checkpoint.write_manifest(manifest)
    (checkpoint.dir / "index.arrays").unlink(missing_ok=True)


def test_older_format_parts_resume_and_one_copied_in_later_is_set_aside(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame, out = prompts(300), tmp_path / "o.parquet"
    run(frame, out, base_url=simulator.base_url, checkpoint_rows=100)
    make_older_format(out)
    before = len(simulator.simulator.requests)
    assert run(frame, out, base_url=simulator.base_url).exit_code == 0
    assert len(simulator.simulator.requests) == before  # resumed, nothing sent
    # another job's part of the older format, copied in after the upgrade
    other = tmp_path / "other.parquet"
    run(prompts(300), other, base_url=simulator.base_url, system="Be brief")
    make_older_format(other)
    foreign = Checkpoint(other).part_paths()[0]
    shutil.copy(foreign, Checkpoint(out).parts_dir / "part-000050.parquet")
    reporter = Notes()
    summary = run(frame, out, reporter, base_url=simulator.base_url)
    assert summary.exit_code == 0
    assert any("older format added after" in n for n in reporter.notes)
    assert_every_row_has_its_own_answer(out, frame)
