"""Shards: one job split over N processes by row key (``--shard i/N``), for any scheduler.

Owns which rows a shard takes, the shard's record in ``OUTPUT.checkpoint/shards/`` and how
the part numbers of shards running at once stay apart. A row goes to shard
``mix(row key) % N`` (splitmix64 of the key, so that keys made from ids spread evenly too): all
models and samples of a row go together, and a job split one way can be finished split
another way, because every run counts the results of every shard as done. Shards of one job
share OUTPUT's checkpoint: each holds its own lock (``shards/I-of-N.lock``) and a shared hold
on the run lock, and numbers its parts in its own slot (``part_slot``), so that parts of
shards running at once never take the same number and a later run's parts still come after
every earlier part. It sends nothing and writes no part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import remote_output
from .atomic import write_bytes
from .config import RunConfig
from .errors import ConfigError, LockHeld
from .lock import RunLock, WaitLock, lock_holder
from .row_bits import RowMask
from .saved_arrays import NpyRange, write_key_arrays

# Shards of one job number their parts in interleaved slots: part = round * SLOTS + slot.
MAX_SHARDS = 1024
_Amount = TypeVar("_Amount", int, float)
SHARD_TEXT = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


MASK_ROWS = 1 << 20  # rows a shard's mask is made of at once (a multiple of 8)


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise ConfigError(
                f"--shard {self.index}/{self.count}: the form is I/N with 0 <= I < N "
                f"<= {MAX_SHARDS} (I counts from 0, as a Kubernetes completion index does)."
            )

    @classmethod
    def parse(cls, text: str | tuple[int, int] | Shard) -> Shard:
        """``"2/8"``, ``(2, 8)`` or a ``Shard``."""
        if isinstance(text, Shard):
            return text
        if isinstance(text, tuple | list) and len(text) == 2:
            return cls(int(text[0]), int(text[1]))
        match = SHARD_TEXT.fullmatch(str(text))
        if match is None:
            raise ConfigError(
                f"--shard {text!r}: the form is I/N, e.g. --shard 0/4 for the first of 4 "
                "shards (I counts from 0)."
            )
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """The shard's name in file names: ``I-of-N``."""
        return f"{self.index}-of-{self.count}"

    def rows(self, row_keys: Any) -> RowMask:
        """Which rows (by row key: an array, or a column read in slices) are this shard's."""
        mask = RowMask(len(row_keys))
        for start in range(0, len(row_keys), MASK_ROWS):
            mask.put(start, shard_of(row_keys[start : start + MASK_ROWS], self.count) == self.index)
        return mask


def shard_of(row_keys: np.ndarray, count: int) -> np.ndarray:
    """The shard (0..count-1) of each row key: splitmix64 of the key, modulo ``count``."""
    z = row_keys.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(count)).astype(np.int64)


