"""The job options of ``pipeline run`` and ``pipeline estimate`` and their grouped ``--help``.

Owns the option table (names, types, help texts), the ``--help`` sections and the delimiter
names an option accepts. Does not build the config or run anything (``cli.py`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .config import MAX_TOKENS_BOUND, RunConfig

_RUN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}


def default_of(name: str, note: str = "") -> str:
    """``[default: ...]`` for a help text, read from the ``RunConfig`` field ``name``."""
    value = _RUN_DEFAULTS[name]
    if isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, float) and value.is_integer():
        shown = str(int(value))
    else:
        shown = str(value)
    return f"[default: {shown}{note}]"


class SectionedCommand(click.Command):
    """``--help`` with the options in named sections (Click has no option groups)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title in _SECTION_TITLES}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            # the help option's name differs between Click versions ("help", then
            # "_click_default_help" in 8.5): known by its flag
            name = "help" if "--help" in param.opts else (param.name or "")
            title = _SECTIONS.get(name, "Other options")
            sections.setdefault(title, []).append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "semicolon": ";", "comma": ",", "pipe": "|"}

_SECTION_TITLES = (
    "Input and output",
    "Prompt",
    "Endpoint and request",
    "Structured answers, labels and evaluation",
    "Several models and samples",
    "Concurrency, rate limits and retries",
    "Cost and budget",
    "Resume and reruns",
    "Batch API (half price, within 24 h)",
    "Scale-out (one job over several processes or hosts)",
    "Stopping (cron, CI)",
    "Logging and progress",
)
_SECTIONS: dict[str, str] = {
    name: title
    for title, names in zip(
        _SECTION_TITLES,
        (
            "input_path output config_path input_format delimiter id_column limit as_json",
            "prompt_column template messages_column system",
            "base_url api_key_env api_key_file temperature max_tokens top_p seed stop "
            "response_format params http_backend proxy timeout max_response_bytes",
            "json_schema schema_mode schema_prefix labels max_reasks expected_column score",
            "model wide n samples n_mode",
            "concurrency rpm tpm adaptive max_retries",
            "max_cost max_total_tokens prices dedup cache dry_run typical_completion",
            "overwrite restart retry_failed",
            "batch batch_dialect batch_max_requests poll_interval wait resubmit_cancelled",
            "shard engine ray_address ray_actors",
            "grace max_runtime",
            "no_progress log_interval log_format quiet summary_json help",
        ),
        strict=True,
    )
    for name in names.split()
}


