"""The help of the Python API: what each option means (``OPTION_HELP``), ``run``'s
docstring and its real signature (every option with its default), for ``help(pipeline.run)``
and editors. Text only: it runs nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import pandas as pd

from .config import RunConfig

# What each option means, for help(pipeline.run); a test checks that every RunConfig field
# has its line here.
OPTION_HELP: dict[str, str] = {
    "base_url": "API base URL (any OpenAI-compatible endpoint).",
    "model": "model name, or a list of names: every row goes to each model.",
    "models": "several models (same as a list for model=).",
    "wide": "several models: one row per input row and a column group per model.",
    "api_key_env": "environment variable holding the API key "
    "(default AIMLAPI_API_KEY, then OPENAI_API_KEY; none needed for localhost).",
    "api_key_file": "file holding the API key.",
    "prompt_column": "column holding the prompt text (default: 'prompt').",
    "template": "prompt template with {column} placeholders; a Path or '@FILE' reads a file.",
    "messages_column": "column holding a list of {role, content} messages.",
    "system": "system prompt sent before each prompt; a Path or '@FILE' reads a file.",
    "json_schema": "JSON Schema of the answer (a dict, or a file): its properties become columns.",
    "schema_mode": "auto | native | prompt: how the schema is asked for.",
    "schema_prefix": "prefix of the schema's columns.",
    "labels": "single-label classification: a list of labels, 'a,b,c', or a Path/'@FILE'.",
    "max_reasks": "re-asks of an answer that does not parse or validate, then 'invalid'.",
    "expected_column": "column holding the right answers (for score=).",
    "score": "exact | contains | regex | json-field=PATH: a score column.",
    "n": "samples per row.",
    "samples": "list | long: samples as lists in one row, or one row per sample.",
    "n_mode": "auto | native | seeds: how the samples are asked for.",
    "temperature": "request body temperature (0 to 2); None leaves it out.",
    "max_tokens": "request body max_tokens; None leaves it out.",
    "top_p": "request body top_p; None leaves it out.",
    "seed": "request body seed; None leaves it out.",
    "stop": "stop sequence, or a list of them.",
    "response_format": "'json_object', 'text', a dict, or '@schema.json'.",
    "params": "any other request body fields, as a dict.",
    "id_column": "column with a unique row id (else keys derive from the row's content).",
    "input_format": "csv | tsv | parquet | jsonl, for a path whose extension does not say; "
    "openai-batch: an OpenAI Batch input file, each line's body sent as it is.",
    "delimiter": "CSV field separator, e.g. ';' or '\\t' (default ',', a tab for .tsv).",
    "limit": "only the first N rows (a smoke test).",
    "overwrite": "replace an output this tool's checkpoint did not write.",
    "restart": "start over: the old checkpoint is moved aside, every row is sent.",
    "retry_failed": "send again the rows whose status is error or invalid.",
    "summary_json": "also write the run summary to this JSON file.",
    "concurrency": "requests in flight at most.",
    "rpm": "requests per minute to stay under.",
    "tpm": "tokens per minute to stay under.",
    "adaptive": "halve requests in flight on a 429 and grow back slowly.",
    "timeout": "seconds per attempt (or a timedelta).",
    "max_retries": "retries per row after the first try.",
    "max_retry_wait": "longest wait between retries, in seconds.",
    "http_backend": "http11 | aiohttp | httpx: the HTTP client.",
    "max_response_bytes": "cap on one response body, received or decoded (64 MiB); "
    "a row over it fails with ResponseTooLarge.",
    "proxy": "http://[user:password@]host:port for every request; '' for none; "
    "default: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (NO_PROXY applies).",
    "grace": "seconds requests in flight get after an interrupt (the next one stops at once).",
    "max_runtime": "stop cleanly after this long: seconds, '45m', '2h' or a timedelta.",
    "prices": "extra or overriding price table (TOML file).",
    "max_cost": "USD budget for the whole output, across runs.",
    "max_total_tokens": "token budget for the whole output, across runs.",
    "dedup": "send rows with identical prompts once.",
    "cache": "response cache directory shared across runs and outputs.",
    "dry_run": "command line only (pipeline run --dry-run); refused here.",
    "batch": "send through the provider's Batch API (about half price, within 24 h).",
    "batch_dialect": "openai | anthropic | aimlapi: the Batch API's dialect (default: base_url's).",
    "batch_max_requests": "requests per batch (default: the provider's cap, 50,000).",
    "poll_interval": "seconds before the first poll of a batch; x1.5 while nothing changes.",
    "wait": "batch=True: wait for the batches (False: submit, collect what is ready, exit).",
    "shard": "(i, n) or 'i/n': answer only shard i of n (needs output=, shared by every "
    "shard); the result is the whole job with other shards' missing rows 'pending'.",
    "resubmit_cancelled": "batch=True: send again the rows of batches cancelled with "
    "`pipeline batch cancel` (by default they stay pending).",
    "engine": "local | ray: 'ray' answers in Ray actors, one shard each (the [ray] extra).",
    "ray_address": "engine='ray': the cluster to join (default: a local instance on 127.0.0.1).",
    "ray_actors": "engine='ray': how many actors (default: the cluster's CPUs, at least 2).",
    "checkpoint_seconds": "seconds between checkpoint writes.",
    "checkpoint_rows": "results between checkpoint writes.",
    "progress": "False: no progress lines (a notebook shows a log line every log_interval).",
    "log_interval": "seconds between progress lines.",
    "log_format": "text | json: one JSON object per log line.",
    "quiet": "True: print only errors (the summary is in result.attrs['summary']).",
}

RUN_DOC = """Send every row of ``data`` (a DataFrame, pyarrow Table or file path) as a chat
completion and return it with the result columns appended.

