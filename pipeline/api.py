"""The Python API: ``pipeline.run(data, output=..., **options) -> pandas.DataFrame`` and its
coroutine twin ``await pipeline.arun(...)``.

Same engine, options, limits, retries and checkpoints as ``pipeline run``; the options are
the ``RunConfig`` field names (the CLI's long options with ``_`` for ``-``), and take Python
values where a Python user would pass them (lists, dicts, paths, timedeltas). This module
owns what only a Python caller needs: the result as a DataFrame aligned with the input
(index kept, stable dtypes), interrupts in notebooks, and the help text of every option. It
does not own the run itself (``runner``) nor the options' rules (``config``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import RunConfig
from .errors import ConfigError, RunAborted
from .progress import Reporter
from .records import RunSummary
from .runner import RunThread, Seams, run_batch, sigint_interrupts
from .settings import build_config, did_you_mean, load_config_file

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
    "input_format": "csv | tsv | parquet | jsonl, for a path whose extension does not say.",
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
    "batch_dialect": "openai | anthropic: the Batch API's dialect (default: from base_url).",
    "batch_max_requests": "requests per batch (default: the provider's cap, 50,000).",
    "poll_interval": "seconds before the first poll of a batch; x1.5 while nothing changes.",
    "wait": "batch=True: wait for the batches (False: submit, collect what is ready, exit).",
    "checkpoint_seconds": "seconds between checkpoint writes.",
    "checkpoint_rows": "results between checkpoint writes.",
    "progress": "False: no progress lines (a notebook shows a log line every log_interval).",
    "log_interval": "seconds between progress lines.",
    "log_format": "text | json: one JSON object per log line.",
    "quiet": "True: print only errors (the summary is in result.attrs['summary']).",
}

# Options whose value is a file: a Path is welcome, and where the CLI spells a file '@FILE'
# (the value may also be literal text) a Path means the file.
_PATH_OPTIONS = {"api_key_file", "json_schema", "prices", "cache", "summary_json"}
_AT_FILE_OPTIONS = {"template", "system", "labels", "response_format"}
_SECONDS_OPTIONS = {
    "timeout",
    "grace",
    "max_runtime",
    "max_retry_wait",
    "checkpoint_seconds",
    "log_interval",
}
# pandas dtypes of the result's integer and boolean columns: nullable, so that a missing
# value (an error row has no tokens) never turns the column into float64 or object
_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def run(
    data: Any,
    output: str | Path | None = None,
    *,
    config: str | Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **options: Any,
) -> pd.DataFrame:
    job = _Job.prepare(data, output, config, transport, options)
    try:
        return job.result(run_batch(data, job.output, job.config, job.seams))
    except RunAborted as exc:
        aborted = job.aborted(exc)
        if aborted.reason == "interrupted by SIGINT":
            raise KeyboardInterrupt(str(aborted)) from aborted
        raise aborted from None
    except KeyboardInterrupt:  # e.g. after the run had ended: a written OUTPUT is kept
        job.keep_temporary = job.output.exists()
        raise
    finally:
        job.cleanup()


async def arun(
    data: Any,
    output: str | Path | None = None,
    *,
    config: str | Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **options: Any,
) -> pd.DataFrame:
    job = _Job.prepare(data, output, config, transport, options)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def on_done() -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            loop.call_soon_threadsafe(_resolve, ended)

    run_thread = RunThread(data, job.output, job.config, job.seams)
    try:
        cancelled = False
        # Ctrl-C stops the run itself: neither asyncio.run's handler (cancel the task) nor
        # ipykernel's (cancel the cell, which ipykernel 7 delivers only once the awaited
        # thing is done) would stop it before its end
        with sigint_interrupts(run_thread):
            run_thread.start(on_done)
            while not run_thread.done.is_set():
                try:
                    await asyncio.shield(ended)
                except asyncio.CancelledError:
                    # a cancelled task stops the run like Ctrl-C, then stays cancelled;
                    # cancelled again while it stops, it stops at once
                    cancelled = True
                    run_thread.interrupt()
        try:
            summary = run_thread.result()
        except RunAborted as exc:
            if cancelled:
                aborted = job.aborted(exc, reason="pipeline.arun was cancelled")
                job.reporter.error(str(aborted))
                raise asyncio.CancelledError(str(aborted)) from aborted
            aborted = job.aborted(exc)
            if aborted.reason == "interrupted by SIGINT":
                raise KeyboardInterrupt(str(aborted)) from aborted
            raise aborted from None
        if cancelled or run_thread.interrupts:  # too late to stop the run: OUTPUT stays
            job.keep_temporary = True
            message = f"interrupted after the run had ended; {job.output} is complete"
            if cancelled:
                job.reporter.error(f"pipeline.arun: {message}")
                raise asyncio.CancelledError(message)
            raise KeyboardInterrupt(message)
        return await asyncio.to_thread(job.result, summary)  # reading OUTPUT is no quick step
    finally:
        job.cleanup()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_RUN_DOC = """Send every row of ``data`` (a DataFrame, pyarrow Table or file path) as a chat
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


