"""Memory a row costs where a run holds the most: the key pass over the input and the
result index built from the checkpoint. A job of 10M rows must not need gigabytes, so each
is held to a budget in bytes a row, measured with ``tracemalloc`` (which sees every numpy
array; pyarrow's read buffers are its own and bounded by the batch size)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import keys as keys_module
from pipeline import planning, repeats, result_index, saved_arrays, shards, spill, todo
from pipeline.checkpoint import Checkpoint
from pipeline.config import RunConfig
from pipeline.keys import compute_keys
from pipeline.output import start_manifest
from pipeline.planning import plan_run
from pipeline.reader import open_input
from pipeline.records import RowResult, Usage

ROWS = 100_000


def peak_bytes(work: Callable[[], Any]) -> tuple[int, Any]:
    """(the most bytes allocated at once while ``work`` ran, above what was before; its
    result)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = work()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


def per_row(measure: Callable[[int], int]) -> float:
    """Bytes a row: what ``measure(rows)`` takes more at twice the rows (what does not
    grow with the rows, such as a read buffer, cancels out; a first small run takes what
    is allocated once a process)."""
    measure(ROWS // 10)
    return (measure(2 * ROWS) - measure(ROWS)) / ROWS


@pytest.mark.parametrize("staged", [False, True], ids=["unnamed files", "a staged pass"])
def test_the_key_pass_holds_no_array_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: bool
) -> None:
    # a ten-million-row input sorts its hashes a bucket of about a million at a time; here
    # of 8,192, and the keys are made a chunk of 8,192 rows at a time
    monkeypatch.setattr(spill, "BUCKET_KEYS", 1 << 13)
    monkeypatch.setattr(keys_module, "CHUNK", 1 << 13)
    monkeypatch.setattr(repeats, "READ", 1 << 13)
    monkeypatch.setattr(keys_module, "_HASH_CHUNK", 1 << 16)  # (4 MB: more than these files)

    def measure(rows: int) -> int:
        prompts = [f"prompt {i % (rows - 500)}" for i in range(rows)]  # 500 repeats
        path = tmp_path / f"in-{rows}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=20_000)
        source = open_input(path)
        stage = tmp_path / f"staged-{rows}.tmp" if staged else None

        peak, keys = peak_bytes(
            lambda: compute_keys(
                source, id_column=None, content_columns=["prompt"], stage=stage, scratch=tmp_path
            )
        )
        assert len(keys.keys) == rows and len(keys.duplicates) == 500
        assert keys.key_pass is not None and keys.key_pass.path == stage
        assert (
            keys.keys[:].tolist()
            == compute_keys(source, id_column=None, content_columns=["prompt"]).keys[:].tolist()
        )
        return peak

    # the hashes and keys are in files: what is held is a bucket's sort, the sparse
    # duplicates and the buckets' file buffers (8 KB each, here twice as many buckets at
    # twice the rows: ~1.2 bytes a row; at most 256 buckets, 4 MB). Holding the pass's
    # hashes and making the keys in them took 8 bytes a row; beside them 16
    assert per_row(measure) < 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == (
        ["staged-10000.tmp", "staged-100000.tmp", "staged-200000.tmp"] if staged else []
    )


