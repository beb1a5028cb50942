"""The result index read from a file: the latest result of each key, wherever its bucket,
block or part is. Every answer is checked against a plain dict of the parts, with buckets
and blocks made tiny so that a few hundred results cross many of them (a job of 10M rows
has about ten), and read from the file each time as for an index too big to hold."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from pipeline import index_build, index_join, result_index, spill
from pipeline.array_file import ArrayFile, ArrayWriter
from pipeline.checkpoint import Checkpoint
from pipeline.records import STATUS_CODES, RowResult, Usage
from pipeline.saved_arrays import staged_key_pass

STATUSES = ["ok", "error", "skipped"]


def results(rng: np.random.Generator, keys: np.ndarray) -> list[RowResult]:
    out = []
    for key in keys.tolist():
        status = STATUSES[int(rng.integers(3))]
        tokens = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        usage = Usage(prompt_tokens=tokens[0], completion_tokens=tokens[1])
        out.append(RowResult(key=key, status=status, usage=usage, cost_usd=tokens[0] / 1000))
    return out


def write_parts(
    ckpt: Checkpoint, rng: np.random.Generator, pool: np.ndarray, parts: int
) -> dict[int, tuple[int, RowResult]]:
    """Write ``parts`` parts of keys drawn from ``pool`` (some again: retried); returns the
    latest (part, row) and result per key, as the index must find them."""
    latest: dict[int, tuple[int, RowResult]] = {}
    for _ in range(parts):
        keys = np.unique(rng.choice(pool, size=int(rng.integers(1, 60))))
        rng.shuffle(keys)
        batch = results(rng, keys)
        ckpt.write_part(batch)
        for row, result in enumerate(batch):
            latest[result.key] = (row, result)
    return latest


def check(
    index: result_index.ResultIndex, pool: np.ndarray, latest: dict[int, tuple[int, RowResult]]
) -> None:
    pos = index.lookup(pool)
    for key, position in zip(pool.tolist(), pos.tolist(), strict=True):
        assert (position >= 0) == (key in latest), key
    found = pos[pos >= 0]
    assert index.size == len(latest) == len(found)
    counts = index.counts(found)
    assert counts == {
        name: sum(r.status == name for _, r in latest.values()) for name in STATUS_CODES
    }
    assert index.counts() == {**counts, "invalid": 0}
    prompt, completion, cost = index.spent
    assert prompt == sum(r.usage.prompt_tokens for _, r in latest.values())
    assert completion == sum(r.usage.completion_tokens for _, r in latest.values())
    assert cost == pytest.approx(sum(r.cost_usd or 0 for _, r in latest.values()))
    assert index.spent_among(found[: len(found) // 2])[0] == sum(
        r.usage.prompt_tokens
        for key, (_, r) in latest.items()
        if key in set(pool[pos >= 0][: len(found) // 2].tolist())
    )
    # each key's position is its latest result's row
    _, rows = index.locate(found)
    assert rows.tolist() == [latest[k][0] for k in pool[pos >= 0].tolist()]
    places = index.places([pool])
    assert places.counts() == (counts, len(pool) - len(found))


@pytest.fixture(params=["one bucket, held", "many buckets, read each time"])
def tiny(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param != "one bucket, held":
        monkeypatch.setattr(spill, "BUCKET_KEYS", 8)
        monkeypatch.setattr(index_build, "READ_ROWS", 7)
        monkeypatch.setattr(result_index, "CACHED_KEYS", 0)
        monkeypatch.setattr(result_index, "LOOKUP_CHUNK", 5)


@pytest.mark.parametrize("seed", range(4))
def test_every_key_finds_its_latest_result(tmp_path: Path, tiny: None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    latest = write_parts(ckpt, rng, pool, parts=8)

    check(Checkpoint(ckpt.output).load_index(), pool, latest)


@pytest.mark.parametrize("seed", range(4))
def test_the_saved_index_plus_newer_parts_finds_the_same(
    tmp_path: Path, tiny: None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    latest = write_parts(ckpt, rng, pool, parts=5)
    ckpt.save_index(ckpt.load_index())
    # more parts, some keys again: the newer result wins over the saved one
    for key, value in write_parts(ckpt, rng, pool, parts=4).items():
        latest[key] = value

    fresh = Checkpoint(ckpt.output)
    index = fresh.load_index()
    assert fresh.parts_read == 4
    check(index, pool, latest)
    fresh.save_index(index)
    again = Checkpoint(ckpt.output)
    check(again.load_index(), pool, latest)
    assert again.parts_read == 0


@pytest.mark.parametrize("seed", range(3))
def test_places_found_a_window_at_a_time_are_the_places_found_at_once(
    tmp_path: Path, tiny: None, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUTPUT is assembled a batch of rows at a time, its places found a window at a time:
    every batch, wherever it falls against the windows, and every count, are what the
    places of every row at once say."""
    monkeypatch.setattr(index_join, "PLACES_WINDOW", 7)
    monkeypatch.setattr(index_join, "MIN_WINDOW_ROWS", 3)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**64, size=200, dtype=np.uint64)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    write_parts(ckpt, rng, pool, parts=5)
    index = ckpt.load_index()
    units = [rng.permutation(pool)[:90], rng.integers(0, 2**64, size=90, dtype=np.uint64)]
    units[1][::3] = units[0][::3]  # the second unit: a third of its keys have a result
    at_once = index.places(units)
    by_window = index_join.PlacesByWindow(index, units)

    mask = rng.random(90) < 0.5
    assert by_window.counts() == at_once.counts()
    assert by_window.counts(mask) == at_once.counts(mask)
    start = 0
    while start < 90:  # batches of 1 to 12 rows, in order, as OUTPUT reads them
        rows = slice(start, min(90, start + int(rng.integers(1, 13))))
        for unit in range(2):
            got, expected = by_window.locate(unit, rows), at_once.locate(unit, rows)
            assert [a.tolist() for a in got] == [a.tolist() for a in expected], (unit, rows)
        start = rows.stop
    by_window.locate(0, slice(0, 40))  # a window that holds the next count's first windows
    assert by_window.counts(mask) == at_once.counts(mask)
    # OUTPUT written first: its windows are counted as they are found, none is found again
    written = index_join.PlacesByWindow(index, units)
    start = 0
    while start < 90:
        written.locate(0, slice(start, start := min(90, start + int(rng.integers(1, 13)))))
    looked_up: list[int] = []
    find = written.windows.at
    monkeypatch.setattr(written.windows, "at", lambda start: looked_up.append(start) or find(start))
    assert written.counts() == at_once.counts()
    assert looked_up == []