def _options_doc() -> str:
    lines = ["", "Options (default, meaning):", ""]
    for f in fields(RunConfig):
        lines.append(f"    {f.name} ({_default(f)!r}): {OPTION_HELP.get(f.name, '')}")
    return "\n".join(lines) + "\n"


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _signature() -> inspect.Signature:
    """run's real parameters: the fixed ones, then every option with its default."""
    fixed = list(inspect.signature(run).parameters.values())[:-1]  # without **options
    options = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_default(f))
        for f in fields(RunConfig)
    ]
    return inspect.Signature([*fixed, *options], return_annotation=pd.DataFrame)


run.__doc__ = _RUN_DOC + _options_doc()
arun.__doc__ = (
    "``await pipeline.arun(data, output=None, **options)``: ``run`` for async code (see\n"
    "help(pipeline.run)). The run goes to a worker thread, so the event loop stays free.\n"
    "Ctrl-C stops the run and raises KeyboardInterrupt, as for run; cancelling the task\n"
    "stops it the same way, then raises CancelledError.\n"
) + _options_doc()
run.__signature__ = arun.__signature__ = _signature()  # type: ignore[attr-defined]


class _ApiReporter(Reporter):
    """The API's reporter: ``progress=False`` also drops the progress lines (a notebook has
    no terminal, so there is no bar to turn off), ``quiet=True`` keeps only errors (the
    summary is on the result), and a temporary OUTPUT is not named unless it is kept."""

    def __init__(self, config: RunConfig, *, temporary: bool) -> None:
        super().__init__(
            progress=config.progress,
            log_format=config.log_format,
            quiet=config.quiet,
            log_interval=config.log_interval,
        )
        self.show_progress = config.progress
        self.temporary = temporary

    def run_started(self, *, output: str, **event: Any) -> None:
        shown = "a temporary file (give output= to keep it)" if self.temporary else output
        super().run_started(output=shown, **event)

    def tick(self) -> None:
        if self.show_progress:
            super().tick()

    def summary(self, summary: RunSummary) -> None:
        if self.quiet:
            self.close()
            return
        if self.temporary and not summary.aborted:
            summary = dataclasses.replace(summary, output="(temporary, removed)")
        super().summary(summary)


