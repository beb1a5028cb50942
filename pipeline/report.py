"""``pipeline report OUTPUT [--html FILE]``: compare the models of an evaluation run.

This module owns reading an OUTPUT Parquet file back into one long frame, the per-model
comparison table (counts, mean score, tokens, cost, latency percentiles; computed by
:func:`pipeline.scoring.summarize_scores`), its terminal rendering, and a self-contained
HTML page (inline CSS and inline SVG; no scripts, fonts, images or links to fetch). It does
not run anything and writes no files: the CLI prints the table and writes the page.

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

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .records import MODELS_METADATA_KEY, WIDE_SEPARATOR
from .scoring import ALL_ROWS, ANSWERED, COST_KEY, MODEL_KEY, SCORE_KEY, summarize_scores

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
        return frame
    models = _wide_models(columns, named)
    if models:
        return _wide_to_long(frame, columns, models)
    if "status" not in columns:
        raise OutputError(
            f"{path} has no 'status' column nor '<model>{WIDE_SEPARATOR}status' columns, "
            "so it is not the OUTPUT of a run."
        )
    model = named[0] if len(named) == 1 else _most_common(frame.get("response_model"))
    frame.insert(0, MODEL_KEY, model)
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


# -- the comparison ------------------------------------------------------------------------


def comparison_table(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per model (in order of appearance): the fields of
    :class:`pipeline.scoring.ModelSummary` plus ``invalid_rate``."""
    present = [column for column in _SUMMARY_COLUMNS if column in frame.columns]
    # Column names are strings here (the summary columns), whatever pandas' types say.
    records = cast(list[dict[str, Any]], frame[present].to_dict("records"))
    return [summary.as_dict() for summary in summarize_scores(records)]


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
_TABLE_COLUMNS: tuple[tuple[str, str, Any], ...] = (
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


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        _printable(str(formatter(row.get(key)))) if key == MODEL_KEY else formatter(row.get(key))
        for _, key, formatter in _TABLE_COLUMNS
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as an aligned plain-text table (no trailing newline)."""
    if not rows:
        return "(no rows)"
    header = [title for title, _, _ in _TABLE_COLUMNS]
    body = [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


# -- the HTML page -------------------------------------------------------------------------

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")
_HISTOGRAM_BINS = 20
_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem;
       color: #222; max-width: 72rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
svg text { font-size: 12px; fill: #333; }
svg .grid { stroke: #e3e3e3; }
svg .axis { stroke: #999; }
figure { margin: 1rem 0; } figcaption { font-weight: 600; }
.note { color: #777; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(rows: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_esc(title)}</th>" for title, _, _ in _TABLE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(cell)}</td>" for cell in _cells(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Horizontal bars of mean score (0..1), one ``<rect class="bar">`` per model."""
    label_width, plot_width, bar_height, gap, top = 220, 480, 22, 10, 20
    height = top + len(rows) * (bar_height + gap) + 20
    width = label_width + plot_width + 150  # room for the caption after a full bar
    parts = [
        f'<svg class="scores" role="img" aria-label="Mean score per model" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = label_width + tick * plot_width
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 18}"/>'
            f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle">{tick:g}</text>'
        )
    for index, row in enumerate(rows):
        y = top + index * (bar_height + gap)
        score = row.get("mean_score")
        bar = 0.0 if score is None else max(0.0, min(1.0, float(score))) * plot_width
        name = _esc(row.get(MODEL_KEY))
        caption = "no score" if score is None else f"{score:.3f} ({row.get('scored', 0)} scored)"
        parts.append(
            f'<text x="{label_width - 8}" y="{y + bar_height * 0.7:.1f}" '
            f'text-anchor="end">{name}</text>'
            f'<rect class="bar" x="{label_width}" y="{y}" width="{bar:.1f}" '
            f'height="{bar_height}" fill="{_PALETTE[index % len(_PALETTE)]}">'
            f"<title>{name}: {_esc(caption)}</title></rect>"
            f'<text x="{label_width + bar + 6:.1f}" y="{y + bar_height * 0.7:.1f}">'
            f"{_esc(caption)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _latencies(frame: pd.DataFrame, model: str) -> list[float]:
    if "latency_ms" not in frame.columns or MODEL_KEY not in frame.columns:
        return []
    mine = frame[frame[MODEL_KEY].astype(str) == model]
    if "status" in mine.columns:
        mine = mine[mine["status"].isin(ANSWERED)]
    values = pd.to_numeric(mine["latency_ms"], errors="coerce").dropna()
    return [float(value) for value in values]


def _bin_edges(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high <= low:
        high = low + 1.0
    step = (high - low) / _HISTOGRAM_BINS
    return [low + step * index for index in range(_HISTOGRAM_BINS + 1)]


def _histogram(values: list[float], edges: list[float], color: str, name: str) -> str:
    """One model's latency histogram over the shared ``edges``: a ``<rect class="bin">`` each."""
    plot_width, plot_height, left, top, bottom = 480, 120, 40, 8, 22
    width, height = left + plot_width + 50, top + plot_height + bottom
    counts = [0] * (len(edges) - 1)
    span = edges[-1] - edges[0]
    for value in values:
        index = int((value - edges[0]) / span * len(counts))
        counts[min(max(index, 0), len(counts) - 1)] += 1
    peak = max(counts) or 1
    bin_width = plot_width / len(counts)
    parts = [
        f'<svg class="histogram" role="img" aria-label="Latency histogram of {name}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_height}" '
        f'x2="{left + plot_width}" y2="{top + plot_height}"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{peak}</text>',
    ]
    for index, count in enumerate(counts):
        bar = count / peak * plot_height
        x = left + index * bin_width
        parts.append(
            f'<rect class="bin" x="{x + 0.5:.1f}" y="{top + plot_height - bar:.1f}" '
            f'width="{bin_width - 1:.1f}" height="{bar:.1f}" fill="{color}">'
            f"<title>{edges[index]:,.0f}-{edges[index + 1]:,.0f} ms: {count}</title></rect>"
        )
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        value = edges[0] + span * fraction
        parts.append(
            f'<text x="{left + plot_width * fraction:.1f}" y="{height - 6}" '
            f'text-anchor="{anchor}">{value:,.0f} ms</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    rows: Sequence[dict[str, Any]], frame: pd.DataFrame, *, title: str = "Model comparison"
) -> str:
    """One self-contained HTML page: the table, a bar chart of mean score per model, and a
    latency histogram per model (answered rows; bins shared by all models so they compare).

    Inline CSS and inline SVG only: nothing is fetched, nothing runs. Every model name and
    the title are HTML-escaped.
    """
    models = [str(row.get(MODEL_KEY)) for row in rows]
    latencies = {model: _latencies(frame, model) for model in models}
    every = [value for values in latencies.values() for value in values]
    figures = []
    for index, model in enumerate(models):
        name = _esc(model)
        if not latencies[model]:
            chart = '<p class="note">No answered rows with a latency.</p>'
        else:
            color = _PALETTE[index % len(_PALETTE)]
            chart = _histogram(latencies[model], _bin_edges(every), color, name)
        figures.append(f"<figure><figcaption>{name}</figcaption>{chart}</figure>")
    body = (
        f"<h1>{_esc(title)}</h1>"
        f"<h2>Summary</h2>{_html_table(rows)}"
        f"<h2>Mean score</h2>{_score_chart(rows)}"
        f"<h2>Latency (ms, answered rows)</h2>{''.join(figures)}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


__all__ = [
    "MODELS_METADATA_KEY",
    "WIDE_SEPARATOR",
    "comparison_table",
    "format_table",
    "load_output",
    "render_html",
]
