"""The ``pipeline`` command: a thin shell over the library.

Parses options, builds the config (defaults < ``--config`` TOML < options), calls
``run_batch``, and maps the error tree to messages and exit codes. No logic of its own.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from .cli_options import SectionedCommand, job_options
from .config import (
    RunConfig,
    build_config,
    load_config_file,
    parse_param,
    split_models,
)
from .errors import (
    EXIT_ABORTED,
    EXIT_BUDGET,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_STORAGE,
    EXIT_USAGE,
    ConfigError,
    LockHeld,
    OutputError,
    PipelineError,
    RunAborted,
    UsageError,
    exit_reason,
)
from .estimate import estimate_total, format_total
from .progress import Reporter
from .records import RunSummary
from .runner import Seams, estimate_job, run_batch
from .status import run_status

PACKAGE_DATA = Path(__file__).resolve().parent / "data"  # the demo job and the price table

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code}  {name}: {meaning}" for code, (name, meaning) in EXIT_CODES.items()
)


def _wants_json(args: list[str]) -> bool:
    """Did the command line ask for JSON logs (errors included)?"""
    return any(
        a == "--log-format=json" or (a == "--log-format" and b == "json")
        for a, b in zip(args, [*args[1:], ""], strict=True)
    )


def _json_errors() -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and (
        ctx.params.get("log_format") == "json" or bool(ctx.find_root().meta.get("json_errors"))
    )


def _error_line(message: str, code: int) -> str:
    if _json_errors():
        return json.dumps(
            {
                "ts": round(time.time(), 3),
                "event": "error",
                "message": message,
                "exit_code": code,
                "exit_reason": exit_reason(code),
            },
            ensure_ascii=False,
        )
    return f"pipeline: error: {message}"


def _fail(message: str, code: int, summary_json: str | None = None) -> NoReturn:
    """One line on stderr (a JSON object under --log-format json), then exit ``code``.

    With --summary-json the file gets ``{"exit_code", "exit_reason", "error"}``, so a cron
    job reads why nothing ran from the same place as a run's figures."""
    click.echo(_error_line(message, code), err=True)
    if summary_json:
        _write_json(
            summary_json,
            {"exit_code": code, "exit_reason": exit_reason(code), "error": message},
        )
    sys.exit(code)


