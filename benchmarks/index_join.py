"""Finding every row's result in a big result index: a window of rows at a time, each window
joined with the index on its own (how planning a resume, writing OUTPUT, `status` and
`merge` did it before 2026-12-05), vs one join for the whole job (``index_join``).

    python benchmarks/index_join.py                      # 1M, 4M and 16M rows (~4 min)
    python benchmarks/index_join.py --rows 1000000,2000000

For each size: a checkpoint of that many results (parts of 100,000 rows written with
pyarrow, keys random), its index built as a run builds it, then every key looked up in
input order (a random permutation of them), in windows of ``PLACES_WINDOW`` rows, both ways
back to back in this one process. Reported per way: wall seconds and bytes of the index
read (keys and positions), and the ratio. No network at all.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.checkpoint import Checkpoint
from pipeline.index_join import PLACES_WINDOW, WindowedPlaces
from pipeline.result_index import ResultIndex
from pipeline.schema import PART_SCHEMA

PART_ROWS = 100_000


def checkpoint_of(directory: Path, rows: int) -> tuple[Checkpoint, np.ndarray]:
    """A checkpoint holding an ``ok`` result for each of ``rows`` random keys."""
    ckpt = Checkpoint(directory / "out.parquet")
    ckpt.prepare()
    keys = np.random.default_rng(rows).integers(0, 2**64, size=rows, dtype=np.uint64)
    for start in range(0, rows, PART_ROWS):
        chunk = keys[start : start + PART_ROWS]
        columns = {field.name: pa.nulls(len(chunk), field.type) for field in PART_SCHEMA}
        columns["key"] = pa.array(chunk)
        columns["status"] = pa.array(["ok"] * len(chunk))
        path = ckpt.parts_dir / f"part-{start // PART_ROWS + 1:06d}-00000000.parquet"
        pq.write_table(pa.table(columns, schema=PART_SCHEMA), path)
    return ckpt, keys


def counting(index: ResultIndex) -> list[int]:
    """Bytes read from ``index``'s file from now on (keys and positions), in a list of one."""
    assert index.file is not None
    read, total = index.file.read, [0]

    def counted(name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        values = read(name, start, stop)
        total[0] += values.nbytes if name in ("keys", "at") else 0
        return values

    index.file.read = counted  # type: ignore[method-assign]
    return total


def by_window(index: ResultIndex, keys: np.ndarray) -> int:
    """Each window joined on its own; returns the rows found."""
    found = 0
    for start in range(0, len(keys), PLACES_WINDOW):
        window = WindowedPlaces(index, [keys[start : start + PLACES_WINDOW]], PLACES_WINDOW)
        found += int((~window.at(0).missing(0)).sum())
        window.close()
    return found


def joined(index: ResultIndex, keys: np.ndarray) -> int:
    """One join for every window; returns the rows found."""
    windows, found = WindowedPlaces(index, [keys], PLACES_WINDOW), 0
    for start in windows.starts():
        found += int((~windows.at(start).missing(0)).sum())
    windows.close()
    return found


def measure(rows: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="index-join-") as tmp:
        ckpt, keys = checkpoint_of(Path(tmp), rows)
        index = ckpt.load_index()
        lookups = np.random.default_rng(1).permutation(keys)
        out: dict[str, float] = {"blocks": len(index.fences)}
        for name, way in (("by window", by_window), ("joined", joined)):
            read = counting(index)
            began = time.perf_counter()
            assert way(index, lookups) == rows
            out[f"{name} s"] = time.perf_counter() - began
            out[f"{name} MB read"] = read[0] / 1e6
            index.file.read = type(index.file).read.__get__(index.file)  # type: ignore
        index.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000,4000000,16000000")
    args = parser.parse_args()
    print("| rows | index blocks | by window: s, MB read | joined: s, MB read | ratio (s) |")
    print("|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        m = measure(rows)
        print(
            f"| {rows:,} | {m['blocks']:.0f} | {m['by window s']:.1f}, "
            f"{m['by window MB read']:,.0f} | {m['joined s']:.1f}, {m['joined MB read']:,.0f} "
            f"| {m['by window s'] / m['joined s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
