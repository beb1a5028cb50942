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
from pipeline.checkpoint import Checkpoint
from pipeline.keys import compute_keys
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


def test_the_key_pass_holds_about_16_bytes_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a million-row input sorts its hashes a sixteenth at a time; here from 0 rows on
    monkeypatch.setattr(keys_module, "BUCKETED_FROM", 0)

    def measure(rows: int) -> int:
        prompts = [f"prompt {i % (rows - 500)}" for i in range(rows)]  # 500 repeats
        path = tmp_path / f"in-{rows}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=20_000)
        source = open_input(path)
        peak, keys = peak_bytes(
            lambda: compute_keys(source, id_column=None, content_columns=["prompt"])
        )
        assert len(keys.keys) == rows and len(keys.duplicates) == 500
        return peak

    # kept: the keys and the pass's hashes (8 + 8); a sort of all rows at once held 26
    # more, and dense occurrence and first-row arrays 16 more
    assert per_row(measure) < 20


def test_building_the_result_index_holds_under_30_bytes_a_result(tmp_path: Path) -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)

    def measure(rows: int) -> int:
        checkpoint = Checkpoint(tmp_path / f"{rows}" / "out.parquet")
        checkpoint.prepare()
        for start in range(0, rows, 10_000):
            results = [
                RowResult(key=k, status="ok", usage=usage) for k in range(start, start + 10_000)
            ]
            checkpoint.write_part(results)
        checkpoint.write_part([RowResult(key=k, status="ok") for k in range(1000)])  # retried
        peak, index = peak_bytes(Checkpoint(checkpoint.output).load_index)
        assert len(index.keys) == rows and index.counts()["ok"] == rows
        assert int(index.prompt_tokens.sum()) == 3 * (rows - 1000)  # the retried ones: 0
        kept = sum(a.nbytes for a in vars(index).values() if isinstance(a, np.ndarray))
        assert kept / (rows + 1000) < 30  # per result of the checkpoint
        return peak

    # per result: key and position (12) and status, tokens and cost (17) are kept; the
    # sort of keys and positions peaks at 27; every column reordered by key held 53
    assert per_row(measure) < 30