The result keeps the input's index and columns (a DataFrame's own dtypes; a file's integer
columns as ``Int64``), so ``df["answer"] = pipeline.run(df, ...)["completion"]`` lands
on the right rows; the result columns have fixed dtypes whatever the rows (README, "Python
API"). The run summary is ``result.attrs["summary"]``.

``output`` is the Parquet file (and checkpoint) to write; give it to make reruns resume.
Without it the run works in a temporary directory, removed at the end, or kept and named
when the run stops early. ``config`` is an optional TOML file; keyword options override it.
``transport`` replaces the HTTP client (tests).

Raises ``pipeline.UsageError`` (``ConfigError``, ``InputError``, ``OutputError``) for bad
options or input, before any request; ``pipeline.LockHeld`` when another run writes
``output``; ``pipeline.RunAborted`` when the run had to stop (401/403/quota, budget,
deadline, SIGTERM), with ``.summary`` and ``.frame`` (the rows so far, or None). Ctrl-C
(also in Jupyter) stops sending, keeps what is done and raises ``KeyboardInterrupt`` (its
``__cause__`` is that ``RunAborted``); a second Ctrl-C stops at once.

``run`` blocks its caller until the end; in a notebook or other async code use
``await pipeline.arun(...)`` (same arguments), which keeps the event loop free. Ctrl-C
stops it as above; cancelling its task stops the run the same way, then raises
``CancelledError``.
"""


def options_doc() -> str:
    lines = ["", "Options (default, meaning):", ""]
    for f in fields(RunConfig):
        lines.append(f"    {f.name} ({default_of(f)!r}): {OPTION_HELP.get(f.name, '')}")
    return "\n".join(lines) + "\n"


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def signature_of(run: Callable[..., Any]) -> inspect.Signature:
    """``run``'s real parameters: its fixed ones, then every option with its default."""
    fixed = list(inspect.signature(run).parameters.values())[:-1]  # without **options
    options = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default_of(f))
        for f in fields(RunConfig)
    ]
    return inspect.Signature([*fixed, *options], return_annotation=pd.DataFrame)
