"""Which units of a plan need a result (``todo``) and which of them are sent (``send``):
the checkpoint's index says what is done, ``--retry-failed`` what is redone, a shard which
rows are its own, and ``--dedup`` which rows follow or copy another row of their prompt.
Reads the index; writes nothing. A chunk of rows at a time: what is held per row is the
``send`` bits (an eighth of a byte a row and unit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .array_file import take
from .config import RunConfig
from .keys import RowKeys
from .records import STATUS_CODES
from .result_index import KeyArray, ResultIndex
from .row_bits import RowBits, RowMask

PLAN_ROWS = 1 << 20  # rows looked up at once (a multiple of 8): ~20 MB of temporaries


@dataclass
class Work:
    """Which units are sent (``send``); how many need a result (``todo``) and how many
    have one (``done``), among the rows in scope."""

    send: RowBits
    present: np.ndarray  # a bit per index position: its key is one of this input's units
    todo: int = 0
    done: int = 0
    found: int = 0  # index keys that are one of this input's units (each is found once)
    followers: dict[int, list[int]] = field(default_factory=dict)
    copy_from: list[int] = field(default_factory=list)
    copy_to: list[int] = field(default_factory=list)


@dataclass
class _Sparse:
    """Whether the duplicate rows and their first rows need a result, for ``--dedup``."""

    dups: np.ndarray
    leads: np.ndarray
    todo_dups: np.ndarray = field(init=False)
    todo_leads: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.todo_dups = np.zeros(len(self.dups), dtype=bool)
        self.todo_leads = np.zeros(len(self.leads), dtype=bool)

    def note(self, start: int, todo: np.ndarray) -> None:
        """Take ``todo`` of rows ``start..`` for the duplicates and first rows among them."""
        stop = start + len(todo)
        lo, hi = np.searchsorted(self.dups, [start, stop])
        self.todo_dups[lo:hi] = todo[self.dups[lo:hi] - start]
        here = np.flatnonzero((self.leads >= start) & (self.leads < stop))
        self.todo_leads[here] = todo[self.leads[here] - start]


def what_to_send(
    index: ResultIndex,
    row_keys: RowKeys,
    unit_keys: Sequence[KeyArray],
    config: RunConfig,
    rows: RowMask | None = None,
) -> Work:
    """Which units need a result and which are sent; only among ``rows`` (a shard's) when
    given, and a shard holds every row of a prompt, so --dedup stays within it."""
    n = len(row_keys.keys)
    work = Work(send=RowBits(n, len(unit_keys)), present=position_bits(index.positions))
    for j in range(len(unit_keys)):
        keys = unit_keys[j]
        sparse = _Sparse(row_keys.duplicates, row_keys.leaders) if config.dedup else None
        for at in range(0, n, PLAN_ROWS):
            done = _done(index, keys[at : at + PLAN_ROWS], config, work)
            if rows is not None:
                work.done += int((done & rows[at : at + PLAN_ROWS]).sum())
                done |= ~rows[at : at + PLAN_ROWS]
            else:
                work.done += int(done.sum())
            todo = ~done
            work.todo += int(todo.sum())
            work.send.put(j, at, todo)
            if sparse is not None:
                sparse.note(at, todo)
        if sparse is not None:
            _dedup(work, j, keys, sparse, index)
    return work


def _done(index: ResultIndex, keys: np.ndarray, config: RunConfig, work: Work) -> np.ndarray:
    """Which of ``keys`` have a result (not a failed one, with --retry-failed); counts
    them found and marks their positions present."""
    if not index.size:  # a first run: nothing is done
        return np.zeros(len(keys), dtype=bool)
    places = index.places([keys]).at[0]
    done = places != np.iinfo(places.dtype).max
    work.found += int(done.sum())
    mark(work.present, places[done])
    if config.retry_failed:
        status = index.status[places[done]]
        failed = (status == STATUS_CODES["error"]) | (status == STATUS_CODES["invalid"])
        done[done] = ~failed
    return done


def _dedup(work: Work, j: int, mkeys: KeyArray, sparse: _Sparse, index: ResultIndex) -> None:
    """A later row with the same prompt as an earlier one is not sent: it follows its first
    row's request, or gets a copy of a stored result of its prompt: its first row's, or,
    when only a later row of the prompt has one (with ``--id-column``, a row added before
    it), that row's, which then serves the first row too. Nothing answered is paid twice."""
    dups, leads = sparse.dups, sparse.leads
    served = ~sparse.todo_dups & sparse.todo_leads  # a later row is answered, the first not
    source: dict[int, int] = {}  # first row -> the earliest answered later row
    for leader, row in zip(leads[served].tolist(), dups[served].tolist(), strict=True):
        source.setdefault(leader, row)
    wanted = sparse.todo_dups
    duplicates, leaders = dups[wanted], leads[wanted]
    copy_rows = list(source)  # the first rows served by a later row's answer
    copy_from = [source[leader] for leader in copy_rows]
    work.send.clear(j, np.array(copy_rows, dtype=np.int64))
    work.send.clear(j, duplicates)
    pending = sparse.todo_leads[wanted] & ~np.isin(leaders, copy_rows)
    followed = zip(
        take(mkeys, leaders[pending]).tolist(),
        take(mkeys, duplicates[pending]).tolist(),
        strict=True,
    )
    for leader_key, key in followed:
        work.followers.setdefault(leader_key, []).append(key)
    for i, leader in zip(duplicates[~pending].tolist(), leaders[~pending].tolist(), strict=True):
        copy_rows.append(i)
        copy_from.append(source.get(leader, leader))
    if copy_rows:
        work.copy_from.extend(index.lookup(take(mkeys, np.array(copy_from))).tolist())
        work.copy_to.extend(take(mkeys, np.array(copy_rows)).tolist())


def position_bits(positions: int) -> np.ndarray:
    """A bit per position of an index, all clear (1/8 byte a result)."""
    return np.zeros((positions + 7) // 8, dtype=np.uint8)


def mark(bits: np.ndarray, positions: np.ndarray) -> None:
    """Set the bits of ``positions``."""
    at = positions.astype(np.int64)
    np.bitwise_or.at(bits, at >> 3, (np.uint8(0x80) >> (at & 7).astype(np.uint8)))


def marked(bits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Which of ``positions`` have their bit set."""
    at = positions.astype(np.int64)
    return (bits[at >> 3] & (np.uint8(0x80) >> (at & 7).astype(np.uint8))) != 0
