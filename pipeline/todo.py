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
from .followers import Followers
from .index_join import WindowedPlaces
from .keys import RowKeys
from .records import STATUS_CODES
from .result_index import KeyArray, ResultIndex, found_in
from .row_bits import RowBits, RowMask

PLAN_ROWS = 1 << 20  # rows looked up at once (a multiple of 8): ~20 MB of temporaries
DEDUP_ROWS = 1 << 20  # repeated rows planned at once (--dedup): ~50 MB of temporaries


@dataclass
class Work:
    """Which units are sent (``send``); how many need a result (``todo``) and how many
    have one (``done``), among the rows in scope; under --dedup, which keys follow which
    request and which copy a stored result (arrays, a unit's after another's)."""

    send: RowBits
    present: np.ndarray  # a bit per index position: its key is one of this input's units
    todo: int = 0
    done: int = 0
    found: int = 0  # index keys that are one of this input's units (each is found once)
    leader_keys: list[np.ndarray] = field(default_factory=list)  # sent, followed by:
    follower_keys: list[np.ndarray] = field(default_factory=list)
    copy_from: list[np.ndarray] = field(default_factory=list)  # index positions, copied to:
    copy_to: list[np.ndarray] = field(default_factory=list)  # keys

    def followers(self) -> Followers:
        return Followers.of(self.leader_keys, self.follower_keys)

    def copies(self) -> tuple[np.ndarray, np.ndarray]:
        """(index positions, the keys that take a copy of their results)."""
        return (
            np.concatenate([np.zeros(0, np.int64), *self.copy_from]),
            np.concatenate([np.zeros(0, np.uint64), *self.copy_to]),
        )


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
        found = WindowedPlaces(index, [keys], PLAN_ROWS)  # the index read once a unit
        for at in found.starts():
            done = _done(index, found, at, config, work)
            if rows is not None:
                work.done += int((done & rows[at : at + len(done)]).sum())
                done |= ~rows[at : at + len(done)]
            else:
                work.done += int(done.sum())
            todo = ~done
            work.todo += int(todo.sum())
            work.send.put(j, at, todo)
        found.close()
        if config.dedup and len(row_keys.duplicates):
            _dedup(work, j, keys, (row_keys.duplicates, row_keys.leaders), index)
    return work


def _done(
    index: ResultIndex, found: WindowedPlaces, at: int, config: RunConfig, work: Work
) -> np.ndarray:
    """Which rows of ``found``'s window at row ``at`` have a result (not a failed one,
    with --retry-failed); counts them found and marks their positions present."""
    if not index.size:  # a first run: nothing is done
        return np.zeros(min(found.window, found.rows - at), dtype=bool)
    places = found.at(at).at[0]
    done = places != np.iinfo(places.dtype).max
    work.found += int(done.sum())
    mark(work.present, places[done])
    if config.retry_failed:
        status = index.status[places[done]]
        failed = (status == STATUS_CODES["error"]) | (status == STATUS_CODES["invalid"])
        done[done] = ~failed
    return done


def _dedup(
    work: Work,
    j: int,
    mkeys: KeyArray,
    repeats: tuple[np.ndarray, np.ndarray],
    index: ResultIndex,
) -> None:
    """A later row with the same prompt as an earlier one is not sent: it follows its first
    row's request, or gets a copy of a stored result of its prompt: its first row's, or,
    when only a later row of the prompt has one (with ``--id-column``, a row added before
    it), that row's, which then serves the first row too. Nothing answered is paid twice.
    ``repeats``: the later rows (ascending) and their first rows, aligned; taken
    ``DEDUP_ROWS`` at a time."""
    dups, leads = repeats
    sources, source_rows = _served(work.send, j, dups, leads)
    work.send.clear(j, sources)
    if len(sources):
        work.copy_from.append(index.lookup(take(mkeys, source_rows)))
        work.copy_to.append(np.asarray(take(mkeys, sources), dtype=np.uint64))
    for lo in range(0, len(dups), DEDUP_ROWS):
        wanted = work.send.get(j, dups[lo : lo + DEDUP_ROWS])
        duplicates, leaders = (
            dups[lo : lo + DEDUP_ROWS][wanted],
            leads[lo : lo + DEDUP_ROWS][wanted],
        )
        work.send.clear(j, duplicates)
        at, served = found_in(sources, leaders)
        by_source = np.zeros(len(leaders), dtype=bool)
        by_source[served] = True
        pending = work.send.get(j, leaders) & ~by_source  # their first row is sent: follow
        if pending.any():
            work.leader_keys.append(take(mkeys, leaders[pending]))
            work.follower_keys.append(take(mkeys, duplicates[pending]))
        # the rest copy a stored result: their first row's, or the row that serves it
        copied = ~pending
        if copied.any():
            copy_from = leaders[copied]
            copy_from[by_source[copied]] = source_rows[at[copied][by_source[copied]]]
            work.copy_from.append(index.lookup(take(mkeys, copy_from)))
            work.copy_to.append(np.asarray(take(mkeys, duplicates[copied]), dtype=np.uint64))


def _served(
    send: RowBits, j: int, dups: np.ndarray, leads: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(first rows that need a result where a later row of their prompt has one, sorted;
    the earliest such later row of each), looked at ``DEDUP_ROWS`` repeats at a time."""
    firsts, laters = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo in range(0, len(dups), DEDUP_ROWS):
        d, f = dups[lo : lo + DEDUP_ROWS], leads[lo : lo + DEDUP_ROWS]
        served = ~send.get(j, d) & send.get(j, f)
        firsts.append(f[served])
        laters.append(d[served])
    sources, first = np.unique(np.concatenate(firsts), return_index=True)
    return sources, np.concatenate(laters)[first]  # (dups ascending: the earliest is first)


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
