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
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import remote_output
from .api_help import OPTION_HELP as OPTION_HELP
from .api_help import RUN_DOC, options_doc, signature_of
from .config import RunConfig
from .errors import ConfigError, RunAborted
from .merging import merge_output
from .progress import Reporter
from .records import RunSummary
from .runner import RunThread, Seams, run_batch, sigint_interrupts
from .settings import build_config, did_you_mean, load_config_file

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
        if job.config.engine == "ray":
            from .ray import run_on_ray  # needs the [ray] extra

            return job.result(run_on_ray(data, job.output, job.config, job.reporter))
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


run.__doc__ = RUN_DOC + options_doc()
arun.__doc__ = (
    "``await pipeline.arun(data, output=None, **options)``: ``run`` for async code (see\n"
    "help(pipeline.run)). The run goes to a worker thread, so the event loop stays free.\n"
    "Ctrl-C stops the run and raises KeyboardInterrupt, as for run; cancelling the task\n"
    "stops it the same way, then raises CancelledError.\n"
) + options_doc()
run.__signature__ = arun.__signature__ = signature_of(run)  # type: ignore[attr-defined]


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
    # OUTPUT on object storage: the working copy (``output``) kept in step with the store
    remote: contextlib.ExitStack | None = None

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
        if output is None and cfg.shard is not None:
            raise ConfigError(
                "pipeline.run: shard= needs output=, the same path for every shard of the job."
            )
        if output is None:
            temporary = Path(tempfile.mkdtemp(prefix="pipeline-"))
            output = temporary / "output.parquet"
        remote = None
        if remote_output.is_remote(output):
            remote_output.check_supported(cfg, str(output))
            remote = contextlib.ExitStack()
            output = remote.enter_context(
                remote_output.working_copy(str(output), overwrite=cfg.overwrite)
            )
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
            remote=remote,
        )

    def result(self, summary: RunSummary) -> pd.DataFrame:
        """The run's OUTPUT as the DataFrame the caller gets (a shard's, while other shards
        owe results: the job so far, their rows pending, OUTPUT left to the last shard)."""
        self.write_summary(summary)
        if summary.shard and summary.job_pending:
            with tempfile.TemporaryDirectory(prefix="pipeline-shard-") as where:
                preview = Path(where) / "job-so-far.parquet"
                merge_output(self.output, self.data, destination=preview)
                frame = self.read_output(preview)
        else:
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

    def read_output(self, path: Path | None = None) -> pd.DataFrame:
        """OUTPUT (or ``path``) with nullable integer and boolean dtypes; a DataFrame input's
        own columns, dtypes and index in place of the copies OUTPUT holds."""
        table = pq.read_table(path or self.output)
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
        if self.remote is not None:
            self.remote.close()  # OUTPUT, when the run wrote it, PUT to the store
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
