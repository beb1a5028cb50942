"""The ``pipeline`` commands around a run: ``simulate``, ``demo``, ``cache`` and ``report``.

Owns their options and bodies; each calls the library (the simulator, the cache, the report)
and formats. Does not hold the job options or the run/estimate/status commands (``cli.py``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_shell import fail, os_error_message
from .errors import (
    EXIT_ABORTED,
    EXIT_LOCKED,
    EXIT_USAGE,
    ConfigError,
    LockHeld,
    OutputError,
    RunAborted,
    UsageError,
)
from .progress import Reporter
from .runner import Seams, run_batch
from .settings import build_config, load_config_file

PACKAGE_DATA = Path(__file__).resolve().parent / "data"  # the demo job and the price table


# simulate's options that must not be negative, and those that are shares (0 to 1)
_NON_NEGATIVE = (
    "latency_ms",
    "jitter_ms",
    "retry_after",
    "rps_limit",
    "tpm_limit",
    "batch_seconds",
)
_SHARES = (
    "rate_429",
    "rate_500",
    "rate_503",
    "rate_timeout",
    "rate_drop",
    "rate_malformed",
    "rate_length",
    "wrong_rate",
)


@click.command()
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
    help="Append each received request (chat, files and batches) as a JSON line.",
)
@click.option(
    "--batch-seconds",
    default=0.0,
    show_default=True,
    type=float,
    help="Batch API: a batch completes this many seconds after it is created (a day in S s).",
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
    batch_seconds: float,
) -> None:
    """Serve a local OpenAI-compatible chat API for demos, tests and benchmarks.

    Answers are derived from the prompt, usage counts are honest, and faults can be injected.
    Prompts may carry directives such as [[sim:status=503]] (see pipeline/simulator/).
    """
    from .batch_service import BatchSimConfig
    from .simulator import SimulatorConfig, run_simulator

    schedule = _schedule(rps_schedule)
    given = locals()
    _refuse_bad_numbers(
        {name: given[name] for name in _NON_NEGATIVE}, {name: given[name] for name in _SHARES}
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
        batch=BatchSimConfig(batch_seconds=batch_seconds),
    )
    try:
        run_simulator(config, host=host, port=port)
    except OSError as exc:  # the address is taken or not ours
        fail(_bind_error(exc, host, port), EXIT_USAGE)


def _schedule(text: str | None) -> Any:
    """``--rps-schedule`` parsed (exit 2 when it does not parse); () without it."""
    from .simulator import parse_rps_schedule

    try:
        return parse_rps_schedule(text) if text else ()
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


def _refuse_bad_numbers(amounts: dict[str, float | int | None], shares: dict[str, float]) -> None:
    """Exit 2 naming every negative time or limit and every share outside 0 to 1."""
    negative = [
        f"--{name.replace('_', '-')} {value:g}"
        for name, value in amounts.items()
        if value is not None and value < 0
    ]
    negative += [
        f"--{name.replace('_', '-')} {value:g}"
        for name, value in shares.items()
        if not 0 <= value <= 1
    ]
    if negative:
        fail(
            f"{', '.join(negative)}: times and limits are 0 or more, shares 0 to 1 "
            "(e.g. --rate-429 0.05 answers 5% of requests with 429).",
            EXIT_USAGE,
        )


def _bind_error(exc: OSError, host: str, port: int) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another simulator or demo?). "
            "Stop it, or pass --port N (--port 0 takes any free port)."
        )
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}). Pass another --host/--port."


@click.command()
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
        fail(str(exc), EXIT_USAGE)
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
        fail(os_error_message(exc, output), EXIT_USAGE)
    sim = SimulatorThread(sim_config, port=port)
    try:
        sim.start()
    except OSError as exc:
        fail(_bind_error(exc, "127.0.0.1", port), EXIT_USAGE)
    try:
        click.echo(f"simulator listening on {sim.base_url}", err=True)
        if sim.port != port:  # --port 0: the config's base_url points at the bound port
            config = dataclasses.replace(config, base_url=sim.base_url)
        reporter = Reporter(progress=config.progress, log_interval=config.log_interval)
        try:
            summary = run_batch(input_path, output, config, Seams(reporter=reporter))
        except UsageError as exc:
            fail(str(exc), EXIT_USAGE)
            return
        except LockHeld as exc:
            fail(str(exc), EXIT_LOCKED)
            return
        except RunAborted as exc:
            stopped = getattr(exc, "summary", None)
            fail(str(exc), stopped.exit_code if stopped is not None else EXIT_ABORTED)
            return
        except OSError as exc:
            fail(os_error_message(exc, output), EXIT_USAGE)
            return
    finally:
        sim.stop()
    click.echo(
        f"\nDone. Output: {output} (read it with pandas.read_parquet)."
        f"\nStatus any time: pipeline status {output}"
    )
    sys.exit(summary.exit_code)


@click.group()
def cache() -> None:
    """Inspect or trim a response cache made by `run --cache DIR`."""


@cache.command("stats")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def cache_stats(directory: Path, as_json: bool) -> None:
    """Entries, bytes and the age range of the cache in DIRECTORY."""
    from .cache import ResponseCache

    if not directory.exists():
        fail(f"no cache at {directory}.", EXIT_USAGE)
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
    from .durations import parse_duration

    if older_than is None and max_size is None:
        fail("say what to remove: --older-than DURATION and/or --max-size BYTES.", EXIT_USAGE)
    seconds = None
    if older_than is not None:
        text = older_than.strip()
        if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
            seconds = float(text[:-1]) * 86400
        else:
            seconds = parse_duration(text)
        if seconds is None:
            fail(f"--older-than {older_than!r}: use a duration like 30d, 12h or 90m.", EXIT_USAGE)
    result = ResponseCache(directory).prune(older_than_seconds=seconds, max_bytes=max_size)
    click.echo(
        f"removed {result['removed']} entries ({result['removed_bytes']:,} bytes); "
        f"{result['entries']} entries ({result['bytes']:,} bytes) left"
    )


def _ctime(value: float) -> str:

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


@click.command()
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
    from .report import comparison_table, format_table, load_output, run_context
    from .report_html import render_html

    try:
        frame = load_output(output)
    except OutputError as exc:
        fail(str(exc), EXIT_USAGE)
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
            fail(
                f"--html {html_path}: cannot write it ({exc.strerror or exc}). Give a path in "
                "an existing, writable directory.",
                EXIT_USAGE,
            )
        click.echo(f"wrote {html_path}", err=True)