def first_part(highest: int, slot: int | None) -> int:
    """The first part number a writer takes when the highest number used is ``highest``:
    the next one for a run of the whole job, else the next round's number in ``slot``."""
    if slot is None:
        return highest + 1
    return (highest // MAX_SHARDS + 1) * MAX_SHARDS + slot


def part_step(slot: int | None) -> int:
    """How far apart the part numbers of one writer are."""
    return 1 if slot is None else MAX_SHARDS


# -- the shard records: shards/I-of-N.json -------------------------------------------------


def shards_dir(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / "shards"


def lock_path(checkpoint_dir: Path, shard: Shard) -> Path:
    return shards_dir(checkpoint_dir) / f"{shard.name}.lock"


def write_record(checkpoint_dir: Path, shard: Shard, **fields: Any) -> None:
    """Record this shard's state (merged with what it recorded before)."""
    path = shards_dir(checkpoint_dir) / f"{shard.name}.json"
    record = read_json(path)
    record.update(
        shard=str(shard),
        host=socket.gethostname(),
        pid=os.getpid(),
        updated_at=time.time(),
        **fields,
    )
    write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode())
    remote_output.publish(path, checkpoint_dir)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def records(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Every shard record of the checkpoint, newest first."""
    found = [read_json(path) for path in shards_dir(checkpoint_dir).glob("*-of-*.json")]
    found = [record for record in found if record.get("shard")]
    return sorted(found, key=lambda r: -float(r.get("started_at") or 0))


def latest_count(checkpoint_dir: Path) -> int | None:
    """N of the shard run that started last, or None when no shard ran."""
    found = records(checkpoint_dir)
    return Shard.parse(found[0]["shard"]).count if found else None


class ShardLocks:
    """The locks a shard run holds: the setup turn (while it starts and while it finishes),
    the run lock shared, and its own shard lock. Shards running at once must agree on N."""

    def __init__(self, checkpoint_dir: Path, output: Path, shard: Shard, run_lock: RunLock):
        self.dir = checkpoint_dir
        self.shard = shard
        self.setup = WaitLock(checkpoint_dir / "setup.lock")
        self.run_lock = run_lock
        self.own = RunLock(lock_path(checkpoint_dir, shard), output, f"shard {shard} of")

    def acquire(self) -> bool:
        """Take the locks (the setup turn stays held until ``end_setup``); returns True when
        no other run of the checkpoint is alive. Raises ``LockHeld``."""
        self.setup.hold()
        try:
            alone = self.run_lock.acquire_shared()
            self.own.acquire()
            other = [
                holder
                for path in shards_dir(self.dir).glob("*-of-*.lock")
                if not path.name.endswith(f"-of-{self.shard.count}.lock")
                and (holder := lock_holder(path)) is not None
            ]
            if other:
                raise LockHeld(
                    f"shards of {self.dir.name[: -len('.checkpoint')]} with another N are "
                    f"running ({other[0]}): shards that run at once must use the same N, or "
                    "two of them would send the same rows. Wait for them, or use their N."
                )
        except BaseException:
            self.release()
            raise
        return alone

    def release(self) -> None:
        self.own.release()
        self.run_lock.release()
        self.setup.release()


def shard_holders(checkpoint_dir: Path) -> list[str]:
    """``"shard I/N: holder"`` for every shard of the checkpoint running now."""
    found = []
    for path in sorted(shards_dir(checkpoint_dir).glob("*-of-*.lock")):
        holder = lock_holder(path)
        if holder is not None:
            found.append(f"shard {path.stem.replace('-of-', '/')}: {holder}")
    return found


def write_shard_keys(checkpoint_dir: Path, shard_keys: Any) -> None:
    """Keep the key each input row's shard follows, for ``pipeline status`` per shard
    (written a slice at a time)."""
    path = shards_dir(checkpoint_dir) / "row-keys.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_key_arrays(path, [shard_keys], len(shard_keys))


def budget_share(limit: _Amount | None, spent: _Amount, count: int) -> _Amount | None:
    """A shard's budget: what is spent, plus its 1/N of what is left when it starts (shards
    running at once never pass the job's --max-cost / --max-total-tokens together; a shard
    that starts later, or a rerun, gets its share of what is left then)."""
    if limit is None or count == 1:
        return limit
    share = max(limit - spent, 0) / count
    return type(limit)(spent + (share if isinstance(limit, float) else int(share)))


def share_limits(config: RunConfig) -> RunConfig:
    """--rpm and --tpm are the key's totals: a shard of N takes 1/N of each."""
    if config.shard is None or (config.rpm is None and config.tpm is None):
        return config
    count = Shard.parse(config.shard).count
    return dataclasses.replace(
        config,
        rpm=None if config.rpm is None else config.rpm / count,
        tpm=None if config.tpm is None else config.tpm / count,
    )


class ShardTally:
    """Results and results done per shard of the last shard run's N, for ``pipeline
    status``, added a window of the current input's unit keys (``keys.npy``: unit after
    unit, each of every row) at a time: the shard keys are read a slice at a time."""

    def __init__(self, count: int, shard_keys: Any) -> None:
        self.count, self.shard_keys = count, shard_keys
        self.total = np.zeros(count, dtype=np.int64)
        self.done = np.zeros(count, dtype=np.int64)

    @classmethod
    def of(cls, checkpoint_dir: Path, results: int) -> ShardTally | None:
        """The tally of ``results`` unit keys (None: no shard ran, or another input)."""
        count = latest_count(checkpoint_dir)
        try:
            shard_keys = NpyRange.whole(shards_dir(checkpoint_dir) / "row-keys.npy")
        except (OSError, ValueError):
            return None
        if count is None or not len(shard_keys) or results % len(shard_keys):
            return None  # the input changed since the shards ran
        return cls(count, shard_keys)

    def add(self, start: int, answered: np.ndarray) -> None:
        """Unit keys ``start..`` (``answered``: which have a result)."""
        rows = np.arange(start, start + len(answered), dtype=np.int64) % len(self.shard_keys)
        shard = shard_of(self.shard_keys.take(rows), self.count)
        self.total += np.bincount(shard, minlength=self.count)
        self.done += np.bincount(shard[answered], minlength=self.count)

    def progress(self, checkpoint_dir: Path) -> list[dict[str, Any]]:
        """Per shard: results, done, pending, state (running, done, stopped, interrupted: a
        run that is gone without saying so, or not started), host and last update."""
        recorded = {record["shard"]: record for record in records(checkpoint_dir)}
        found = []
        for index in range(self.count):
            name = f"{index}/{self.count}"
            record = recorded.get(name, {})
            holder = lock_holder(lock_path(checkpoint_dir, Shard(index, self.count)))
            state = str(record.get("state", "not started"))
            if holder is not None:
                state = "running"
            elif state == "running":
                state = "interrupted"
            found.append(
                {
                    "shard": name,
                    "results": int(self.total[index]),
                    "done": int(self.done[index]),
                    "pending": int(self.total[index] - self.done[index]),
                    "state": state,
                    "host": record.get("host"),
                    "updated_at": record.get("updated_at"),
                }
            )
        return found
