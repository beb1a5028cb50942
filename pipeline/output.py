"""The run's record in its checkpoint manifest, and OUTPUT written at the end of a run.

``start_manifest`` marks the run as running and records the keys of every unit (so that the
next run can tell rows removed from the input); ``finish_output`` writes OUTPUT from the
checkpoint, every input row in input order (``writer.write_output``), unless nothing changed
since the last OUTPUT, the user stopped hard, or the checkpoint could not be written, and
records OUTPUT's signature and shape in the manifest. It sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import remote_output, shards
from .checkpoint import file_signature
from .config import RunConfig
from .fingerprint import fingerprint as fingerprint_of_config
from .fingerprint import fingerprint_parts
from .index_join import PlacesByWindow
from .memory import release_memory
from .planning import KEY_SCHEME, Plan
from .recording import Recorder
from .result_index import KeyArray, ResultIndex
from .stopping import Stop
from .writer import output_spec, write_output


def start_manifest(plan: Plan, config: RunConfig) -> dict[str, Any]:
    """The manifest as this run starts (``running``), with the keys of every unit."""
    checkpoint = plan.checkpoint
    manifest = checkpoint.read_manifest()
    fingerprint = fingerprint_of_config(config)
    manifest.update(
        fingerprint=fingerprint,
        fingerprint_parts=fingerprint_parts(config),
        config=config.public_dict(),
        input=plan.source.name,
        rows_total=plan.rows * len(plan.unit_keys),
        created_at=manifest.get("created_at", time.time()),
        # what each part names as its job (with the fingerprint): a part of another job,
        # or of this checkpoint before a --restart, is never used
        job_id=manifest.get("job_id")
        or checkpoint.job_id
        or remote_output.job_id_for(checkpoint.dir, fingerprint)
        or uuid.uuid4().hex,
        key_scheme=1 if plan.ids_only else KEY_SCHEME,
        legacy_upto=checkpoint.legacy_upto,
    )
    if plan.shard is None:  # shards say whether they run in their own records
        manifest["running"] = True
    checkpoint.identity = {"fingerprint": fingerprint, "job": manifest["job_id"]}
    checkpoint.write_manifest(manifest)
    checkpoint.write_keys(plan.unit_keys, plan.rows)  # made and written a unit at a time
    if plan.shard is None:  # (a shard reads its own: keys.npy is every shard's to replace)
        plan.read_keys_from(checkpoint.recorded_unit_keys(len(plan.unit_keys), plan.rows))
    if plan.shard is not None and plan.shard_keys is not None:
        shards.write_shard_keys(checkpoint.dir, plan.shard_keys)
        shards.write_record(
            checkpoint.dir,
            plan.shard,
            state="running",
            started_at=time.time(),
            results=plan.results_in_scope(),
            todo=plan.pending,
        )
    return manifest


async def finish_output(
    plan: Plan,
    config: RunConfig,
    output: Path,
    manifest: dict[str, Any],
    recorder: Recorder,
    stop: Stop,
    todo: int,
) -> tuple[dict[str, int], int, int]:
    """Write OUTPUT from the checkpoint (unless nothing changed, the user stopped hard, or
    the checkpoint cannot be written) and the final manifest; returns the status counts
    (of this run's shard, with the results the other shards still owe: OUTPUT is written
    when every shard is done, by the shard that finishes, in turn with the others)."""
    checkpoint = plan.checkpoint
    if plan.shard is not None:
        await asyncio.to_thread(checkpoint.hold_setup)
        # OUTPUT on object storage: what the other hosts' shards recorded since this one began
        await asyncio.to_thread(remote_output.pull, checkpoint.dir)
        manifest = {**checkpoint.read_manifest(), "job_id": manifest["job_id"]}
    unit_keys: Sequence[KeyArray] = plan.unit_keys
    if plan.shard is None:  # from here on the keys are read from the checkpoint in slices
        unit_keys = checkpoint.recorded_unit_keys(len(plan.unit_keys), plan.rows)
        plan.let_go_of_keys()
    index, plan.index = plan.index, ResultIndex.empty()
    if todo or plan.shard:
        del index  # not held twice while it is rebuilt
        index = checkpoint.load_index()
    if checkpoint.parts_read and recorder.storage_error is None:
        with contextlib.suppress(OSError):  # a cache: the next run rebuilds it if missing
            checkpoint.save_index(index)  # the next run starts from it
    # from here on where each input row's result is, a window of rows at a time
    places = PlacesByWindow(index, unit_keys)
    counts, job_pending = None, 0
    if plan.shard is not None:
        job_pending = places.counts()[1]
        counts = places.counts(plan.shard_rows)
        job_pending -= counts[1]
    release_memory()
    state = output_state(plan, config)
    # a shard that finishes just after the one that wrote OUTPUT finds it up to date
    unchanged = (
        (not todo or plan.shard is not None)
        # a DataFrame has no file signature to tell an edit of another column by: rewrite
        and plan.source.path is not None
        and manifest.get("output_state") == state
        and checkpoint.output_is_ours()
    )
    # a checkpoint that cannot be written cannot feed OUTPUT: the old OUTPUT stays; a shard
    # leaves it to the one that finds every result there
    if not job_pending and not stop.skips_output and recorder.storage_error is None:
        try:
            if not unchanged:
                await asyncio.to_thread(write_recorded, plan, config, places, output, manifest)
            record_output(manifest, output, state)
        except OSError as exc:
            recorder.storage_failed_at_end(exc, output)
    if counts is None:  # (counted as OUTPUT was written: no lookup again)
        counts = places.counts()
    places.close()
    index.close()
    if plan.shard is None:
        manifest["running"] = False
    try:
        checkpoint.write_manifest(manifest)
        if plan.shard is not None:
            shards.write_record(
                checkpoint.dir,
                plan.shard,
                state="stopped" if stop.kind is not None or counts[1] else "done",
                finished_at=time.time(),
                counts=counts[0],
                pending=counts[1],
            )
    except OSError as exc:
        recorder.storage_failed_at_end(exc, checkpoint.manifest_path)
    finally:
        checkpoint.end_setup()
    return counts[0], counts[1], job_pending


def write_recorded(
    plan: Plan, config: RunConfig, places: PlacesByWindow, output: Path, manifest: dict[str, Any]
) -> None:
    """Write OUTPUT (``writer.write_output``), recording the new file's signature in the
    manifest just before it replaces OUTPUT (a crash between the two is recognised)."""
    checkpoint = plan.checkpoint

    def record_next(signature: dict[str, int] | None) -> None:
        manifest["output_signatures"] = [signature]
        checkpoint.write_manifest(manifest)

    write_output(plan.source, output_spec(config), places, checkpoint, output, record_next)


def record_output(manifest: dict[str, Any], output: Path, state: dict[str, Any]) -> None:
    """Note in ``manifest`` that OUTPUT is this file, written from ``state``."""
    manifest.update(
        output_signature=file_signature(output), output_state=state, output_signatures=[]
    )


def output_state(plan: Plan, config: RunConfig) -> dict[str, Any]:
    parts = plan.checkpoint.part_paths()
    source_sig = file_signature(plan.source.path) if plan.source.path else None
    return {
        "input": plan.source.name,
        "input_signature": source_sig,
        "limit": config.limit,
        "last_part": parts[-1].name if parts else None,
        "parts": len(parts),  # shards running at once interleave their part numbers
        "rows": plan.rows,
        "keys": plan.keys_digest,  # the same rows in another order are another OUTPUT
        "models": list(plan.models),
        **_output_shape(config),
    }


def _output_shape(config: RunConfig) -> dict[str, Any]:
    """The options that shape OUTPUT without changing a response: a change rewrites OUTPUT
    even when nothing is sent. Only those not at their default, so that the state of a run
    that sets none stays what it was."""
    shape = {
        "wide": config.wide,
        "samples": config.samples if config.n > 1 else "list",
        "score": config.score,
        "expected_column": config.expected_column,
        "schema_prefix": config.schema_prefix,
    }
    defaults = {"wide": False, "samples": "list", "score": None, "expected_column": None}
    return {name: value for name, value in shape.items() if value != defaults.get(name, "")}
