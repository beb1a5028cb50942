"""``pipeline report OUTPUT [--html FILE]``: compare the models of an evaluation run.

This module owns reading an OUTPUT Parquet file back into one long frame, the per-model
comparison table (counts, mean score, tokens, cost, latency percentiles; computed by
:func:`pipeline.scoring.summarize_scores`) and its terminal rendering; the HTML page is
``report_html``'s. It does not run anything and writes no files: the CLI prints the table
and writes the page.

OUTPUT layouts
--------------
- **long**: one row per (input row, model), with a ``model`` column.
- **wide** (``--wide``): one row per input row. Input columns keep their names; each model's
  result columns form a group named ``{model}{WIDE_SEPARATOR}{column}``, e.g.
  ``gpt-4o-mini__completion``, ``gpt-4o-mini__status``, ``gpt-4o-mini__score``. A group
  exists for every column ending in ``__status`` (so every group must have a status
  column); a column belongs to the longest model name it starts with. The writer may also
  store the model names, in run order, as JSON under the schema metadata key
  :data:`MODELS_METADATA_KEY`; then they are used as given.
- **single model** (no ``model`` column and no groups): the model is the one named under
  :data:`MODELS_METADATA_KEY`, else the most common ``response_model``, else ``(all)``.

:func:`load_output` returns every layout as a long frame with a ``model`` column.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .records import MODELS_METADATA_KEY, WIDE_SEPARATOR
from .scoring import ALL_ROWS, COST_KEY, MODEL_KEY, SCORE_KEY, summarize_scores

# The column load_output adds: the input row (0-based) a result row belongs to.
INPUT_ROW = "_input_row"
_SUMMARY_COLUMNS = (
    MODEL_KEY,
    "status",
    SCORE_KEY,
    "prompt_tokens",
    "completion_tokens",
    COST_KEY,
    "latency_ms",
)


# -- reading OUTPUT ------------------------------------------------------------------------


def load_output(path: str | Path) -> pd.DataFrame:
    """Read an OUTPUT Parquet file as a long frame with a ``model`` column (see module doc).

    Raises OutputError when the file is missing, is not Parquet, or has no result columns.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise OutputError(f"{path} does not exist. Give the OUTPUT file of a run.") from None
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{path} is not a readable Parquet file ({exc}).") from None
    metadata = table.schema.metadata or {}
    named = _metadata_models(metadata.get(MODELS_METADATA_KEY))
    frame = table.to_pandas()
    columns = [str(column) for column in frame.columns]

    if MODEL_KEY in columns and "status" in columns:
        # rows come in input order, one per (input row, model[, sample])
        keys = [MODEL_KEY] + (["sample"] if "sample" in columns else [])
        frame[INPUT_ROW] = frame.groupby(keys, sort=False, dropna=False).cumcount()
        return frame
    models = _wide_models(columns, named)
    if models:
        frame[INPUT_ROW] = range(len(frame))
        return _wide_to_long(frame, [*columns, INPUT_ROW], models)
    if "status" not in columns:
        raise OutputError(
            f"{path} has no 'status' column nor '<model>{WIDE_SEPARATOR}status' columns, "
            "so it is not the OUTPUT of a run."
        )
    model = named[0] if len(named) == 1 else _most_common(frame.get("response_model"))
    frame.insert(0, MODEL_KEY, model)
    frame[INPUT_ROW] = range(len(frame))
    return frame


def _metadata_models(raw: bytes | None) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def _wide_models(columns: list[str], named: list[str]) -> list[str]:
    suffix = WIDE_SEPARATOR + "status"
    found = [column[: -len(suffix)] for column in columns if column.endswith(suffix)]
    found = [model for model in found if model]
    if named and set(named) <= set(found):
        return named
    return found


def _wide_to_long(frame: pd.DataFrame, columns: list[str], models: list[str]) -> pd.DataFrame:
    owner: dict[str, str] = {}
    # Longest name first, so model "a" does not claim the columns of model "a__b".
    for model in sorted(models, key=len, reverse=True):
        prefix = model + WIDE_SEPARATOR
        for column in columns:
            if column not in owner and column.startswith(prefix):
                owner[column] = model
    shared = [column for column in columns if column not in owner]
    pieces = []
    for model in models:
        prefix = model + WIDE_SEPARATOR
        own = [column for column in columns if owner.get(column) == model]
        piece = frame[shared + own].rename(columns={c: c[len(prefix) :] for c in own})
        piece.insert(len(shared), MODEL_KEY, model)
        pieces.append(piece)
    return pd.concat(pieces, ignore_index=True)


def _most_common(values: pd.Series | None) -> str:
    if values is None:
        return ALL_ROWS
    counts = values.dropna().astype(str).value_counts()
    return str(counts.index[0]) if len(counts) else ALL_ROWS


# -- the run's context ---------------------------------------------------------------------


