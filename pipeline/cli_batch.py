"""``pipeline batch ...``: OpenAI Batch JSONL in and out (``batch.interchange``), and
cancelling a batch run's open batches (``batch.cancelling``).

``export`` writes the Batch input file of the rows a run would send; ``import`` records
result files (OpenAI output and error files, or ``vllm run-batch`` output) into OUTPUT;
``cancel`` cancels OUTPUT's open batches.
Both take the job options of ``pipeline run`` (prompt, model, request options), so that the
bodies, and the row keys in ``custom_id``, are those of the run. Formatting only: the work
is the library's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from .batch.cancelling import cancel_batches
from .batch.interchange import export_requests, import_executor
from .cli import config_from_options, main, run_and_exit
from .cli_options import SectionedCommand, input_argument, job_options
from .cli_shell import fail, os_error_message
from .errors import (
    EXIT_LOCKED,
    EXIT_USAGE,
    ConfigError,
    LockHeld,
    UsageError,
)


@main.group()
def batch() -> None:
    """OpenAI Batch JSONL: export the requests of a run, import results made elsewhere."""


@batch.command("export", cls=SectionedCommand)
@input_argument
@click.option(
    "-o",
    "--output",
    "destination",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The Batch input file to write (.jsonl): one request line per result.",
)
@click.option(
    "--skip-done",
    "done_output",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="OUTPUT",
    help="Leave out the rows this OUTPUT's checkpoint already has.",
)
@job_options
def export_command(
    input_path: Path,
    destination: Path,
    done_output: Path | None,
    config_path: str | None,
    params: tuple[str, ...],
    stop: tuple[str, ...],
    no_progress: bool | None,
    **options: Any,
) -> None:
    """Write the OpenAI Batch input file for the rows of INPUT that still need an answer.

    custom_id is the row's result key; each body is exactly what `pipeline run` sends with
    the same options (one line per sample with --n, seeded). Duplicates are exported once.
    """
    try:
        config = config_from_options(config_path, params, stop, no_progress, options)
        count = export_requests(input_path, destination, config, output=done_output)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        fail(os_error_message(exc, destination), EXIT_USAGE)
    click.echo(f"{destination}: {count} requests")


@batch.command("import", cls=SectionedCommand)
@input_argument
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="OUTPUT (.parquet): its checkpoint gets every matching line.",
)
@click.option(
    "--results",
    "results",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An output or error file (OpenAI Batch, or vllm run-batch); repeatable.",
)
@job_options
def import_command(
    input_path: Path,
    output: Path,
    results: tuple[Path, ...],
    config_path: str | None,
    params: tuple[str, ...],
    stop: tuple[str, ...],
    no_progress: bool | None,
    **options: Any,
) -> None:
    """Record the result lines that match rows of INPUT into OUTPUT, and write OUTPUT.

    Lines are matched by custom_id (as `pipeline batch export` writes it). Rows without a
    usable line (missing, expired) stay pending: `pipeline run` with the same options then
    sends only those. Exit codes as `pipeline run`.
    """
    try:
        config = config_from_options(config_path, params, stop, no_progress, options)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    run_and_exit(input_path, output, config, import_executor(results, config))


@batch.command("cancel")
@click.argument("output", type=click.Path(path_type=Path))
def cancel_command(output: Path) -> None:
    """Cancel the open batches of OUTPUT's --batch run (stop the run first).

    What a cancelled batch answered before it stopped is kept: the next run of the same
    command collects it. Its other rows stay pending and are not sent again unless that run
    has --resubmit-cancelled. Exit 0 when done; 2 no batch-mode checkpoint or no API key;
    8 a run holds OUTPUT.
    """
    try:
        done = asyncio.run(cancel_batches(output))
    except LockHeld as exc:
        fail(f"{exc} Stop it (SIGTERM), then cancel.", EXIT_LOCKED)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    if not done:
        click.echo(f"{output}: no open batch to cancel")
    for part in done:
        what = {
            "cancelled": f"batch {part.batch_id} cancelled",
            "withdrawn": "never created: withdrawn",
            "unknown": f"not cancelled: {part.reason}",
            "finished": f"batch {part.batch_id} not cancelled ({part.reason}): collected as usual",
        }[part.outcome]
        click.echo(f"part {part.part}: {what}")
    if any(part.outcome != "finished" for part in done):
        click.echo(
            "run the same `pipeline run ... --batch` command to collect what they answered; "
            "their other rows are not sent again unless you add --resubmit-cancelled"
        )