@dataclass
class _Job:
    """One call's prepared run: config, where OUTPUT is, and what to clean up after."""

    data: Any
    output: Path
    config: RunConfig
    seams: Seams
    reporter: _ApiReporter
    temporary: Path | None  # the directory of a temporary OUTPUT
    scratch: Path | None  # files made from Python values (a json_schema dict)
    output_before: tuple[int, int] | None  # OUTPUT's (size, mtime) before the run
    keep_temporary: bool = False

    @classmethod
    def prepare(
        cls,
        data: Any,
        output: str | Path | None,
        config: str | Path | None,
        transport: httpx.AsyncBaseTransport | None,
        options: dict[str, Any],
    ) -> _Job:
        unknown = [key for key in options if key not in OPTION_HELP]
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"pipeline.run: unknown option '{key}'.{did_you_mean(key)} "
                "help(pipeline.run) lists every option."
            )
        if options.get("dry_run"):
            raise ConfigError(
                "pipeline.run: dry_run is for the command line (pipeline run --dry-run, or "
                "pipeline estimate); it sends nothing and returns no DataFrame."
            )
        scratch: list[Path] = []
        try:
            values = _python_values(options, scratch)
            file_values = load_config_file(config) if config is not None else None
            cfg = build_config(file_values, values, config_path=str(config) if config else None)
        except BaseException:
            for directory in scratch:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        temporary = None
        if output is None:
            temporary = Path(tempfile.mkdtemp(prefix="pipeline-"))
            output = temporary / "output.parquet"
        output = Path(output)
        reporter = _ApiReporter(cfg, temporary=temporary is not None)
        return cls(
            data=data,
            output=output,
            config=cfg,
            seams=Seams(transport=transport, reporter=reporter),
            reporter=reporter,
            temporary=temporary,
            scratch=scratch[0] if scratch else None,
            output_before=_signature_of(output),
        )

    def result(self, summary: RunSummary) -> pd.DataFrame:
        """The run's OUTPUT as the DataFrame the caller gets."""
        self.write_summary(summary)
        frame = self.read_output()
        attrs = summary.as_dict()
        if self.temporary is not None:
            attrs["output"] = None
        frame.attrs["summary"] = attrs
        self.cleanup()
        return frame

    def aborted(self, exc: RunAborted, *, reason: str | None = None) -> RunAborted:
        """The error to raise for a run that stopped: where the completed rows are, and
        ``.frame`` with them when OUTPUT was written (every stop but a second Ctrl-C).
        ``reason`` replaces the run's own (a cancelled task, not a signal)."""
        summary: RunSummary | None = getattr(exc, "summary", None)
        self.write_summary(summary)
        frame = None
        if self.output.exists() and _signature_of(self.output) != self.output_before:
            frame = self.read_output()
            if summary is not None:
                frame.attrs["summary"] = summary.as_dict()
        done = (
            f"{summary.rows_total - summary.pending} of {summary.rows_total} results are done and"
            if summary is not None
            else "the results done are"
        )
        if self.temporary is not None:
            self.keep_temporary = True
            where = (
                f"{done} kept in {self.output}: pass output={str(self.output)!r} to "
                "continue where it stopped"
            )
        else:
            where = f"{done} kept in {self.output}: rerun with the same output= to continue"
        frame_note = (
            "; the rows so far are in this RunAborted's .frame" if frame is not None else ""
        )
        reason = (reason or exc.reason).rstrip(".")
        error = RunAborted(f"run stopped: {reason}. {where}{frame_note}.", reason=exc.reason)
        error.summary = summary  # type: ignore[attr-defined]
        error.frame = frame  # type: ignore[attr-defined]
        return error

    def read_output(self) -> pd.DataFrame:
        """OUTPUT with nullable integer and boolean dtypes; a DataFrame input's own columns,
        dtypes and index in place of the copies OUTPUT holds."""
        table = pq.read_table(self.output)
        data = self.data
        if isinstance(data, pd.DataFrame):
            inputs = [str(c) for c in data.columns]
            rows = len(data) if self.config.limit is None else min(len(data), self.config.limit)
            per_row = table.num_rows // rows if rows else 1
            if table.column_names[: len(inputs)] == inputs and table.num_rows == rows * per_row:
                base = data.iloc[np.repeat(np.arange(rows), per_row)]
                added = table.drop_columns(inputs).to_pandas(types_mapper=_NULLABLE.get)
                added.index = base.index
                return pd.concat([base, added], axis=1)
        return table.to_pandas(types_mapper=_NULLABLE.get)

    def write_summary(self, summary: RunSummary | None) -> None:
        if self.config.summary_json and summary is not None:
            Path(self.config.summary_json).write_text(
                json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8"
            )

    def cleanup(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.temporary is not None and not self.keep_temporary:
            shutil.rmtree(self.temporary, ignore_errors=True)


def _signature_of(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)


def _python_values(options: dict[str, Any], scratch: list[Path]) -> dict[str, Any]:
    """Options as Python users pass them -> the values ``build_config`` takes.

    Lists of labels, a JSON Schema as a dict, paths as ``Path``, durations as
    ``timedelta``, numpy scalars. A dict schema is written to a file in a new directory
    appended to ``scratch`` (the caller removes it after the run); the fingerprint holds the
    schema's content, so a rerun with the same dict resumes.
    """
    values: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, datetime.timedelta) and key in _SECONDS_OPTIONS:
            value = value.total_seconds()
        elif isinstance(value, os.PathLike):
            if key in _AT_FILE_OPTIONS:
                value = "@" + os.fspath(value)
            elif key in _PATH_OPTIONS:
                value = os.fspath(value)
        elif key == "labels" and isinstance(value, list | tuple):
            value = _labels_text(value)
        elif key == "json_schema" and isinstance(value, dict):
            directory = Path(tempfile.mkdtemp(prefix="pipeline-schema-"))
            scratch.append(directory)
            path = directory / "schema.json"
            path.write_text(json.dumps(value), encoding="utf-8")
            value = str(path)
        values[key] = value
    return values


def _labels_text(labels: list[Any] | tuple[Any, ...]) -> str:
    for label in labels:
        if not isinstance(label, str):
            raise ConfigError(f"labels: every label must be a string (got {label!r}).")
        if "," in label:
            raise ConfigError(
                f"labels: the label {label!r} contains a comma, which separates labels. "
                "Put the labels in a file, one per line, and pass labels=Path(that_file)."
            )
    return ",".join(labels)
