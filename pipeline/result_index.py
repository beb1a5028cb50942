"""Where every result of a checkpoint is: the index of the latest result per key.

``ResultIndex`` (key, part, row, status, tokens, cost) answers which rows are done, what was
spent and where to read a result; ``build_index`` makes it from the parts (and from the
index a run saves, ``index.npz``, written by ``save_arrays`` and read by ``load_arrays``),
the latest result of a key winning. It writes no part: ``checkpoint`` owns the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .keys import stable_argsort
from .part_files import names_digest
from .records import COST_CACHE, COST_DEDUP, STATUS_CODES
from .saved_arrays import load_arrays, save_arrays
from .schema import FORMAT_VERSION
from .schema import PART_SCHEMA as PART_SCHEMA
from .schema import RESULT_SCHEMA as RESULT_SCHEMA

LOOKUP_CHUNK = 1 << 16


@dataclass
class ResultLocations:
    """Where the latest result of every key in the checkpoint is, sorted by key.

    ``part`` and ``row`` locate the result; ``status`` holds ``STATUS_CODES``. Assembling
    OUTPUT needs less: ``places`` gives part and row aligned with the input's keys.
    """

    keys: np.ndarray
    part: np.ndarray
    row: np.ndarray
    status: np.ndarray

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Position in this index of each key, or -1 when it has no result."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        if len(keys) > 4096:
            # sorted queries walk the index in order: ~4x faster than random probes at 1M
            order = np.argsort(keys)
            pos = np.empty(len(keys), dtype=np.int64)
            pos[order] = np.searchsorted(self.keys, keys[order])
        else:
            pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos] == keys
        return np.where(found, pos, -1).astype(np.int64)

    def counts(self, among: np.ndarray | None = None) -> dict[str, int]:
        """ok / error / skipped counts, of all keys or of the index positions ``among``."""
        status = self.status if among is None else self.status[among]
        return {name: int((status == code).sum()) for name, code in STATUS_CODES.items()}

    def places(self, key_arrays: Sequence[np.ndarray]) -> RowPlaces:
        """Where the result of each of ``key_arrays``'s keys is, aligned with them (a chunk
        at a time): all that assembling OUTPUT needs, 8 bytes a key instead of 17."""
        part, row = [], []
        for keys in key_arrays:
            part.append(np.full(len(keys), -1, dtype=np.int32))
            row.append(np.zeros(len(keys), dtype=np.int32))
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                have = np.flatnonzero(pos >= 0)
                part[-1][start + have] = self.part[pos[have]]
                row[-1][start + have] = self.row[pos[have]]
        return RowPlaces(tuple(part), tuple(row))

    def counts_of(self, key_arrays: Sequence[np.ndarray]) -> tuple[dict[str, int], int]:
        """(status counts, keys without a result) over ``key_arrays``, a chunk at a time so
        that a million keys need no million-entry temporaries."""
        counts = dict.fromkeys(STATUS_CODES, 0)
        missing = 0
        for keys in key_arrays:
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                found = pos[pos >= 0]
                missing += len(pos) - len(found)
                for name, count in self.counts(found).items():
                    counts[name] += count
        return counts, missing


@dataclass(frozen=True)
class RowPlaces:
    """Per key array given to ``ResultLocations.places`` (one per model and sample), the
    part and row of each key's result, aligned with the keys; part -1: no result."""

    part: tuple[np.ndarray, ...]
    row: tuple[np.ndarray, ...]


@dataclass
class ResultIndex(ResultLocations):
    """``ResultLocations`` plus what each key's result spent, for budgets and ``status``:
    tokens and cost, both 0 for a result that no request paid for (a dedup copy, a cached
    answer), whose OUTPUT row still shows the usage of the answer it got."""

    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    cost_usd: np.ndarray

    @classmethod
    def empty(cls) -> ResultIndex:
        z = np.zeros(0, dtype=np.int64)
        return cls(
            np.zeros(0, dtype=np.uint64),
            z,
            z,
            np.zeros(0, dtype=np.int8),
            z,
            z,
            np.zeros(0, dtype=np.float64),
        )


