"""The ``pipeline`` command: a thin shell over the library.

Owns the ``run`` and ``estimate`` commands: parses options, builds the config (defaults <
``--config`` TOML < options), calls the library (``run_batch``, ``estimate_job``), formats,
and maps the error tree to exit codes. No logic of its own. The job option table is in
``cli_options``, error output and the root group in ``cli_shell``, the
``simulate``/``demo``/``cache``/``report`` commands in ``cli_tools``, ``status`` and
``merge`` in ``cli_state``, ``batch ...`` in ``cli_batch``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import click

from .cli_options import SectionedCommand, input_argument, job_options, output_path
from .cli_shell import (
    EXIT_CODES_HELP,
    MainGroup,
    fail,
    os_error_message,
    write_json,
)
from .cli_tools import PACKAGE_DATA as PACKAGE_DATA
from .cli_tools import cache, demo, report, simulate
from .config import RunConfig
from .engine import Executor
from .errors import (
    EXIT_ABORTED,
    EXIT_BATCHES_RUNNING,
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_STORAGE,
    EXIT_USAGE,
    ConfigError,
    LockHeld,
    PipelineError,
    RunAborted,
    UsageError,
)
from .estimate import estimate_total, format_total
from .progress import Reporter
from .records import RunSummary
from .remote_output import check_supported, working_copy
from .runner import Seams, estimate_job, run_batch
from .settings import build_config, load_config_file, parse_param, split_models


@click.group(
    cls=MainGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="batch-prompt-pipeline")
def main() -> None:
    """Push a table of prompts through an OpenAI-compatible chat API.

    Start with `pipeline run --help`; `pipeline demo` runs the whole thing against the
    built-in simulator (no key, no network).
    """


def config_from_options(
    config_path: str | None,
    params: tuple[str, ...],
    stop: tuple[str, ...],
    no_progress: bool | None,
    options: dict[str, Any],
) -> RunConfig:
    file_values = load_config_file(config_path) if config_path else None
    models = split_models(options.get("model") or ())
    options["model"] = None if not models else models[0] if len(models) == 1 else tuple(models)
    options["stop"] = stop
    options["progress"] = False if no_progress else None
    if params:
        options["params"] = dict(parse_param(p) for p in params)
    return build_config(file_values, options, config_path=config_path)


@main.command(cls=SectionedCommand, epilog=EXIT_CODES_HELP)
@input_argument
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    callback=output_path,
    help="Parquet file to write (.parquet); its checkpoint is OUTPUT.checkpoint/ beside it. "
    "May be an s3:// (or gs://...) URI: see the README's object storage section.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    default=None,
    help="Only estimate (as `pipeline estimate`): send nothing.",
)
@job_options
def run(
    input_path: Path,
    output: Path | str,
    config_path: str | None,
    params: tuple[str, ...],
    stop: tuple[str, ...],
    no_progress: bool | None,
    **options: Any,
) -> None:
    """Send each row of INPUT (CSV, Parquet or JSONL) as a chat completion; write OUTPUT.

    Rerunning the same command resumes: only rows without a result are sent.
    """
    summary_json = options.get("summary_json")
    try:
        config = config_from_options(config_path, params, stop, no_progress, options)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE, summary_json)
        return
    suffix = PurePosixPath(str(output)).suffix
    if suffix.lower() not in PARQUET_SUFFIXES:
        fail(
            f"-o {output}: OUTPUT is always a Parquet file; name it "
            f"{str(output).removesuffix(suffix)}.parquet (for CSV afterwards: "
            "pandas.read_parquet(OUTPUT).to_csv(...)).",
            EXIT_USAGE,
            config.summary_json,
        )
    if isinstance(output, str):
        try:
            check_supported(config, output)
        except UsageError as exc:
            fail(str(exc), EXIT_USAGE, config.summary_json)
    if config.dry_run:
        _refuse_run_only(no_progress)
        _estimate(input_path, output, config)
        return
    run_and_exit(input_path, output, config)


def run_and_exit(
    input_path: Path, output: Path | str, config: RunConfig, executor: Executor | None = None
) -> NoReturn:
    """Run the job (answers from ``executor``, else online), report, and exit with the run's
    code; a run that could not start says why in one line (and in --summary-json)."""
    reporter = Reporter(
        progress=config.progress,
        log_format=config.log_format,
        quiet=config.quiet,
        log_interval=config.log_interval,
    )
    summary: RunSummary | None = None
    try:
        if config.engine == "ray":
            from .ray import run_on_ray  # needs the [ray] extra

            summary = run_on_ray(input_path, output, config, reporter)
        else:
            seams = Seams(reporter=reporter, executor=executor)
            summary = run_batch(input_path, output, config, seams)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE, config.summary_json)
    except LockHeld as exc:
        fail(str(exc), EXIT_LOCKED, config.summary_json)
    except RunAborted as exc:
        summary = getattr(exc, "summary", None)
        write_summary(config.summary_json, summary)
        if summary is None:
            fail(str(exc), EXIT_ABORTED, config.summary_json)
            return
        # the reason was printed when the run stopped and is in the summary: say what next
        reporter.error(
            f"exit {summary.exit_code} ({summary.exit_reason}): completed rows are kept; "
            f"{_NEXT_STEP.get(summary.exit_code, 'rerun the same command to continue')}.",
            exit_code=summary.exit_code,
            exit_reason=summary.exit_reason,
        )
        sys.exit(summary.exit_code)
    except OSError as exc:
        # the output directory cannot be made or written (permissions, a file in the way)
        fail(os_error_message(exc, Path(output)), EXIT_USAGE, config.summary_json)
    except PipelineError as exc:  # pragma: no cover - every subclass is handled above
        fail(str(exc), EXIT_USAGE, config.summary_json)
    if summary.rows_total == 0:
        reporter.note(
            f"shard {config.shard} takes none of {input_path}'s rows: nothing to send."
            if config.shard
            else f"{input_path} has 0 rows (a header only?): nothing to send."
        )
    write_summary(config.summary_json, summary)
    sys.exit(summary.exit_code)


PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_NEXT_STEP = {
    EXIT_ABORTED: "fix the cause above (key, credits, quota, --base-url), then rerun the "
    "same command to continue",
    EXIT_BUDGET: "rerun with a larger --max-cost / --max-total-tokens to continue",
    EXIT_INTERRUPTED: "rerun the same command to continue",
    EXIT_STORAGE: "free space or fix permissions, then rerun the same command",
    EXIT_BATCHES_RUNNING: "batches are still running: run the same command again later to "
    "collect them",
}


@main.command(cls=SectionedCommand)
@input_argument
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    callback=output_path,
    help="Leave out the rows this OUTPUT's checkpoint already has (a path or an s3:// URI).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.option(
    "--typical-completion",
    type=click.IntRange(min=0),
    metavar="TOKENS",
    help="Completion tokens a typical answer has (e.g. completion_tokens / sent from an "
    "earlier run's summary). [default: 200, or --max-tokens if lower]",
)
@job_options
def estimate(
    input_path: Path,
    output: Path | str | None,
    as_json: bool,
    typical_completion: int | None,
    config_path: str | None,
    params: tuple[str, ...],
    stop: tuple[str, ...],
    no_progress: bool | None,
    **options: Any,
) -> None:
    """Rows, tokens and cost that `run` with the same options would send. Sends nothing.

    Completion tokens and cost are a range: 0 to --max-tokens per request, with a typical
    figure. Duplicates and cached responses are counted apart. Exit 2 on bad input.
    Options that only shape a run (--restart, --grace, --log-format ...) are refused.
    """
    _refuse_run_only(no_progress)
    try:
        config = config_from_options(config_path, params, stop, no_progress, options)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
        return
    _estimate(input_path, output, config, as_json=as_json, typical_completion=typical_completion)


def _refuse_run_only(no_progress: bool | None) -> None:
    """An estimate (``estimate``, ``run --dry-run``) given an option that only a run uses."""
    ctx = click.get_current_context()
    given = [
        name
        for name in _RUN_ONLY
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    ]
    if no_progress:
        given.insert(0, "no_progress")
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        it = "it" if len(given) == 1 else "them"
        fail(
            f"{flags}: only a `pipeline run` that sends uses {it}; an estimate sends "
            f"nothing and writes nothing. Drop {it}.",
            EXIT_USAGE,
        )


# job options that only change how a run runs, logs or reports: refused by an estimate
# (--retry-failed too: an estimate counts a row with any result as done)
_RUN_ONLY = (
    "batch_dialect",
    "batch_max_requests",
    "poll_interval",
    "wait",
    "resubmit_cancelled",
    "retry_failed",
    "restart",
    "shard",
    "engine",
    "ray_address",
    "ray_actors",
    "overwrite",
    "summary_json",
    "grace",
    "max_runtime",
    "log_format",
    "log_interval",
    "quiet",
)


def _estimate(
    input_path: Path,
    output: Path | str | None,
    config: RunConfig,
    *,
    as_json: bool = False,
    typical_completion: int | None = None,
) -> None:
    try:
        if isinstance(output, str):  # on object storage: what its checkpoint has
            with working_copy(output, overwrite=True, publish_output=False) as local:
                results = estimate_job(
                    input_path, local, config, typical_completion=typical_completion
                )
        else:
            results = estimate_job(
                input_path, output, config, typical_completion=typical_completion
            )
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
        return
    if len(results) == 1:
        click.echo(json.dumps(results[0].as_dict()) if as_json else results[0].format())
    elif as_json:
        total = estimate_total(results)
        click.echo(json.dumps({"models": [r.as_dict() for r in results], "total": total}))
    else:
        click.echo("\n\n".join(r.format() for r in results))
        click.echo("\n" + format_total(estimate_total(results)))


def write_summary(path: str | None, summary: RunSummary | None) -> None:
    if path and summary is not None:
        write_json(path, summary.as_dict())


for _command in (simulate, demo, cache, report):
    main.add_command(_command)


# the command groups that import this module register themselves here
from . import cli_batch, cli_state  # noqa: E402,F401