def big_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> result_index.ResultIndex:
    """An index of ~100 keys in 16 blocks, too big to hold (as one of 10M keys)."""
    monkeypatch.setattr(spill, "BUCKET_KEYS", 8)
    monkeypatch.setattr(index_build, "READ_ROWS", 7)
    monkeypatch.setattr(result_index, "CACHED_KEYS", 0)
    monkeypatch.setattr(result_index, "LOOKUP_CHUNK", 5)
    rng = np.random.default_rng(3)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    write_parts(ckpt, rng, rng.integers(0, 2**64, size=300, dtype=np.uint64), parts=8)
    index = ckpt.load_index()
    assert len(index.fences) >= 16
    return index


def key_blocks_read(index: result_index.ResultIndex, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The start of every block of keys read from ``index``'s file from now on."""
    assert index.file is not None
    reads: list[int] = []
    read = index.file.read

    def counted(name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        if name == "keys":
            reads.append(start)
        return read(name, start, stop)

    monkeypatch.setattr(index.file, "read", counted)
    return reads


@pytest.mark.parametrize("window", [1, 4, 7, 1000])
def test_rows_found_window_by_window_read_each_index_block_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """A job of R rows found a window at a time read the whole index once a window (R/1M
    times at 1M rows a window: 100 at 100M rows); joined, it is read once whatever R."""
    index = big_index(tmp_path, monkeypatch)
    rng = np.random.default_rng(window)
    keys = np.concatenate([index.read_keys(), rng.integers(0, 2**64, size=200, dtype=np.uint64)])
    units = [rng.permutation(keys)[:150], rng.permutation(keys)[:150]]
    at_once = index.places(units)
    reads = key_blocks_read(index, monkeypatch)

    found = index_join.WindowedPlaces(index, units, window)
    for start in found.starts():  # twice, out of order: the same, and no block read again
        for again in (found.at(start), found.at(start)):
            for unit in range(2):
                expected = at_once.at[unit][start : start + window]
                assert again.at[unit].tolist() == expected.tolist(), (start, unit)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == len(index.fences)
    found.close()


def test_where_no_temporary_file_can_be_made_windows_are_looked_up_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = big_index(tmp_path, monkeypatch)
    units = [np.random.default_rng(1).permutation(index.read_keys())[:100]]
    at_once = index.places(units)
    index.scratch = tmp_path / "gone"  # (as a full disk: the files cannot be made)
    reads = key_blocks_read(index, monkeypatch)

    found = index_join.WindowedPlaces(index, units, 30)
    got = np.concatenate([found.at(start).at[0] for start in found.starts()])
    assert got.tolist() == at_once.at[0].tolist()
    assert len(reads) > len(index.fences)  # (read once a window, and once a chunk in it)


class Quota(io.FileIO):
    """A file on a disk with ``left[0]`` bytes free: a write past them fails (ENOSPC)."""

    left: ClassVar[list[int]] = [0]

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if Quota.left[0] < size:
            raise OSError(errno.ENOSPC, "No space left on device")
        Quota.left[0] -= size
        return super().write(data)


def test_a_disk_that_fills_at_any_point_of_the_join_gives_the_same_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join writes its temporary files first: a disk that fills meanwhile (even in
    its last bytes, still in a file's buffer) makes it look windows up one by one."""
    index = big_index(tmp_path, monkeypatch)
    units = [np.random.default_rng(1).permutation(np.tile(index.read_keys(), 8))]
    at_once = index.places(units).at[0].tolist()
    opened: list[io.BufferedRandom] = []

    def on_quota(directory: Path | None) -> io.BufferedRandom:
        fd, path = tempfile.mkstemp(dir=tmp_path)
        os.unlink(path)
        opened.append(io.BufferedRandom(Quota(fd, "r+")))
        return opened[-1]

    monkeypatch.setattr(spill, "unnamed_file", on_quota)
    Quota.left[0] = 1 << 40
    index_join.WindowedPlaces(index, units, 100).at(0)
    needed = (1 << 40) - Quota.left[0]  # what the join writes with room enough
    for left in [0, 1000, needed // 2, needed - 5000, needed - 100, needed - 1, needed]:
        Quota.left[0] = left
        found = index_join.WindowedPlaces(index, units, 100)
        got = np.concatenate([found.at(start).at[0] for start in found.starts()])
        assert got.tolist() == at_once, left
        found.close()
        assert all(fh.closed for fh in opened), left


def test_output_batches_across_windows_read_each_window_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUTPUT asks for a batch's places a unit after another: a batch across two windows
    read them in turn for every unit (20 units: 40 reads a boundary, each of every unit)."""
    index = big_index(tmp_path, monkeypatch)
    monkeypatch.setattr(index_join, "PLACES_WINDOW", 50)  # 20 units: windows of 40 rows
    monkeypatch.setattr(index_join, "MIN_WINDOW_ROWS", 40)  # (2 batches of up to 30)
    rng = np.random.default_rng(2)
    units = [rng.permutation(index.read_keys()) for _ in range(20)]
    at_once = index.places(units)
    places = index_join.PlacesByWindow(index, units)
    reads: list[int] = []
    read = places.windows.at
    monkeypatch.setattr(places.windows, "at", lambda start: reads.append(start) or read(start))

    start = 0
    while start < len(units[0]):
        rows = slice(start, start + int(rng.integers(7, 31)))  # any size (CSV batches)
        for unit in range(20):
            assert places.locate(unit, rows)[1].tolist() == at_once.locate(unit, rows)[1].tolist()
        start = rows.stop
    assert reads == list(places.windows.starts())


def test_an_index_nobody_keeps_leaves_no_file(tmp_path: Path, tiny: None) -> None:
    rng = np.random.default_rng(7)
    pool = rng.integers(0, 2**64, size=100, dtype=np.uint64)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    write_parts(ckpt, rng, pool, parts=3)
    before = set(ckpt.dir.iterdir())

    index = ckpt.load_index()
    assert index.size > 0
    index.close()
    del index

    assert set(ckpt.dir.iterdir()) == before


def test_what_a_killed_run_left_of_its_index_is_removed_by_the_next_run(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    ckpt.write_part(results(np.random.default_rng(1), np.arange(1, 4, dtype=np.uint64)))
    # a run killed while it built its index, and while it spread keys for a lookup
    (ckpt.dir / ".index.4194301.0.tmp").write_bytes(b"half an index")
    (ckpt.dir / ".index.4194301.0.tmp.3.tmp").write_bytes(b"a bucket")
    spread = ckpt.dir / ".join-x1y2.tmp"
    spread.mkdir()
    (spread / "0").write_bytes(bytes(16))
    # and a key pass it staged beside OUTPUT, under the pid this process happens to have
    staged = ckpt.output.parent / f".out.parquet.input-keys.{os.getpid()}.tmp"
    staged.write_bytes(b"a key pass")

    again = Checkpoint(ckpt.output)
    again.prepare()

    assert sorted(p.name for p in again.dir.iterdir()) == ["parts"]
    assert not staged.exists()
    assert again.load_index().size == 3


def test_a_key_pass_another_run_is_writing_is_spared_and_each_run_stages_its_own(
    tmp_path: Path,
) -> None:
    output = tmp_path / "out.parquet"
    # two runs with the same pid (two containers) never share a staged file
    first, second = staged_key_pass(output), staged_key_pass(output)
    assert first is not None and second is not None and first != second
    # a run in its key pass (no lock yet) while another run prepares the checkpoint
    writer = ArrayWriter(first, locked=True)
    writer.append("content", np.arange(5, dtype=np.uint64))
    second.write_bytes(b"a killed run's")

    Checkpoint(output).prepare()

    assert first.exists() and not second.exists()
    with pytest.raises(OSError):  # nor is it emptied by another writer
        ArrayWriter(first, locked=True)
    written = writer.close({})
    assert ArrayFile(first).read("content").tolist() == [0, 1, 2, 3, 4]
    Checkpoint(output).prepare()  # still open, still spared
    assert first.exists()
    written.close()
    Checkpoint(output).prepare()
    assert not first.exists()


def test_a_reader_without_the_lock_writes_nothing_beside_the_parts(
    tmp_path: Path, tiny: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `pipeline status` reads unlocked: a run starting meanwhile removes temporary files
    # beside the parts, so a reader's index and lookups live in the temp directory
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 2**64, size=200, dtype=np.uint64)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    latest = write_parts(ckpt, rng, pool, parts=6)
    before = sorted(ckpt.dir.rglob("*"))

    reader = Checkpoint(ckpt.output)
    index = reader.load_index()
    assert index.file is not None and index.file.path is not None
    assert index.file.path.parent == scratch
    check(index, pool, latest)  # lookups and joins included

    assert sorted(ckpt.dir.rglob("*")) == before


def test_where_no_index_file_can_be_written_it_is_held_and_answers_the_same(
    tmp_path: Path, tiny: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a full disk: the index is built in memory, one bucket, and reads the same
    rng = np.random.default_rng(11)
    pool = rng.integers(0, 2**64, size=200, dtype=np.uint64)
    ckpt = Checkpoint(tmp_path / "out.parquet")
    ckpt.prepare()
    latest = write_parts(ckpt, rng, pool, parts=6)
    monkeypatch.setattr(Checkpoint, "_index_temp", lambda self: tmp_path / "gone" / "index.tmp")

    index = Checkpoint(ckpt.output).load_index()

    assert index.file is not None and index.file.path is None  # held, not a file
    check(index, pool, latest)
