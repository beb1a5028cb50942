"""A rerun starts from what the last run learned: the input's key pass and the result index.

So that resuming a million-row job does not re-read and re-hash every row nor re-read every
checkpoint part, the checkpoint keeps the last key pass (``input-keys.npz``: each row's hash
with the input file's stat and SHA-256) and the result index (``index.arrays``). These tests
pin down that reusing them never changes an answer: the keys, the rows sent and OUTPUT are
exactly those of a run that read everything again, whatever happened to the input between
runs (unchanged, rows appended, edited in place at the same length, a last line without a
newline), and that damaged or stale saved files are ignored rather than trusted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import Result
from conftest import cli, write_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import keys as keys_module
from pipeline import spill
from pipeline.checkpoint import Checkpoint
from pipeline.keys import RowKeys, compute_keys
from pipeline.reader import open_input
from pipeline.records import STATUS_CODES, RowResult, Usage
from pipeline.repeats import repeats, stable_argsort
from pipeline.simulator import SimulatorThread

ANSWER = "Simulated answer to: "


def key_pass(path: Path, previous: RowKeys | None = None, id_column: str | None = None) -> RowKeys:
    source = open_input(path)
    return compute_keys(
        source,
        id_column=id_column,
        content_columns=["prompt"],
        previous=previous.key_pass if previous is not None else None,
    )


def assert_same_keys(got: RowKeys, fresh: RowKeys) -> None:
    assert got.keys[:].tolist() == fresh.keys[:].tolist()
    assert got.duplicates.tolist() == fresh.duplicates.tolist()
    assert got.leaders.tolist() == fresh.leaders.tolist()


def run(sim: SimulatorThread, source: Path, output: Path, *extra: object) -> Result:
    return cli("run", source, "-o", output, "--base-url", sim.base_url, "--no-progress", *extra)


def received(sim: SimulatorThread, since: int) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in sim.simulator.requests[since:] if r.body]


# -- the key pass ------------------------------------------------------------------------


def test_an_unchanged_input_is_not_read_again_and_gives_the_same_keys(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", ["a", "b", "a", "c"])
    first = key_pass(source)
    again = key_pass(source, previous=first)

    assert again.reused == 4
    assert_same_keys(again, first)


# prompts with commas, quotes, newlines inside quoted values and repeats
PROMPT = st.text(alphabet='ab,"\n é', min_size=1, max_size=6).filter(lambda s: s.strip() != "")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    head=st.lists(PROMPT, min_size=1, max_size=12), tail=st.lists(PROMPT, min_size=1, max_size=8)
)
def test_appended_rows_are_the_only_rows_read_and_keys_equal_a_full_pass(
    tmp_path_factory: pytest.TempPathFactory, head: list[str], tail: list[str]
) -> None:
    folder = tmp_path_factory.mktemp("append")
    source = write_csv(folder / "in.csv", head)
    before = key_pass(source)
    write_csv(source, head + tail)  # pandas writes the same bytes for the same leading rows

    after = key_pass(source, previous=before)

    assert after.reused == len(head)
    assert_same_keys(after, key_pass(source))


def test_an_edit_that_keeps_the_size_and_the_mtime_is_still_seen(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", ["alpha", "bravo", "charlie"])
    before = key_pass(source)
    stat = source.stat()
    source.write_text(source.read_text().replace("bravo", "BRAVO"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # hide it from the mtime
    assert source.stat().st_size == stat.st_size

    after = key_pass(source, previous=before)

    assert after.reused == 0
    assert_same_keys(after, key_pass(source))
    assert after.keys[:][1] != before.keys[:][1]


def test_a_grown_file_whose_start_changed_is_read_whole(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", ["alpha", "bravo"])
    before = key_pass(source)
    write_csv(source, ["alphA", "bravo", "charlie"])

    after = key_pass(source, previous=before)

    assert after.reused == 0
    assert_same_keys(after, key_pass(source))


def test_rows_appended_to_a_last_line_without_newline_change_that_row_too(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"prompt\nalpha\nbravo")  # no newline at the end
    before = key_pass(source)
    with source.open("ab") as fh:
        fh.write(b"x\ncharlie\n")  # the old last row now reads "bravox"

    after = key_pass(source, previous=before)

    assert after.reused == 0
    assert_same_keys(after, key_pass(source))


def test_id_keys_are_reused_and_a_duplicate_id_in_appended_rows_is_still_refused(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": ["r1", "r2"], "prompt": ["a", "b"]}).to_csv(source, index=False)
    before = key_pass(source, id_column="id")
    with source.open("a") as fh:
        fh.write("r3,c\n")
    after = key_pass(source, previous=before, id_column="id")
    assert after.reused == 2
    assert_same_keys(after, key_pass(source, id_column="id"))

    with source.open("a") as fh:
        fh.write("r1,again\n")
    with pytest.raises(Exception, match="duplicate ids: 'r1'"):
        key_pass(source, previous=after, id_column="id")


# -- the saved index -----------------------------------------------------------------------


def result(key: int, text: str) -> RowResult:
    return RowResult(key=key, status="ok", completion=text, attempts=1)


def index_arrays(ckpt: Checkpoint) -> dict[str, list[object]]:
    """Per key (sorted), what the index says of its latest result; and the index's sums and
    counts, which must see the latest result of each key only."""
    index = ckpt.load_index()
    at = index.read_at()
    part, row = index.locate(at.astype(np.int64))
    per_key = {"keys": index.read_keys(), "part": part, "row": row}
    for name in ("status", "prompt_tokens", "completion_tokens", "cost_usd"):
        per_key[name] = index.read_column(name)[at]
    sums = {
        "counts": [index.counts()],
        "tokens": [
            int(index.read_column("prompt_tokens").sum()),
            int(index.read_column("completion_tokens").sum()),
        ],
        "cost": [round(float(index.read_column("cost_usd").sum()), 9)],
    }
    return {**{name: values.tolist() for name, values in per_key.items()}, **sums}


def rebuilt(ckpt: Checkpoint) -> dict[str, list[object]]:
    (ckpt.dir / "index.arrays").unlink(missing_ok=True)
    return index_arrays(Checkpoint(ckpt.output))


def test_the_saved_index_plus_newer_parts_equals_an_index_read_from_every_part(
    tmp_path: Path,
) -> None:
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    ckpt.write_part([result(1, "one"), result(2, "two")])
    ckpt.save_index(ckpt.load_index())
    ckpt.write_part([result(2, "two, newer"), result(3, "three")])  # key 2 again: latest wins

    fresh = Checkpoint(ckpt.output)
    loaded = index_arrays(fresh)
    assert fresh.parts_read == 1  # only the part after the saved index
    assert loaded == rebuilt(ckpt)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "covered part removed"])
def test_a_damaged_or_stale_saved_index_is_ignored(tmp_path: Path, damage: str) -> None:
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    first = ckpt.write_part([result(1, "one")])
    ckpt.write_part([result(2, "two")])
    ckpt.save_index(ckpt.load_index())
    saved = ckpt.dir / "index.arrays"
    if damage == "garbage":
        saved.write_bytes(b"not an npz file")
    elif damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:100])
    else:
        first.unlink()

    fresh = Checkpoint(ckpt.output)
    expected = [2] if damage == "covered part removed" else [1, 2]
    assert fresh.load_index().read_keys().tolist() == expected
    assert fresh.parts_read == len(expected)


a_result = st.builds(
    lambda key, status, prompt, completion, cost: RowResult(
        key=key,
        status=status,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
        cost_usd=cost,
    ),
    key=st.integers(1, 12),  # few keys: most appear again, in the same part and in later ones
    status=st.sampled_from(list(STATUS_CODES)),
    prompt=st.none() | st.integers(0, 2**31 - 1),
    completion=st.none() | st.integers(0, 5000),
    cost=st.none() | st.floats(0, 1),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parts=st.lists(st.tuples(st.lists(a_result, min_size=1, max_size=6), st.booleans()), max_size=6)
)
def test_the_index_holds_each_keys_latest_result_with_its_part_row_and_tokens(
    tmp_path_factory: pytest.TempPathFactory, parts: list[tuple[list[RowResult], bool]]
) -> None:
    """Whatever the parts and wherever an index was saved between them, every key's entry
    is its last result: the part and row it is in, its status, tokens and cost."""
    ckpt = Checkpoint(tmp_path_factory.mktemp("index") / "out.parquet")
    ckpt.prepare()
    expected: dict[int, tuple[object, ...]] = {}
    for number, (results, save_after) in enumerate(parts, start=1):
        ckpt.write_part(results)
        for row, r in enumerate(results):
            expected[r.key] = (
                number,
                row,
                STATUS_CODES[r.status],
                r.usage.prompt_tokens or 0,
                r.usage.completion_tokens or 0,
                r.cost_usd or 0.0,
            )
        if save_after:
            ckpt.save_index(Checkpoint(ckpt.output).load_index())

    got = index_arrays(Checkpoint(ckpt.output))
    names = ("part", "row", "status", "prompt_tokens", "completion_tokens", "cost_usd")
    assert got["keys"] == sorted(expected)
    table = {key: tuple(got[name][i] for name in names) for i, key in enumerate(got["keys"])}
    assert table == expected
    # what was spent and the status counts: each key's latest result, once
    latest = list(expected.values())
    assert got["tokens"] == [sum(e[3] for e in latest), sum(e[4] for e in latest)]  # type: ignore[misc]
    assert got["cost"] == [round(sum(e[5] for e in latest), 9)]  # type: ignore[misc]
    codes = [e[2] for e in latest]
    assert got["counts"] == [{name: codes.count(code) for name, code in STATUS_CODES.items()}]


# -- end to end ----------------------------------------------------------------------------


def test_a_rerun_after_appending_sends_only_the_new_rows_and_writes_every_row_in_order(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    head = [f"row {i}, with a comma" for i in range(30)] + ['a "quoted"\nmulti-line row']
    source = write_csv(tmp_path / "in.csv", head)
    output = tmp_path / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    assert (output.parent / "out.parquet.checkpoint" / "input-keys.arrays").exists()

    grown = [*head, "new one", "new two"]
    write_csv(source, grown)
    mark = len(simulator.simulator.requests)
    result = run(simulator, source, output)

    assert result.exit_code == 0, result.output
    assert sorted(received(simulator, mark)) == ["new one", "new two"]
    frame = pd.read_parquet(output)
    assert frame["prompt"].tolist() == grown
    assert frame["completion"].tolist() == [ANSWER + p for p in grown]


def test_a_key_pass_an_earlier_version_saved_is_replaced_by_one_full_pass(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "in.csv", [f"row {i}" for i in range(6)])
    output = tmp_path / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    checkpoint = output.parent / "out.parquet.checkpoint"
    (checkpoint / "input-keys.arrays").rename(checkpoint / "input-keys.npz")  # as it was
    write_csv(source, [f"row {i}" for i in range(8)])

    mark = len(simulator.simulator.requests)
    assert run(simulator, source, output).exit_code == 0

    assert sorted(received(simulator, mark)) == ["row 6", "row 7"]
    assert (checkpoint / "input-keys.arrays").exists()
    assert not (checkpoint / "input-keys.npz").exists()
    assert pd.read_parquet(output)["completion"].tolist() == [ANSWER + f"row {i}" for i in range(8)]


def test_a_run_refused_after_its_key_pass_leaves_nothing_beside_output(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # a run writes its new key pass beside OUTPUT before it may touch the checkpoint
    source = write_csv(tmp_path / "in.csv", [f"row {i}" for i in range(5)])
    output = tmp_path / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    saved = output.parent / "out.parquet.checkpoint" / "input-keys.arrays"
    before = saved.read_bytes()
    write_csv(source, [f"row {i}" for i in range(7)])  # grown: a new pass

    refused = run(simulator, source, output, "--temperature", "0.9")  # another job

    assert refused.exit_code == 2 and "other settings" in refused.output, refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.csv",
        "out.parquet",
        "out.parquet.checkpoint",
    ]
    assert saved.read_bytes() == before
    assert run(simulator, source, output).exit_code == 0  # and the same job goes on
    assert saved.read_bytes() != before


def test_a_first_run_into_a_directory_not_made_yet_keeps_its_key_pass(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "in.csv", ["a", "b"])
    output = tmp_path / "new" / "dir" / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    assert (output.parent / "out.parquet.checkpoint" / "input-keys.arrays").exists()
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "out.parquet",
        "out.parquet.checkpoint",
    ]


def test_an_edit_hidden_from_size_and_mtime_is_sent_again(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = ["alpha", "bravo", "charlie"]
    source = write_csv(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    stat = source.stat()
    source.write_text(source.read_text().replace("bravo", "BRAVO"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    mark = len(simulator.simulator.requests)
    assert run(simulator, source, output).exit_code == 0

    assert received(simulator, mark) == ["BRAVO"]
    assert pd.read_parquet(output)["completion"].tolist()[1] == ANSWER + "BRAVO"


def test_bad_bytes_in_appended_rows_are_refused_naming_their_line(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "in.csv", ["alpha", "bravo"])
    output = tmp_path / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    before = output.read_bytes()
    with source.open("ab") as fh:
        fh.write(b"charlie\ncaf\xe9 latin-1\n")  # line 5 is not UTF-8

    mark = len(simulator.simulator.requests)
    result = run(simulator, source, output)

    assert result.exit_code == 2
    assert "not UTF-8 at line 5" in result.output
    assert received(simulator, mark) == []
    assert output.read_bytes() == before


def test_a_checkpoint_copied_elsewhere_with_its_input_still_resumes_from_its_key_pass(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"p{i}" for i in range(20)]
    (tmp_path / "a").mkdir()
    source = write_csv(tmp_path / "a" / "in.csv", prompts)
    output = tmp_path / "a" / "out.parquet"
    assert run(simulator, source, output).exit_code == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new inodes and times: the hash decides
    copied = tmp_path / "b" / "in.csv"
    write_csv(copied, [*prompts, "p20"])

    kept = Checkpoint(tmp_path / "b" / "out.parquet").load_key_pass()
    assert kept is not None
    keys = key_pass(copied, previous=None)
    again = compute_keys(
        open_input(copied), id_column=None, content_columns=["prompt"], previous=kept
    )
    assert again.reused == 20
    assert np.array_equal(again.keys[:], keys.keys[:])


@given(st.lists(st.integers(min_value=0, max_value=6), max_size=60))
def test_the_fast_key_sort_orders_equal_keys_as_a_stable_sort_does(values: list[int]) -> None:
    keys = np.array(values, dtype=np.uint64)
    order, ordered, starts = stable_argsort(keys)
    assert order.tolist() == np.argsort(keys, kind="stable").tolist()
    assert ordered.tolist() == sorted(values)
    assert starts.tolist() == [i == 0 or ordered[i] != ordered[i - 1] for i in range(len(keys))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), max_size=40))
def test_each_repeated_prompt_gets_its_occurrence_number_and_its_first_row(
    values: list[int],
) -> None:
    """Row keys follow (prompt, occurrence among equal prompts); a repeat points at the
    first row with its prompt (the row --dedup sends for it); rows seen first need nothing."""
    hashes = np.array(values, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    seen: dict[int, list[int]] = {}
    expected = []
    for row, value in enumerate(values):
        if value in seen:
            expected.append((row, len(seen[value]), seen[value][0]))
        seen.setdefault(value, []).append(row)
    for per_bucket in (None, 4):  # all at once; a bucket of top bits at a time, in files
        rows, occurrence, leaders = repeats(hashes, per_bucket=per_bucket)
        got = list(zip(rows.tolist(), occurrence.tolist(), leaders.tolist(), strict=True))
        assert got == expected


@pytest.mark.parametrize(
    "made", ["in unnamed files", "beside a staged key pass", "3 rows and 1 bucket at a time"]
)
def test_row_keys_are_the_same_as_every_earlier_version_made_them(
    tmp_path: Path, made: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written by an earlier version resumes with this one only if a row's key
    is computed exactly as before: these values were made by the code of 2026-12-05 (before
    keys were made a chunk at a time into files) and must never change, wherever a run
    writes its pass and however many rows it makes at once."""
    if made == "3 rows and 1 bucket at a time":
        monkeypatch.setattr(keys_module, "CHUNK", 3)
        monkeypatch.setattr(spill, "BUCKET_KEYS", 1)
    path = tmp_path / "in.csv"
    path.write_text("prompt,id\nhello,a\nworld,b\nhello,c\n,d\n")

    def key_pass(path: Path, id_column: str | None = None) -> RowKeys:
        stage = tmp_path / f"staged-{id_column}.tmp" if made != "in unnamed files" else None
        keys = compute_keys(
            open_input(path),
            id_column=id_column,
            content_columns=["prompt"],
            stage=stage,
            scratch=tmp_path,
        )
        assert keys.key_pass is not None and keys.key_pass.path == stage
        return keys

    by_content = key_pass(path)
    assert [hex(k) for k in by_content.keys[:].tolist()] == [
        "0x17200782f30f4d89",
        "0x6cc72d2fcdeb9404",
        "0x6c16f01ac5c619cf",  # the second "hello": its occurrence number makes it new
        "0xdacec17352760929",
    ]
    assert (by_content.duplicates.tolist(), by_content.leaders.tolist()) == ([2], [0])
    by_id = key_pass(path, id_column="id")
    assert [hex(k) for k in by_id.keys[:].tolist()] == [
        "0xc6e07c4d362774cc",
        "0x2006a25da6c754bd",
        "0x451ccb7e1f8c47aa",
        "0xc3bf1f27fea64270",
    ]