def run_context(output: str | Path) -> dict[str, Any]:
    """What the run was, from the checkpoint manifest beside OUTPUT (``OUTPUT.checkpoint``):
    input, dates, models, prompt, scorer, labels and fingerprint. Only the date OUTPUT was
    written (and a note) when there is no readable manifest."""
    output = Path(output)
    context: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        context["written"] = _utc(output.stat().st_mtime)
    manifest_path = output.with_name(output.name + ".checkpoint") / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        context["note"] = (
            f"no checkpoint manifest at {manifest_path}: the input, prompt and scorer are unknown"
        )
        return context
    config = manifest.get("config") or {}
    context["input"] = manifest.get("input")
    if isinstance(manifest.get("created_at"), int | float):
        context["started"] = _utc(manifest["created_at"])
    models = list(config.get("models") or []) or [config.get("model")]
    context["models"] = ", ".join(str(m) for m in models if m)
    for key in ("template", "prompt_column", "messages_column", "system", "json_schema"):
        if config.get(key):
            context[key] = config[key]
    if config.get("score"):
        context["scorer"] = f"{config['score']} against column '{config.get('expected_column')}'"
    if config.get("labels"):
        context["labels"] = config["labels"]
    if config.get("n", 1) != 1:
        context["samples"] = config["n"]
    context["fingerprint"] = manifest.get("fingerprint")
    context["_config"] = config  # for the columns to show; not printed
    return {k: v for k, v in context.items() if v not in (None, "")}


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


# -- the comparison ------------------------------------------------------------------------


def comparison_table(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per model (in order of appearance): the fields of
    :class:`pipeline.scoring.ModelSummary` plus ``invalid_rate``."""
    present = [column for column in _SUMMARY_COLUMNS if column in frame.columns]
    # Column names are strings here (the summary columns), whatever pandas' types say.
    records = cast(list[dict[str, Any]], frame[present].to_dict("records"))
    rows = [summary.as_dict() for summary in summarize_scores(records)]
    for row in rows:
        low, high, method = score_interval(_scores(frame, str(row.get(MODEL_KEY))))
        row.update(score_ci_low=low, score_ci_high=high, score_ci_method=method)
    return rows


def _scores(frame: pd.DataFrame, model: str) -> list[float]:
    if SCORE_KEY not in frame.columns or MODEL_KEY not in frame.columns:
        return []
    mine = frame.loc[frame[MODEL_KEY].astype(str) == model, SCORE_KEY]
    return [float(v) for v in pd.to_numeric(mine, errors="coerce").dropna()]


# Student's t, 97.5th percentile, for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
_Z975 = 1.959964


def score_interval(scores: Sequence[float]) -> tuple[float | None, float | None, str | None]:
    """A 95% confidence interval of the mean score: (low, high, method).

    Scores that are all 0 or 1 are a proportion: the Wilson score interval, which stays
    inside [0, 1] and is honest for small n and for 0 or n successes. Other scores: the
    mean +- Student's t x standard error (needs n >= 2). (None, None, None) when there is
    nothing to estimate.
    """
    n = len(scores)
    if n == 0:
        return None, None, None
    mean = sum(scores) / n
    if all(score in (0.0, 1.0) for score in scores):
        z2 = _Z975 * _Z975
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = _Z975 / (1 + z2 / n) * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n))
        return max(0.0, centre - half), min(1.0, centre + half), "Wilson"
    if n < 2:
        return None, None, None
    variance = sum((score - mean) ** 2 for score in scores) / (n - 1)
    t = _T975[n - 2] if n - 1 <= len(_T975) else _Z975
    half = t * math.sqrt(variance / n)
    return mean - half, mean + half, "t"


def _fmt_int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _fmt_score(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_cost(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_rate(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# (header, key, formatter); the first column is left-aligned, the rest right-aligned.
TABLE_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("model", MODEL_KEY, str),
    ("rows", "rows", _fmt_int),
    ("ok", "ok", _fmt_int),
    ("invalid", "invalid", _fmt_int),
    ("error", "error", _fmt_int),
    ("invalid%", "invalid_rate", _fmt_rate),
    ("score", "mean_score", _fmt_score),
    ("scored", "scored", _fmt_int),
    ("tokens in", "prompt_tokens", _fmt_int),
    ("tokens out", "completion_tokens", _fmt_int),
    ("cost $", "cost_usd", _fmt_cost),
    ("p50 ms", "latency_p50_ms", _fmt_ms),
    ("p90 ms", "latency_p90_ms", _fmt_ms),
    ("p99 ms", "latency_p99_ms", _fmt_ms),
)


def _printable(text: str) -> str:
    """Control characters (a newline in a model name) escaped, so a row stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def table_cells(row: dict[str, Any]) -> list[str]:
    return [
        _printable(str(formatter(row.get(key)))) if key == MODEL_KEY else formatter(row.get(key))
        for _, key, formatter in TABLE_COLUMNS
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as an aligned plain-text table (no trailing newline)."""
    if not rows:
        return "(no rows)"
    header = [title for title, _, _ in TABLE_COLUMNS]
    body = [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


__all__ = [
    "MODELS_METADATA_KEY",
    "WIDE_SEPARATOR",
    "comparison_table",
    "format_table",
    "load_output",
]
