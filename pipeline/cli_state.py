"""``pipeline status`` and ``pipeline merge``: the state of OUTPUT's run from its checkpoint
(``status.run_status``: rows per status, tokens, cost, lock holder, and a line per shard and
per batch part), and OUTPUT written on demand from every shard's results
(``merging.merge_output``). Formatting and exit codes only: the work is the library's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .checkpoint import checkpoint_dir
from .cli import main
from .cli_options import output_path
from .cli_shell import fail, os_error_message
from .errors import EXIT_LOCKED, EXIT_USAGE, LockHeld, NoCheckpoint, OutputError, UsageError
from .merging import merge_output
from .remote_output import mirror_of, working_copy
from .status import run_status


@contextlib.contextmanager
def _opened(output: Path | str, *, publish: bool) -> Iterator[Path]:
    """OUTPUT's local path: itself, or the working copy of an object-storage URI (brought up
    to date first; with ``publish`` an OUTPUT written meanwhile is PUT to the store)."""
    if not isinstance(output, str):
        yield output
        return
    with working_copy(output, overwrite=True, publish_output=publish) as local:
        try:
            yield local
        except NoCheckpoint:
            raise NoCheckpoint(
                f"no checkpoint for {output} in the store (looked for {output}.checkpoint/)."
            ) from None


@main.command()
@click.argument("output", type=click.Path(), callback=output_path)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(output: Path | str, as_json: bool) -> None:
    """Rows total / ok / error / skipped / pending, tokens, cost and fingerprint of OUTPUT's run.

    Works while a run is going (it reads the checkpoint) and after it; for a job run in
    shards (--shard) a line per shard (done, pending, running/done/stopped). The exit code
    says the state: 0 every row ok or skipped; 1 every row done, some error or invalid; 5 rows
    pending and no run going (rerun to continue); 8 rows pending and a run going;
    2 no checkpoint. OUTPUT may be an object-storage URI (s3://...).
    """
    try:
        with _opened(output, publish=False) as local:
            state = run_status(local)  # on object storage: NoCheckpoint names the URI
            mirror = mirror_of(checkpoint_dir(local))
            if mirror is not None:  # named by its URI; written means: in the store
                state = dataclasses.replace(
                    state, output=str(output), output_written=mirror.output_stored()
                )
    except OutputError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(state.as_dict()))
        sys.exit(state.exit_code)
    counts = state.counts
    click.echo(
        f"{output}: {state.rows_total} rows | {counts['ok']} ok | {counts['error']} error | "
        f"{counts['invalid']} invalid | {counts['skipped']} skipped | "
        f"{state.pending} pending\n"
        f"tokens: {state.prompt_tokens} in, {state.completion_tokens} out; cost "
        + (
            f"unknown (no price for {', '.join(state.unpriced_models)})\n"
            if state.cost_usd is None
            else f"${state.spent_usd:.6f}\n"
        )
        + f"fingerprint: {state.fingerprint} (model {state.model})\n"
        + (f"running: {state.running_by}" if state.running else "running: no")
    )
    for batch in state.batches:
        age = f", {batch['age_s'] / 3600:.1f} h old" if batch["age_s"] is not None else ""
        click.echo(
            f"  batch part {batch['part']} ({batch['model']}, {batch['lines']} lines): "
            f"{batch['stage']}{', ' + batch['batch_id'] if batch['batch_id'] else ''}"
            f"{_provider_view(batch)}{age}"
        )
    for shard in state.shards:
        where = f" on {shard['host']}" if shard["host"] else ""
        click.echo(
            f"  shard {shard['shard']}: {shard['done']}/{shard['results']} done, "
            f"{shard['pending']} pending, {shard['state']}{where}"
        )
    sys.exit(state.exit_code)


@main.command()
@click.argument("output", type=click.Path(), callback=output_path)
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The job's INPUT, when it is no longer at the path the runs recorded.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def merge(output: Path | str, input_path: Path | None, as_json: bool) -> None:
    """Write OUTPUT now from every shard's results (--shard); rows without one are pending.

    The shard that finishes a job writes OUTPUT itself; this writes it before that and says
    which shard owes how many results. Exit 0: every row ok or skipped; 1: some error,
    invalid or pending; 2: no checkpoint, input gone; 8: a run of the whole job is going.
    OUTPUT may be an object-storage URI (s3://...): OUTPUT is then PUT there.
    """
    try:
        with _opened(output, publish=True) as local:
            merged = merge_output(local, input_path)
    except LockHeld as exc:
        fail(str(exc), EXIT_LOCKED)
    except (OutputError, UsageError) as exc:
        fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        fail(os_error_message(exc, Path(output)), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(merged.as_dict()))
        sys.exit(merged.exit_code)
    counts = merged.counts
    owed = ", ".join(f"shard {name}: {n}" for name, n in merged.missing_by_shard.items() if n)
    click.echo(
        f"wrote {output}: {merged.rows_total} results | {counts['ok']} ok | "
        f"{counts['error']} error | {counts['invalid']} invalid | {counts['skipped']} skipped "
        f"| {merged.pending} pending"
        + (f"\nmissing: {owed} (run those shards again)" if owed else "")
    )
    sys.exit(merged.exit_code)


def _provider_view(batch: dict[str, Any]) -> str:
    """`` (openai: in_progress, 10/25 done, 1 failed)``: the batch as its last poll saw it."""
    if not batch.get("dialect") and batch.get("provider_status") is None:
        return ""
    seen = [str(batch["provider_status"])] if batch.get("provider_status") else []
    if batch.get("completed") is not None:
        seen.append(f"{batch['completed']}/{batch.get('total') or batch['lines']} done")
    if batch.get("failed"):
        seen.append(f"{batch['failed']} failed")
    return f" ({batch.get('dialect') or '?'}{': ' if seen else ''}{', '.join(seen)})"