def rows_of(path: Path) -> int:
    """A part's row count; a part that cannot say is named (a run sets it aside first, but
    ``pipeline status`` reads the checkpoint as it is)."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise OutputError(
            f"checkpoint part {path} is damaged ({type(exc).__name__}); the next "
            "`pipeline run` of this OUTPUT sets it aside and sends its rows again"
        ) from None


INDEX_COLUMNS = ("key", "status", "prompt_tokens", "completion_tokens", "cost_usd", "cost_source")
NOT_SPENT = pa.array([COST_DEDUP, COST_CACHE])  # cost sources of results that no request paid for
INDEX_ARRAYS = ("keys", "part", "row", "status", "prompt_tokens", "completion_tokens", "cost_usd")
# the columns load_index fills from the parts, and their types (a request's tokens fit int32)
FILLED = {
    "keys": np.uint64,
    "status": np.int8,
    "prompt_tokens": np.int32,
    "completion_tokens": np.int32,
    "cost_usd": np.float64,
}


def locate(
    pick: np.ndarray,
    n_base: int,
    base_part: np.ndarray | None,
    base_row: np.ndarray | None,
    numbers: np.ndarray,
    sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(part, row) of each picked position: the first ``n_base`` positions are the saved
    index's (which has them); the rest are the new parts' rows, one part after another."""
    part = np.empty(len(pick), dtype=np.int32)
    row = np.empty(len(pick), dtype=np.int32)
    firsts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + n_base
    for start in range(0, len(pick), LOOKUP_CHUNK):
        chunk = pick[start : start + LOOKUP_CHUNK]
        old = chunk < n_base
        which = np.searchsorted(firsts, chunk, side="right") - 1
        which[old] = 0
        part[start : start + len(chunk)] = numbers[which]
        row[start : start + len(chunk)] = chunk - firsts[which]
        if old.any() and base_part is not None and base_row is not None:
            part[start : start + len(chunk)][old] = base_part[chunk[old]]
            row[start : start + len(chunk)][old] = base_row[chunk[old]]
    return part, row


@dataclass(frozen=True)
class SavedIndex:
    covers: int  # the highest part number it includes
    arrays: dict[str, np.ndarray]


def build_index(new: list[tuple[Path, int]], base: SavedIndex | None) -> ResultIndex:
    """The latest result per key: ``base`` (the saved index, or None) plus the parts ``new``
    ((path, number), in number order), read column by column into arrays allocated once."""
    sizes = np.array([rows_of(path) for path, _ in new], dtype=np.int64)
    n_base = 0 if base is None else len(base.arrays["keys"])
    total = n_base + int(sizes.sum())
    columns = {name: np.empty(total, dtype=dtype) for name, dtype in FILLED.items()}
    base_part = base_row = None
    if base is not None:
        for name, column in columns.items():
            column[:n_base] = base.arrays.pop(name)
        base_part, base_row = base.arrays["part"], base.arrays["row"]
    del base
    codes = pa.array(list(STATUS_CODES))
    at = n_base
    for (path, _), size in zip(new, sizes, strict=True):
        table = pq.read_table(path, columns=list(INDEX_COLUMNS))
        if table.num_rows != size:
            raise OutputError(
                f"Checkpoint part {path} changed while it was read. Parts are written once; "
                "is another process writing this checkpoint?"
            )
        end = at + int(size)
        columns["keys"][at:end] = table.column("key").to_numpy()
        status = pa.compute.index_in(table.column("status"), value_set=codes)
        columns["status"][at:end] = status.to_numpy(zero_copy_only=False)
        # a copy (dedup) or a cached answer spent nothing: its tokens are not counted
        copied = pa.compute.is_in(table.column("cost_source"), value_set=NOT_SPENT)
        for name in ("prompt_tokens", "completion_tokens"):
            spent = pa.compute.if_else(copied, 0, table.column(name).fill_null(0))
            columns[name][at:end] = spent.to_numpy()
        columns["cost_usd"][at:end] = table.column("cost_usd").fill_null(0.0).to_numpy()
        at = end
    del table
    # latest result wins: the rows are in (part, row) order already, so a stable sort by
    # key keeps each key's results in that order; keep the last of each key
    order, sorted_keys, starts = stable_argsort(columns.pop("keys"))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = starts[1:]
    del starts
    everyone = bool(last.all())
    pick = order if everyone else order[last]
    picked = {"keys": sorted_keys if everyone else sorted_keys[last]}
    del order, sorted_keys, last
    picked["part"], picked["row"] = locate(
        pick, n_base, base_part, base_row, np.array([n for _, n in new]), sizes
    )
    for name in FILLED:
        if name != "keys":
            picked[name] = columns.pop(name)[pick]
    return ResultIndex(**picked)


def save_index(path: Path, parts: dict[int, Path], index: ResultIndex) -> None:
    """Keep ``index``, built from ``parts`` (number -> file), for the next load."""
    if not parts:
        return
    meta = {
        "version": FORMAT_VERSION,
        "covers": max(parts),
        "parts": len(parts),
        "names": names_digest(parts.values()),
    }
    arrays = {name: getattr(index, name) for name in INDEX_ARRAYS}
    save_arrays(path, meta, arrays)


def saved_index(path: Path, parts: dict[int, Path]) -> SavedIndex | None:
    """The index saved at ``path``, if it covers exactly the parts numbered up to its
    ``covers``: a part set aside (quarantine/) or one written since under another name makes
    it stale (a part number is never used twice, and the name carries the part's checksum)."""
    loaded = load_arrays(path)
    if loaded is None:
        return None
    meta, arrays = loaded
    if set(arrays) != set(INDEX_ARRAYS):
        return None
    covers = meta.get("covers")
    if meta.get("version") != FORMAT_VERSION or not isinstance(covers, int):
        return None
    covered = [file for number, file in parts.items() if number <= covers]
    if len(covered) != meta.get("parts") or names_digest(covered) != meta.get("names"):
        return None
    if len({len(a) for a in arrays.values()}) != 1:
        return None
    return SavedIndex(covers=covers, arrays=arrays)
