"""``merge_output``: OUTPUT written on demand from its checkpoint (``pipeline merge``).

Shards of a job (``--shard``) write OUTPUT only when the last of them finds every result
there; ``merge_output`` writes it now, with the rows that have no result yet ``pending``,
and says which shard owes how many. It reads the input and settings the checkpoint's
manifest recorded (or the input it is given), takes the shards' setup turn so that no shard
finishes meanwhile, and sends nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .config import RunConfig
from .errors import EXIT_FAILED_ROWS, EXIT_OK, LockHeld, NoCheckpoint, OutputError
from .index_join import PlacesByWindow
from .lock import WaitLock
from .output import output_state, record_output, write_recorded
from .planning import read_plan
from .shards import ShardTally
from .writer import output_spec, write_output


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_output`` wrote and found missing."""

    output: str
    rows_total: int
    counts: dict[str, int]
    pending: int
    missing_by_shard: dict[str, int]  # "I/N" (N of the last shard run) -> results owed
    exit_code: int  # 0 every result ok or skipped; 1 some error, invalid or pending

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def manifest_config(manifest: dict[str, Any]) -> RunConfig:
    """The settings a checkpoint's manifest recorded, as a config (without ``--shard``)."""
    recorded = manifest.get("config")
    if not isinstance(recorded, dict):
        raise OutputError("the checkpoint's manifest records no settings; rerun a shard first")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(RunConfig):
        if field.name in recorded:
            value = recorded[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
    values.update(shard=None, proxy=None)
    return RunConfig(**values)


def merge_output(
    output: Path | str, data: Any = None, *, destination: Path | None = None
) -> MergeResult:
    """Write OUTPUT from its checkpoint now (rows without a result ``pending``).

    ``data`` is the job's input (default: the path the manifest recorded); ``destination``
    writes that file instead of OUTPUT and records nothing (a preview). Raises
    ``OutputError`` when there is no checkpoint, its input is gone, or OUTPUT is a file this
    tool did not write; ``LockHeld`` while a run of the whole job is writing it.
    """
    output = Path(output)
    checkpoint = Checkpoint(output)
    manifest = checkpoint.read_manifest()
    if not manifest:
        raise NoCheckpoint(f"no checkpoint for {output} (looked for {checkpoint.dir}).")
    if data is None:
        data = manifest.get("input")
        if data is None or not Path(str(data)).exists():
            raise OutputError(
                f"the input this checkpoint was made from ({data}) is not there (it is read "
                "again to write OUTPUT in input order): give it with --input PATH."
            )
        data = Path(str(data))
    if destination is None and output.exists() and not checkpoint.output_is_ours():
        raise OutputError(
            f"{output} exists and was not written from this checkpoint: move it away first."
        )
    config = manifest_config(manifest)
    setup = WaitLock(checkpoint.dir / "setup.lock")
    setup.hold()
    try:
        holder = Checkpoint.lock_holder(output)
        if holder is not None:
            raise LockHeld(f"a run of the whole job is writing {output} ({holder}): it writes it")
        plan = read_plan(data, config, output)
        index = checkpoint.load_index()
        places = PlacesByWindow(index, plan.unit_keys)  # a window of rows at a time
        counts, pending = places.counts()
        missing = _missing_by_shard(checkpoint, places, plan.rows)
        if destination is not None:
            write_output(plan.source, output_spec(config), places, checkpoint, destination)
        else:
            manifest = checkpoint.read_manifest()
            write_recorded(plan, config, places, output, manifest)
            record_output(manifest, output, output_state(plan, config))
            checkpoint.write_manifest(manifest)
        places.close()
        index.close()
    finally:
        setup.release()
    failed = pending or counts.get("error", 0) or counts.get("invalid", 0)
    return MergeResult(
        output=str(output),
        rows_total=sum(len(keys) for keys in plan.unit_keys),
        counts=dict(counts),
        pending=pending,
        missing_by_shard=missing,
        exit_code=EXIT_FAILED_ROWS if failed else EXIT_OK,
    )


def _missing_by_shard(checkpoint: Checkpoint, places: PlacesByWindow, rows: int) -> dict[str, int]:
    """Results owed per shard of the last shard run's N (empty when no shard ran)."""
    tally = ShardTally.of(checkpoint.dir, rows)
    if tally is None or len(tally.shard_keys) != rows:
        return {}
    for _, start, answered in places.answered():
        tally.add(start, answered)  # (the shard keys are per row: unit u's row r is row r)
    owed = tally.total - tally.done
    return {f"{i}/{tally.count}": int(owed[i]) for i in range(tally.count)}
