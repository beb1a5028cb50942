"""The Python API: ``pipeline.run(df_or_path, output=..., **options) -> pandas.DataFrame``.

Same engine, options, limits, retries and checkpoints as ``pipeline run``; the options are
the ``RunConfig`` field names (the CLI's long options with ``_`` for ``-``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from .config import build_config, load_config_file
from .progress import Reporter
from .records import RunSummary
from .runner import Seams, run_batch


def run(
    data: Any,
    output: str | Path | None = None,
    *,
    config: str | Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Send every row of ``data`` (a DataFrame, pyarrow Table or file path) and return it with
    the result columns appended.

    ``output`` is the Parquet file (and checkpoint) to write; give it to make reruns resume.
    Without it the run works in a temporary directory that is removed afterwards.
    ``config`` is an optional TOML file; keyword ``options`` override it. The run summary
    is in ``result.attrs["summary"]``. Raises ``pipeline.UsageError`` for bad options or
    input and ``pipeline.RunAborted`` when the run had to stop (auth, quota, signal).
    """
    file_values = load_config_file(config) if config is not None else None
    if isinstance(options.get("stop"), str):
        options["stop"] = (options["stop"],)
    cfg = build_config(file_values, options, config_path=str(config) if config else None)
    reporter = Reporter(progress=cfg.progress, log_interval=cfg.log_interval)
    seams = Seams(transport=transport, reporter=reporter)
    tmpdir = None
    if output is None:
        tmpdir = tempfile.mkdtemp(prefix="pipeline-")
        output = Path(tmpdir) / "output.parquet"
    try:
        summary: RunSummary = run_batch(data, output, cfg, seams)
        frame = pd.read_parquet(output)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    frame.attrs["summary"] = summary.as_dict()
    return frame