def job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by ``run`` and ``estimate`` (everything but -o and --dry-run)."""
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


_JOB_OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="TOML file; any option below can be set there. Options beat the file.",
    ),
    click.option("--base-url", help="API base URL. " + default_of("base_url")),
    click.option(
        "--model",
        multiple=True,
        help="Model name; repeat it (or give a,b) to send every row to each model. "
        + default_of("model"),
    ),
    click.option(
        "--wide",
        is_flag=True,
        default=None,
        help="Several models: one output row per input row, a column group per model "
        "({model}__completion, ...) instead of one row per (row, model).",
    ),
    click.option(
        "--json-schema",
        metavar="FILE",
        help="JSON Schema of the answer: validated, its top-level properties become columns.",
    ),
    click.option(
        "--schema-mode",
        type=click.Choice(["auto", "native", "prompt"]),
        help="native: response_format json_schema; prompt: json_object + the schema in the "
        "system prompt; auto: native where the model supports it. " + default_of("schema_mode"),
    ),
    click.option("--schema-prefix", metavar="TEXT", help="Prefix of the schema's columns."),
    click.option(
        "--labels",
        metavar="a,b,c|@FILE",
        help="Single-label classification: the answer must be one label; a label column.",
    ),
    click.option(
        "--max-reasks",
        type=int,
        help="Re-ask an answer that does not parse/validate this often, then status "
        "invalid. " + default_of("max_reasks"),
    ),
    click.option("--expected-column", metavar="COL", help="Column with the right answers."),
    click.option(
        "--score",
        metavar="SPEC",
        help="exact | contains | regex | json-field=PATH: a score column per row and model "
        "(per sample with --n).",
    ),
    click.option(
        "--n",
        "n",
        type=int,
        metavar="K",
        help="K samples per row: the API's n where the server honours it, else K requests "
        "with seeds base+0..K-1 (see --n-mode). " + default_of("n"),
    ),
    click.option(
        "--samples",
        type=click.Choice(["list", "long"]),
        help="With --n: list keeps one output row per input row, completion, finish_reason, "
        "label, schema and score columns as lists, tokens and cost summed; long gives one "
        "row per sample with a sample column (0..K-1), usage and cost on the first sample "
        "of each request. " + default_of("samples"),
    ),
    click.option(
        "--n-mode",
        type=click.Choice(["auto", "native", "seeds"]),
        help="auto: send n, and for a model whose server answers fewer choices than asked "
        "fill in and go on with seeds; native: always n; seeds: one request per sample with "
        "seed base+sample (base: --seed, else 1). " + default_of("n_mode"),
    ),
    click.option(
        "--api-key-env",
        metavar="NAME",
        help="Variable holding the API key. [default: AIMLAPI_API_KEY, then "
        "OPENAI_API_KEY; none needed for localhost]",
    ),
    click.option("--api-key-file", metavar="FILE", help="Read the API key from this file instead."),
    click.option(
        "--prompt-column",
        metavar="COL",
        help="Column holding the prompt text. "
        "[default: prompt, when no other prompt source is given]",
    ),
    click.option(
        "--template",
        metavar="TEXT|@FILE",
        help="Prompt template with {column} placeholders ({{ }} for literal braces).",
    ),
    click.option(
        "--messages-column",
        metavar="COL",
        help="Column holding a JSON list of {role, content} messages.",
    ),
    click.option("--system", metavar="TEXT|@FILE", help="System prompt sent before each prompt."),
    click.option(
        "--temperature",
        type=float,
        help="Sampling temperature, 0 to 2 (0: the most likely answer). [default: the server's]",
    ),
    click.option(
        "--max-tokens",
        type=int,
        help=f"Most completion tokens per answer, 1 to {MAX_TOKENS_BOUND:,}; also what "
        "--max-cost reserves per request. [default: the server's]",
    ),
    click.option(
        "--top-p",
        type=float,
        help="Nucleus sampling: keep the tokens within this probability mass, above 0 to 1. "
        "[default: the server's]",
    ),
    click.option(
        "--seed",
        type=int,
        help="Sampling seed, for answers that repeat where the server supports it (also the "
        "base seed of --n-mode seeds).",
    ),
    click.option("--stop", multiple=True, help="Stop sequence (repeatable)."),
    click.option(
        "--response-format",
        metavar="json_object|@schema.json",
        help="json_object, or a JSON Schema file sent as json_schema.",
    ),
    click.option(
        "--param",
        "params",
        multiple=True,
        metavar="KEY=JSON",
        help="Any other body field, e.g. --param presence_penalty=0.5 (repeatable).",
    ),
    click.option(
        "--id-column",
        metavar="COL",
        help="Column with a unique row id (else keys derive from row content).",
    ),
    click.option(
        "--input-format",
        type=click.Choice(["csv", "tsv", "parquet", "jsonl", "openai-batch"]),
        help="Override the format given by the extension (tsv: tab-separated CSV; "
        "openai-batch: an OpenAI Batch input file, each line's body sent as it is).",
    ),
    click.option(
        "--delimiter",
        metavar="CHAR",
        callback=lambda _ctx, _param, value: _DELIMITER_NAMES.get(value, value),
        help="CSV field separator, e.g. ';' or tab (also '\\t'). [default: ',', a tab for .tsv]",
    ),
    click.option(
        "--concurrency", type=int, help="Max requests in flight. " + default_of("concurrency")
    ),
    click.option("--rpm", type=float, help="Requests per minute to stay under (paced evenly)."),
    click.option(
        "--tpm",
        type=float,
        help="Tokens per minute to stay under (prompt estimate + max_tokens or the "
        "mean completion, corrected with actual usage).",
    ),
    click.option(
        "--adaptive/--no-adaptive",
        default=None,
        help="Without --rpm/--tpm or rate-limit headers, find the server's limit from "
        "its 429s and hold near it; start with 8 in flight. " + default_of("adaptive"),
    ),
    click.option("--timeout", type=float, help="Seconds per attempt. " + default_of("timeout")),
    click.option(
        "--max-retries",
        type=int,
        help="Retries per row after the first try. " + default_of("max_retries"),
    ),
    click.option(
        "--http-backend",
        type=click.Choice(["http11", "aiohttp", "httpx"]),
        help="HTTP client: http11 (built in, the fastest; HTTP/1.1 keep-alive, TLS), or the "
        "connection pool of aiohttp or httpx. " + default_of("http_backend"),
    ),
    click.option(
        "--max-response-bytes",
        type=int,
        help="Largest response body accepted, as received and as decoded; a larger one "
        "(or a gzip bomb) fails its row. " + default_of("max_response_bytes", ", 64 MiB"),
    ),
    click.option(
        "--proxy",
        metavar="URL",
        help="HTTP proxy for every request: http://[user:password@]host:port (CONNECT for "
        "https); NO_PROXY still applies. '' or none: no proxy. [default: HTTPS_PROXY, "
        "HTTP_PROXY, ALL_PROXY]",
    ),
    click.option(
        "--grace",
        type=float,
        help="Seconds requests in flight get to finish after SIGINT/SIGTERM. "
        + default_of("grace"),
    ),
    click.option(
        "--max-runtime",
        metavar="DURATION",
        help="Stop cleanly after this long (90s, 45m, 2h), like SIGTERM: exit 5, rerun resumes.",
    ),
    click.option("--limit", type=int, help="Only the first N rows (a smoke test)."),
    click.option(
        "--max-cost",
        type=float,
        metavar="USD",
        help="Stop before the next request could push OUTPUT's spend past this (exit 4).",
    ),
    click.option(
        "--max-total-tokens",
        type=int,
        metavar="N",
        help="Stop before the next request could push OUTPUT's tokens past this (exit 4).",
    ),
    click.option(
        "--prices",
        metavar="FILE",
        help="Extra or overriding price table (TOML, like configs/prices.toml).",
    ),
    click.option(
        "--dedup/--no-dedup",
        default=None,
        help="Send rows with identical prompts once and copy the result. " + default_of("dedup"),
    ),
    click.option(
        "--cache",
        metavar="DIR",
        help="Response cache shared across runs and outputs (keyed by URL + body).",
    ),
    click.option(
        "--batch",
        is_flag=True,
        default=None,
        help="Send the rows through the provider's Batch API instead of one request each "
        "(about half the price; results within 24 h). Same OUTPUT, resumable; exit 9 with "
        "--no-wait while batches run.",
    ),
    click.option(
        "--batch-dialect",
        type=click.Choice(["openai", "anthropic", "aimlapi"]),
        help="openai: /files + /batches (OpenAI, Azure, Groq, DeepInfra); anthropic: "
        "/messages/batches (Anthropic); aimlapi: the AI/ML API's /batches for Claude models. "
        "[default: from --base-url]",
    ),
    click.option(
        "--batch-max-requests",
        type=click.IntRange(min=1),
        metavar="N",
        help="Requests per batch (one model each; bytes stay under 190 MB). [default: 50000]",
    ),
    click.option(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="First wait between polls of running batches; x1.5 while nothing changes, up "
        "to 10 min. " + default_of("poll_interval"),
    ),
    click.option(
        "--wait/--no-wait",
        default=None,
        help="--batch: wait for the batches to finish, or submit, collect what is ready, "
        "write OUTPUT and exit 9 (run again later to collect). [default: wait]",
    ),
    click.option(
        "--resubmit-cancelled",
        is_flag=True,
        default=None,
        help="--batch: send again the rows of batches cancelled with `pipeline batch cancel` "
        "(by default they stay pending).",
    ),
    click.option(
        "--shard",
        metavar="I/N",
        help="Answer only shard I of N (0 <= I < N; rows go by key, rows with one prompt "
        "together). Every shard points at the same OUTPUT; each counts all shards' results "
        "as done, so N may change between runs; the shard that finishes the job writes "
        "OUTPUT. --rpm/--tpm are the key's totals: each shard takes 1/N.",
    ),
    click.option(
        "--engine",
        type=click.Choice(["local", "ray"]),
        help="ray: one shard per Ray actor (pip install 'batch-prompt-pipeline[ray]'), on a "
        "local instance bound to 127.0.0.1 or on --ray-address. " + default_of("engine"),
    ),
    click.option(
        "--ray-address",
        metavar="ADDR",
        help="--engine ray: the cluster to join (e.g. ray://head:10001 or auto). "
        "[default: a local instance on 127.0.0.1]",
    ),
    click.option(
        "--ray-actors",
        type=click.IntRange(min=1, max=1024),
        metavar="N",
        help="--engine ray: actors, one shard of the job each. [default: the cluster's "
        "CPUs, at least 2]",
    ),
    click.option(
        "--no-progress",
        is_flag=True,
        default=None,
        help="No progress bar; a log line every 10 s instead.",
    ),
    click.option(
        "--overwrite",
        is_flag=True,
        default=None,
        help="Replace an OUTPUT that this tool's checkpoint did not write.",
    ),
    click.option(
        "--restart",
        is_flag=True,
        default=None,
        help="Start over: move the old checkpoint aside and send every row.",
    ),
    click.option(
        "--retry-failed",
        is_flag=True,
        default=None,
        help="Send again the rows whose status is error or invalid (an answer that failed "
        "its schema or labels); keep the rest.",
    ),
    click.option(
        "--summary-json",
        type=click.Path(dir_okay=False),
        help="Also write the end-of-run summary to this JSON file.",
    ),
    click.option(
        "--log-interval",
        type=float,
        metavar="SECONDS",
        help="Seconds between progress log lines when there is no bar. "
        + default_of("log_interval"),
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        help="json: one JSON object per log line on stderr. " + default_of("log_format"),
    ),
    click.option("--quiet", is_flag=True, default=None, help="Print only errors and the summary."),
]


def _input(ctx: click.Context, param: click.Parameter, value: str) -> Path | str:
    """INPUT as a path, or as the URI it is (``s3://...``: a Path would fold its ``//``)."""
    from .remote_input import is_uri

    return value if is_uri(value) else Path(value)


# the INPUT argument of run, estimate and batch export/import: a file or a URI
input_argument = click.argument(
    "input_path", metavar="INPUT", type=click.Path(dir_okay=False), callback=_input
)


def output_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
    """OUTPUT as a path, or as the object-storage URI it is (``s3://...``)."""
    from .remote_output import is_remote

    return None if value is None else value if is_remote(value) else Path(value)