class _Main(click.Group):
    """The command group; with --log-format json its usage errors are JSON lines too."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        ctx = super().make_context(info_name, args, parent, **extra)
        ctx.meta["json_errors"] = _wants_json(args)
        return ctx

    def main(self, args: Any = None, *rest: Any, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not _wants_json(argv) or extra.get("standalone_mode") is False:
            return super().main(argv, *rest, **extra)
        extra["standalone_mode"] = False
        try:
            code = super().main(argv, *rest, **extra)
        except click.ClickException as exc:
            click.echo(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "event": "error",
                        "message": exc.format_message(),
                        "exit_code": EXIT_USAGE,
                        "exit_reason": exit_reason(EXIT_USAGE),
                    }
                ),
                err=True,
            )
            sys.exit(EXIT_USAGE)
        except click.exceptions.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    cls=_Main,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="batch-prompt-pipeline")
def main() -> None:
    """Push a table of prompts through an OpenAI-compatible chat API.

    Start with `pipeline run --help`; `pipeline demo` runs the whole thing against the
    built-in simulator (no key, no network).
    """


def _config_from_options(
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
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Parquet file to write (.parquet); its checkpoint is OUTPUT.checkpoint/ beside it.",
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
    output: Path,
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
        config = _config_from_options(config_path, params, stop, no_progress, options)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE, summary_json)
        return
    if output.suffix.lower() not in PARQUET_SUFFIXES:
        _fail(
            f"-o {output}: OUTPUT is always a Parquet file; name it "
            f"{output.with_suffix('.parquet')} (for CSV afterwards: "
            "pandas.read_parquet(OUTPUT).to_csv(...)).",
            EXIT_USAGE,
            config.summary_json,
        )
    if config.dry_run:
        _refuse_run_only(no_progress)
        _estimate(input_path, output, config)
        return
    reporter = Reporter(
        progress=config.progress,
        log_format=config.log_format,
        quiet=config.quiet,
        log_interval=config.log_interval,
    )
    summary: RunSummary | None = None
    try:
        summary = run_batch(input_path, output, config, Seams(reporter=reporter))
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE, config.summary_json)
    except LockHeld as exc:
        _fail(str(exc), EXIT_LOCKED, config.summary_json)
    except RunAborted as exc:
        summary = getattr(exc, "summary", None)
        _write_summary(config.summary_json, summary)
        if summary is None:
            _fail(str(exc), EXIT_ABORTED, config.summary_json)
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
        _fail(_os_error_message(exc, output), EXIT_USAGE, config.summary_json)
    except PipelineError as exc:  # pragma: no cover - every subclass is handled above
        _fail(str(exc), EXIT_USAGE, config.summary_json)
    if summary.rows_total == 0:
        reporter.note(f"{input_path} has 0 rows (a header only?): nothing to send.")
    _write_summary(config.summary_json, summary)
    sys.exit(summary.exit_code)


PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_NEXT_STEP = {
    EXIT_ABORTED: "fix the cause above (key, credits, quota, --base-url), then rerun the "
    "same command to continue",
    EXIT_BUDGET: "rerun with a larger --max-cost / --max-total-tokens to continue",
    EXIT_INTERRUPTED: "rerun the same command to continue",
    EXIT_STORAGE: "free space or fix permissions, then rerun the same command",
}


def _os_error_message(exc: OSError, path: Path) -> str:
    where = exc.filename or path
    what = exc.strerror or type(exc).__name__
    return f"cannot write {where} ({what}). Choose a writable place for -o, or fix its permissions."


@main.command(cls=SectionedCommand)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Leave out the rows this OUTPUT's checkpoint already has.",
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
    output: Path | None,
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
        config = _config_from_options(config_path, params, stop, no_progress, options)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
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
        _fail(
            f"{flags}: only a `pipeline run` that sends uses {it}; an estimate sends "
            f"nothing and writes nothing. Drop {it}.",
            EXIT_USAGE,
        )


# job options that only change how a run runs, logs or reports: refused by an estimate
# (--retry-failed too: an estimate counts a row with any result as done)
_RUN_ONLY = (
    "retry_failed",
    "restart",
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
    output: Path | None,
    config: RunConfig,
    *,
    as_json: bool = False,
    typical_completion: int | None = None,
) -> None:
    try:
        results = estimate_job(input_path, output, config, typical_completion=typical_completion)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
        return
    if len(results) == 1:
        click.echo(json.dumps(results[0].as_dict()) if as_json else results[0].format())
    elif as_json:
        total = estimate_total(results)
        click.echo(json.dumps({"models": [r.as_dict() for r in results], "total": total}))
    else:
        click.echo("\n\n".join(r.format() for r in results))
        click.echo("\n" + format_total(estimate_total(results)))


def _write_summary(path: str | None, summary: RunSummary | None) -> None:
    if path and summary is not None:
        _write_json(path, summary.as_dict())


def _write_json(path: str, data: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        click.echo(
            _error_line(f"--summary-json: {_os_error_message(exc, Path(path))}", EXIT_USAGE),
            err=True,
        )


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(output: Path, as_json: bool) -> None:
    """Rows total / ok / error / skipped / pending, tokens, cost and fingerprint of OUTPUT's run.

    Works while a run is going (it reads the checkpoint) and after it. The exit code says
    the state: 0 every row ok or skipped; 1 every row done, some error or invalid; 5 rows
    pending and no run going (rerun to continue); 8 rows pending and a run going;
    2 no checkpoint.
    """
    try:
        state = run_status(output)
    except OutputError as exc:
        _fail(str(exc), EXIT_USAGE)
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
    sys.exit(state.exit_code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--latency-ms", default=0.0, show_default=True, type=float)
@click.option("--jitter-ms", default=0.0, show_default=True, type=float)
@click.option("--rate-429", default=0.0, type=float, help="Share of requests answered 429.")
@click.option("--rate-500", default=0.0, type=float)
@click.option("--rate-503", default=0.0, type=float)
@click.option("--rate-timeout", default=0.0, type=float, help="Share never answered.")
@click.option("--rate-drop", default=0.0, type=float, help="Share whose connection is dropped.")
@click.option("--rate-malformed", default=0.0, type=float, help="Share answered with bad JSON.")
@click.option(
    "--rate-length", default=0.0, type=float, help="Share cut short with finish_reason length."
)
@click.option(
    "--retry-after",
    default=1.0,
    show_default=True,
    type=float,
    help="Retry-After seconds sent with 429s.",
)
@click.option("--rps-limit", type=float, help="Requests/s enforced with 429s.")
@click.option("--rps-burst", type=float, help="Bucket size of --rps-limit (default: 1 s worth).")
@click.option(
    "--rps-schedule",
    help="Change the request limit at given seconds from the first request: 0:40,10:10,20:40.",
)
@click.option("--tpm-limit", type=int, help="Tokens/minute enforced with 429s.")
@click.option("--rate-limit-headers", is_flag=True, help="Send x-ratelimit-* headers.")
@click.option(
    "--wrong-rate", default=0.0, type=float, help="Share of label/JSON answers that are wrong."
)
@click.option(
    "--wrong-kind",
    type=click.Choice(["invalid", "different"]),
    default="invalid",
    show_default=True,
    help="invalid: unusable answer; different: well-formed, wrong.",
)
@click.option(
    "--ignore-n",
    is_flag=True,
    help="Answer with one choice whatever n asks (like llama.cpp), to try --n-mode auto.",
)
@click.option("--seed", type=int, help="Seed for the fault draws.")
@click.option(
    "--request-log",
    type=click.Path(dir_okay=False),
    help="Append each received request as a JSON line.",
)
def simulate(
    host: str,
    port: int,
    latency_ms: float,
    jitter_ms: float,
    rate_429: float,
    rate_500: float,
    rate_503: float,
    rate_timeout: float,
    rate_drop: float,
    rate_malformed: float,
    rate_length: float,
    retry_after: float,
    rps_limit: float | None,
    rps_burst: float | None,
    rps_schedule: str | None,
    tpm_limit: int | None,
    rate_limit_headers: bool,
    seed: int | None,
    request_log: str | None,
    wrong_rate: float,
    wrong_kind: str,
    ignore_n: bool,
) -> None:
    """Serve a local OpenAI-compatible chat API for demos, tests and benchmarks.

    Answers are derived from the prompt, usage counts are honest, and faults can be injected.
    Prompts may also carry directives such as [[sim:status=503]] (see pipeline/simulator.py).
    """
    from .simulator import SimulatorConfig, parse_rps_schedule, run_simulator

    try:
        schedule = parse_rps_schedule(rps_schedule) if rps_schedule else ()
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    negative = [
        f"--{name.replace('_', '-')} {value:g}"
        for name, value in (
            ("latency_ms", latency_ms),
            ("jitter_ms", jitter_ms),
            ("retry_after", retry_after),
            ("rps_limit", rps_limit),
            ("tpm_limit", tpm_limit),
        )
        if value is not None and value < 0
    ]
    shares = {
        "rate_429": rate_429,
        "rate_500": rate_500,
        "rate_503": rate_503,
        "rate_timeout": rate_timeout,
        "rate_drop": rate_drop,
        "rate_malformed": rate_malformed,
        "rate_length": rate_length,
        "wrong_rate": wrong_rate,
    }
    negative += [
        f"--{name.replace('_', '-')} {value:g}"
        for name, value in shares.items()
        if not 0 <= value <= 1
    ]
    if negative:
        _fail(
            f"{', '.join(negative)}: times and limits are 0 or more, shares 0 to 1 "
            "(e.g. --rate-429 0.05 answers 5% of requests with 429).",
            EXIT_USAGE,
        )
    config = SimulatorConfig(
        latency_ms=latency_ms,
        latency_jitter_ms=jitter_ms,
        rate_429=rate_429,
        rate_500=rate_500,
        rate_503=rate_503,
        rate_timeout=rate_timeout,
        rate_drop=rate_drop,
        rate_malformed=rate_malformed,
        rate_length=rate_length,
        retry_after_s=retry_after,
        rps_limit=rps_limit,
        rps_burst=rps_burst,
        rps_schedule=schedule,
        tpm_limit=tpm_limit,
        rate_limit_headers=rate_limit_headers,
        seed=seed,
        record=False,
        request_log=request_log,
        wrong_rate=wrong_rate,
        wrong_kind=wrong_kind,
        ignore_n=ignore_n,
    )
    try:
        run_simulator(config, host=host, port=port)
    except OSError as exc:
        _fail(_bind_error(exc, host, port), EXIT_USAGE)


def _bind_error(exc: OSError, host: str, port: int) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another simulator or demo?). "
            "Stop it, or pass --port N (--port 0 takes any free port)."
        )
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}). Pass another --host/--port."


@main.command()
@click.option(
    "--output", "-o", default="out/demo.parquet", show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help="Input table. [default: the packaged copy of data/sample.csv]",
)
@click.option(
    "--config",
    "config_path",
    help="Job config. [default: the packaged copy of configs/demo.toml]",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Simulator port (0: any free one). [default: the port of the config's base_url]",
)
def demo(output: Path, input_path: Path | None, config_path: str | None, port: int | None) -> None:
    """Start the simulator, run configs/demo.toml over data/sample.csv, print the summary.

    Both files ship inside the package, so the demo works from any directory after any
    install. The simulator adds latency and a few faults (429s, 500s) so that retries show.
    Run it twice: the second run resumes and sends nothing.
    """
    from urllib.parse import urlsplit

    from .simulator import SimulatorConfig, SimulatorThread

    input_path = input_path or PACKAGE_DATA / "sample.csv"
    config_path = config_path or str(PACKAGE_DATA / "demo.toml")
    try:
        file_values = load_config_file(config_path)
        # the simulator runs in this process: never through a proxy of the environment
        config = build_config(file_values, {"proxy": ""}, config_path=config_path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
        return
    if port is None:
        port = urlsplit(config.base_url).port or 8000
    sim_config = SimulatorConfig(
        latency_ms=40.0,
        latency_jitter_ms=40.0,
        rate_429=0.03,
        rate_500=0.02,
        retry_after_s=0.2,
        seed=7,
        record=False,
    )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(_os_error_message(exc, output), EXIT_USAGE)
    sim = SimulatorThread(sim_config, port=port)
    try:
        sim.start()
    except OSError as exc:
        _fail(_bind_error(exc, "127.0.0.1", port), EXIT_USAGE)
    try:
        click.echo(f"simulator listening on {sim.base_url}", err=True)
        if sim.port != port:  # --port 0: the config's base_url points at the bound port
            config = dataclasses.replace(config, base_url=sim.base_url)
        reporter = Reporter(progress=config.progress, log_interval=config.log_interval)
        try:
            summary = run_batch(input_path, output, config, Seams(reporter=reporter))
        except UsageError as exc:
            _fail(str(exc), EXIT_USAGE)
            return
        except LockHeld as exc:
            _fail(str(exc), EXIT_LOCKED)
            return
        except RunAborted as exc:
            stopped = getattr(exc, "summary", None)
            _fail(str(exc), stopped.exit_code if stopped is not None else EXIT_ABORTED)
            return
        except OSError as exc:
            _fail(_os_error_message(exc, output), EXIT_USAGE)
            return
    finally:
        sim.stop()
    click.echo(
        f"\nDone. Output: {output} (read it with pandas.read_parquet)."
        f"\nStatus any time: pipeline status {output}"
    )
    sys.exit(summary.exit_code)


@main.group()
def cache() -> None:
    """Inspect or trim a response cache made by `run --cache DIR`."""


@cache.command("stats")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def cache_stats(directory: Path, as_json: bool) -> None:
    """Entries, bytes and the age range of the cache in DIRECTORY."""
    from .cache import ResponseCache

    if not directory.exists():
        _fail(f"no cache at {directory}.", EXIT_USAGE)
    stats = ResponseCache(directory).stats()
    if as_json:
        click.echo(json.dumps(stats, default=str))
        return
    click.echo(f"{directory}: {stats['entries']} entries, {stats['bytes']:,} bytes")
    for name in ("oldest", "newest"):
        if stats.get(name):
            click.echo(f"{name}: {_ctime(stats[name])}")


@cache.command("prune")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Remove entries not used for this long (30d, 12h, 90m).",
)
@click.option(
    "--max-size",
    metavar="BYTES",
    type=int,
    help="Then remove the least recently used until the cache fits.",
)
def cache_prune(directory: Path, older_than: str | None, max_size: int | None) -> None:
    """Remove old entries (by last use) from the cache in DIRECTORY."""
    from .cache import ResponseCache
    from .config import parse_duration

    if older_than is None and max_size is None:
        _fail("say what to remove: --older-than DURATION and/or --max-size BYTES.", EXIT_USAGE)
    seconds = None
    if older_than is not None:
        text = older_than.strip()
        if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
            seconds = float(text[:-1]) * 86400
        else:
            seconds = parse_duration(text)
        if seconds is None:
            _fail(f"--older-than {older_than!r}: use a duration like 30d, 12h or 90m.", EXIT_USAGE)
    result = ResponseCache(directory).prune(older_than_seconds=seconds, max_bytes=max_size)
    click.echo(
        f"removed {result['removed']} entries ({result['removed_bytes']:,} bytes); "
        f"{result['entries']} entries ({result['bytes']:,} bytes) left"
    )


def _ctime(value: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the comparison as one self-contained HTML page.",
)
@click.option("--json", "as_json", is_flag=True, help="The table as JSON, for scripts.")
def report(output: Path, html_path: Path | None, as_json: bool) -> None:
    """Compare the models of OUTPUT: rows, score, tokens, cost, latency percentiles.

    Works on any OUTPUT (one model, several models long or --wide).
    """
    from .errors import OutputError
    from .report import comparison_table, format_table, load_output, render_html, run_context

    try:
        frame = load_output(output)
    except OutputError as exc:
        _fail(str(exc), EXIT_USAGE)
        return
    rows = comparison_table(frame)
    if as_json:
        click.echo(json.dumps(rows, default=str))
    else:
        click.echo(format_table(rows))
    if html_path is not None:
        page = render_html(rows, frame, context=run_context(output))
        try:
            html_path.write_text(page, encoding="utf-8")
        except OSError as exc:
            _fail(
                f"--html {html_path}: cannot write it ({exc.strerror or exc}). Give a path in "
                "an existing, writable directory.",
                EXIT_USAGE,
            )
        click.echo(f"wrote {html_path}", err=True)
