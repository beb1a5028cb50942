"""Which units of a plan need a result (``todo``) and which of them are sent (``send``):
the checkpoint's index says what is done, ``--retry-failed`` what is redone, a shard which
rows are its own, and ``--dedup`` which rows follow or copy another row of their prompt.
Reads the index; writes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .array_file import take
from .config import RunConfig
from .keys import RowKeys
from .records import STATUS_CODES
from .result_index import LOOKUP_CHUNK, SUPERSEDED, KeyArray, ResultIndex


@dataclass
class Work:
    """Which units need a result (``todo``) and which of them are sent (``send``)."""

    todo: np.ndarray
    send: np.ndarray
    present: np.ndarray  # per index position: its key is one of this input's units
    followers: dict[int, list[int]] = field(default_factory=dict)
    copy_from: list[int] = field(default_factory=list)
    copy_to: list[int] = field(default_factory=list)


def what_to_send(
    index: ResultIndex,
    row_keys: RowKeys,
    unit_keys: Sequence[KeyArray],
    config: RunConfig,
    rows: np.ndarray | None = None,
) -> Work:
    """Which units need a result and which are sent; only among ``rows`` (a shard's) when
    given, and a shard holds every row of a prompt, so --dedup stays within it."""
    n = len(row_keys.keys)
    todo = np.zeros((n, len(unit_keys)), dtype=bool)
    # a superseded result's key has a later one: only the latest counts as present or not
    work = Work(todo=todo, send=np.zeros_like(todo), present=index.status == SUPERSEDED)
    for j in range(len(unit_keys)):
        mkeys = unit_keys[j]  # (made now, when the keys are made a unit at a time)
        # a unit at a time: 4 bytes a row (none for a first run: nothing is done)
        places = index.places([mkeys]).at[0] if index.size else None
        # a chunk of rows at a time: the temporaries stay small at any row count
        for at in range(0, n, LOOKUP_CHUNK):
            chunk = slice(at, at + LOOKUP_CHUNK)
            done = np.zeros(len(todo[chunk]), dtype=bool)
            if places is not None:
                pos = places[chunk]
                done = pos != np.iinfo(pos.dtype).max
                found = pos[done]
                if config.retry_failed:
                    status = index.status[found]
                    failed = (status == STATUS_CODES["error"]) | (status == STATUS_CODES["invalid"])
                    done[done] = ~failed
                work.present[found] = True
            if rows is not None:
                done |= ~rows[chunk]
            np.logical_not(done, out=todo[chunk, j])
            work.send[chunk, j] = todo[chunk, j]
        del places
        if config.dedup:
            _dedup(work, j, mkeys, row_keys, index)
        del mkeys  # before the next unit's are made
    return work


def _dedup(work: Work, j: int, mkeys: KeyArray, row_keys: RowKeys, index: ResultIndex) -> None:
    """A later row with the same prompt as an earlier one is not sent: it follows its first
    row's request, or gets a copy of a stored result of its prompt: its first row's, or,
    when only a later row of the prompt has one (with ``--id-column``, a row added before
    it), that row's, which then serves the first row too. Nothing answered is paid twice."""
    todo = work.todo[:, j]
    dups, leads = row_keys.duplicates, row_keys.leaders
    served = ~todo[dups] & todo[leads]  # a later row is answered, the first is not
    source: dict[int, int] = {}  # first row -> the earliest answered later row
    for leader, row in zip(leads[served].tolist(), dups[served].tolist(), strict=True):
        source.setdefault(leader, row)
    wanted = todo[dups]
    duplicates, leaders = dups[wanted], leads[wanted]
    copy_rows = list(source)  # the first rows served by a later row's answer
    copy_from = [source[leader] for leader in copy_rows]
    work.send[copy_rows, j] = False
    work.send[duplicates, j] = False
    pending = todo[leaders] & ~np.isin(leaders, copy_rows)
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