def test_the_key_pass_over_prompts_that_all_come_twice_holds_tens_of_bytes_a_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_small_pieces(monkeypatch)

    def measure(rows: int) -> int:
        prompts = [f"prompt {i % (rows // 2)}" for i in range(rows)]
        path = tmp_path / f"in-{rows}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=20_000)
        source = open_input(path)
        peak, keys = peak_bytes(
            lambda: compute_keys(
                source, id_column=None, content_columns=["prompt"], scratch=tmp_path
            )
        )
        assert len(keys.duplicates) == rows // 2
        assert keys.leaders.tolist() == list(range(rows // 2))  # row i + rows/2 repeats i
        return peak

    # per row (2 a repeat): the repeats kept (16 bytes each), and at the peak the
    # buckets' repeats merged in row order a column at a time (~34 a repeat: 17 a row;
    # merged whole, 33 a row)
    assert per_row(measure) < 20


def test_building_the_result_index_holds_about_a_byte_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a million-key index sorts a bucket of keys at a time; here buckets of 8,192
    monkeypatch.setattr(spill, "BUCKET_KEYS", 1 << 13)
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    rng = np.random.default_rng(5)

    def measure(rows: int) -> int:
        keys = rng.integers(0, 2**64, size=rows, dtype=np.uint64).tolist()  # row keys: hashes
        checkpoint = Checkpoint(tmp_path / f"{rows}" / "out.parquet")
        checkpoint.prepare()
        for start in range(0, rows, 10_000):
            checkpoint.write_part(
                [RowResult(key=k, status="ok", usage=usage) for k in keys[start : start + 10_000]]
            )
        checkpoint.write_part([RowResult(key=k, status="ok") for k in keys[:1000]])  # retried
        peak, index = peak_bytes(Checkpoint(checkpoint.output).load_index)
        assert index.size == rows and index.counts()["ok"] == rows
        assert index.spent[0] == 3 * (rows - 1000)  # the retried ones: 0
        kept = sum(a.nbytes for a in vars(index).values() if isinstance(a, np.ndarray))
        assert kept / (rows + 1000) < 1.1  # per result of the checkpoint: its status
        return peak

    # per result: the status, and a bucket's sort; holding every key and position
    # sorted peaked at 27 bytes, and keeping them and the tokens and cost 29
    assert per_row(measure) < 3


def in_small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a run does a piece of ~a million rows at a time, done 8,192 rows at a time, so
    that what grows with the rows shows at 100,000 rows."""
    for module, name in [
        (keys_module, "CHUNK"),
        (repeats, "READ"),
        (spill, "BUCKET_KEYS"),
        (todo, "PLAN_ROWS"),
        (todo, "DEDUP_ROWS"),
        (planning, "DIGEST_KEYS"),
        (saved_arrays, "WRITE_KEYS"),
        (result_index, "CACHED_KEYS"),  # (an index of more keys is read a block at a time)
        (result_index, "LOOKUP_CHUNK"),
    ]:
        monkeypatch.setattr(module, name, 1 << 13)
    monkeypatch.setattr(keys_module, "_HASH_CHUNK", 1 << 16)


@pytest.mark.parametrize(
    ("resumed", "shard"),
    [(False, None), (True, None), (False, "1/2")],
    ids=["first run", "half done", "a shard of 2"],
)
def test_planning_three_models_holds_an_eighth_of_a_byte_a_row_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resumed: bool, shard: str | None
) -> None:
    in_small_pieces(monkeypatch)
    monkeypatch.setattr(shards, "MASK_ROWS", 1 << 13)
    config = RunConfig(models=("model-a", "model-b", "model-c"), progress=False, shard=shard)
    environ = {"AIMLAPI_API_KEY": "sk-test"}

    def measure(rows: int) -> int:
        prompts = [f"prompt {i}" for i in range(rows)]
        path = tmp_path / f"in-{rows}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=20_000)
        output = tmp_path / f"out-{rows}.parquet"
        if resumed:  # every model's answer to the even rows is in the checkpoint
            first = plan_run(path, output, config, environ)
            keys = [int(k) for unit in first.unit_keys for k in unit[:][::2]]
            start_manifest(first, config)  # as a run starts: its parts carry its identity
            for start in range(0, len(keys), 50_000):
                first.checkpoint.write_part(
                    [RowResult(key=k, status="ok") for k in keys[start : start + 50_000]]
                )
            first.checkpoint.release_lock()
            del first
        peak, plan = peak_bytes(lambda: plan_run(path, output, config, environ))
        try:
            sent = 3 * (rows // 2) if resumed else 3 * plan.rows_in_scope()
            assert plan.units == 3 and plan.send.count() == plan.pending == sent
            assert shard is None or 0.4 * rows < plan.rows_in_scope() < 0.6 * rows
            assert plan.resumed == (3 * rows - sent if resumed else 0)
            assert [len(keys) for keys in plan.unit_keys] == [rows] * 3
        finally:
            plan.checkpoint.release_lock()
        return peak

    # what to send (3 bits a row), the buckets' file buffers (see the key pass test) and,
    # half done, the index's status (1 byte a result: 1.5 results a row); a shard's rows
    # are bits too. The row keys held (8), what to send as bools (2 a model) and a model's
    # keys while it was looked up (8) took 25.5 on a first run; every model's keys held at
    # once 40; a shard held its keys (8 a row and unit) and its rows' prompt keys (8)
    assert per_row(measure) < (3.5 if resumed else 2)


def test_planning_with_half_the_rows_repeated_holds_tens_of_bytes_a_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dedup (the default) sends one row of a prompt and the others follow its request:
    which follows which is held until the run ends, so it must stay small per repeat."""
    in_small_pieces(monkeypatch)
    config = RunConfig(progress=False)
    environ = {"AIMLAPI_API_KEY": "sk-test"}

    def measure(rows: int) -> int:
        prompts = [f"prompt {i % (rows // 2)}" for i in range(rows)]  # each prompt twice
        path = tmp_path / f"in-{rows}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=20_000)
        output = tmp_path / f"out-{rows}.parquet"
        peak, plan = peak_bytes(lambda: plan_run(path, output, config, environ))
        try:
            assert plan.pending == rows and plan.send.count() == rows // 2
            assert len(plan.followers) == rows // 2
        finally:
            plan.checkpoint.release_lock()
        return peak

    # the peak, per row: who follows whom sorted by leader while the key pass's repeats
    # are held (16 a repeat), ~33; the key pass's own merge of the repeats peaks at ~17
    # (33 merged whole). Held after: 8 a follower and 17 a row followed. A dict of lists
    # of Python ints peaked at 140 a row here (~210 bytes a repeat held)
    assert per_row(measure) < 36
