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

import contextlib
import html
import json
import math
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .records import MODELS_METADATA_KEY, RESULT_COLUMNS, WIDE_SEPARATOR
from .scoring import ALL_ROWS, ANSWERED, COST_KEY, MODEL_KEY, SCORE_KEY, summarize_scores

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
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
th { background: #f4f4f4; }
svg text { font-size: 12px; fill: #333; }
svg .grid { stroke: #e3e3e3; }
svg .axis { stroke: #999; }
svg .ci { stroke: #222; stroke-width: 1.5; fill: none; }
svg .marker { stroke: #555; stroke-dasharray: 3 3; font-size: 11px; }
svg text.marker { stroke: none; fill: #555; }
dl.context { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; }
dl.context dt { color: #666; } dl.context dd { margin: 0; white-space: pre-wrap;
       overflow-wrap: anywhere; }
table.rows td { text-align: left; vertical-align: top; max-width: 22rem;
       overflow-wrap: anywhere; white-space: pre-wrap; }
td.ci { white-space: nowrap; } td.bad { background: #fdecea; }
td.hit { background: #e8f5e9; } td.miss { background: #fdecea; }
table.confusion th, table.rows th { text-align: left; }
figure { margin: 1rem 0; } figcaption { font-weight: 600; }
.note { color: #777; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(rows: Sequence[dict[str, Any]]) -> str:
    titles = [title for title, _, _ in _TABLE_COLUMNS]
    at = titles.index("score") + 1
    head = "".join(f"<th>{_esc(title)}</th>" for title in [*titles[:at], "95% CI", *titles[at:]])
    lines = []
    for row in rows:
        cells = [f"<td>{_esc(cell)}</td>" for cell in _cells(row)]
        cells.insert(at, f'<td class="ci">{_esc(_fmt_ci(row))}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


_CI_METHODS = {
    "Wilson": "Wilson score interval, for scores of 0 or 1",
    "t": "mean +- Student's t x standard error, for other scores",
}


def _fmt_ci(row: dict[str, Any]) -> str:
    low, high = row.get("score_ci_low"), row.get("score_ci_high")
    if low is None or high is None:
        return "-"
    return f"{low:.3f}-{high:.3f} ({row.get('score_ci_method')})"


def _context_list(context: dict[str, Any]) -> str:
    labels = (
        ("input", "input"),
        ("started", "first run"),
        ("written", "OUTPUT written"),
        ("models", "models"),
        ("template", "template"),
        ("prompt_column", "prompt column"),
        ("messages_column", "messages column"),
        ("system", "system prompt"),
        ("json_schema", "answer schema"),
        ("labels", "labels"),
        ("samples", "samples per row"),
        ("scorer", "scorer"),
        ("fingerprint", "fingerprint"),
        ("note", "note"),
    )
    items = "".join(
        f"<dt>{_esc(label)}</dt><dd>{_esc(_short(context[key], 400))}</dd>"
        for key, label in labels
        if key in context
    )
    return f'<dl class="context">{items}</dl>' if items else ""


def _short(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


_SHOWN_ROWS = 50  # rows of the disagreement table


def _prompt_columns(frame: pd.DataFrame, config: dict[str, Any]) -> list[str]:
    """The input columns that make the prompt: --prompt-column, the template's
    placeholders, --messages-column; else a column named prompt, else the first input one."""
    columns = [str(c) for c in frame.columns]
    wanted: list[str] = []
    for key in ("prompt_column", "messages_column"):
        if config.get(key):
            wanted.append(str(config[key]))
    template = config.get("template")
    if isinstance(template, str) and not template.startswith("@"):
        with contextlib.suppress(ValueError):
            wanted += [f for _, f, _, _ in string.Formatter().parse(template) if f]
    found = [c for c in dict.fromkeys(wanted) if c in columns]
    if found:
        return found
    if "prompt" in columns:
        return ["prompt"]
    inputs = [c for c in columns if c not in _NOT_INPUT and c != config.get("expected_column")]
    return inputs[:1]


_NOT_INPUT = {*RESULT_COLUMNS, MODEL_KEY, SCORE_KEY, "label", "sample", INPUT_ROW}


def _answer_column(frame: pd.DataFrame) -> str:
    return "label" if "label" in frame.columns else "completion"


def _disagreements(frame: pd.DataFrame, models: list[str], config: dict[str, Any]) -> str:
    """The input rows where the models' answers differ, or one is wrong (score 0), failed
    or invalid: prompt, expected value, each model's answer; the first ``_SHOWN_ROWS``."""
    answer = _answer_column(frame)
    if INPUT_ROW not in frame.columns or answer not in frame.columns or not models:
        return ""
    expected = config.get("expected_column")
    expected = expected if expected in frame.columns else None
    prompts = _prompt_columns(frame, config)
    cells: dict[int, dict[str, Any]] = {}
    flagged: dict[int, set[str]] = {}
    for record in frame.to_dict("records"):
        row = int(record[INPUT_ROW])
        model = str(record.get(MODEL_KEY))
        cells.setdefault(row, {"_input": record})[model] = record
        status, score = record.get("status"), record.get(SCORE_KEY)
        if status in ("error", "invalid") or (isinstance(score, float) and score == 0.0):
            flagged.setdefault(row, set()).add(model)
    for row, by_model in cells.items():
        answers = {_normal(by_model[m].get(answer)) for m in models if m in by_model}
        if len(models) > 1 and len(answers) > 1:
            flagged.setdefault(row, set())
    heading = "Disagreements and wrong answers" if len(models) > 1 else "Wrong answers"
    if not flagged:
        agree = "The models agree on every row, and no" if len(models) > 1 else "No"
        return (
            f'<h2>{heading}</h2><p class="note">{agree} answer is wrong (score 0), '
            "invalid or failed.</p>"
        )
    shown = sorted(flagged)[:_SHOWN_ROWS]
    head = (
        "<th>row</th>"
        + "".join(f"<th>{_esc(c)}</th>" for c in prompts)
        + (f"<th>expected ({_esc(expected)})</th>" if expected else "")
        + "".join(f"<th>{_esc(m)}</th>" for m in models)
    )
    lines = []
    for row in shown:
        first = cells[row]["_input"]
        tds = [f"<td>{row + 1}</td>"]
        tds += [f"<td>{_esc(_short(_text(first.get(c)), 300))}</td>" for c in prompts]
        if expected:
            tds.append(f"<td>{_esc(_short(_text(first.get(expected)), 120))}</td>")
        for model in models:
            result = cells[row].get(model)
            if result is None:
                tds.append("<td></td>")
                continue
            status = result.get("status")
            text = _text(result.get(answer)) if status in ("ok", "invalid") else ""
            mark = ""
            if status != "ok":
                mark = f" [{status}]"
            elif isinstance(result.get(SCORE_KEY), float) and result[SCORE_KEY] == 0.0:
                mark = " [wrong]"
            css = ' class="bad"' if model in flagged[row] else ""
            tds.append(f"<td{css}>{_esc(_short(text, 200) + mark)}</td>")
        lines.append("<tr>" + "".join(tds) + "</tr>")
    more = (
        f'<p class="note">First {len(shown)} of {len(flagged)} rows.</p>'
        if len(flagged) > len(shown)
        else ""
    )
    return (
        f"<h2>{heading} ({len(flagged)} rows)</h2>"
        f'<table class="rows"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody>'
        f"</table>{more}"
    )


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _normal(value: Any) -> str:
    return " ".join(_text(value).split()).casefold()


def _confusion(frame: pd.DataFrame, models: list[str], config: dict[str, Any]) -> str:
    """Per model, expected label (rows) against the answered label (columns), when OUTPUT
    has a ``label`` column and the run named an expected column."""
    expected = config.get("expected_column")
    if "label" not in frame.columns or not expected or expected not in frame.columns:
        return ""
    parts = ["<h2>Confusion matrices (expected label x answered label)</h2>"]
    for model in models:
        mine = frame[frame[MODEL_KEY].astype(str) == model]
        truth = [_normal(v) or "(none)" for v in mine[expected]]
        said = [
            (_normal(label) or "(none)") if status == "ok" else f"({status})"
            for label, status in zip(mine["label"], mine["status"], strict=True)
        ]
        wanted = sorted(set(truth))
        answered = sorted(set(said) - set(wanted))
        columns = [*wanted, *answered]
        counts: dict[tuple[str, str], int] = {}
        for pair in zip(truth, said, strict=True):
            counts[pair] = counts.get(pair, 0) + 1
        head = "<th></th>" + "".join(f"<th>{_esc(c)}</th>" for c in columns)
        body = "".join(
            f"<tr><th>{_esc(t)}</th>"
            + "".join(
                f'<td class="{"hit" if t == c else "miss" if counts.get((t, c)) else ""}">'
                f"{counts.get((t, c), 0)}</td>"
                for c in columns
            )
            + "</tr>"
            for t in wanted
        )
        parts.append(
            f"<figure><figcaption>{_esc(model)}</figcaption>"
            f'<table class="confusion"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></figure>"
        )
    return "".join(parts)


def _score_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Horizontal bars of mean score (0..1), one ``<rect class="bar">`` per model."""
    label_width, plot_width, bar_height, gap, top = 220, 480, 22, 10, 20
    height = top + len(rows) * (bar_height + gap) + 20
    width = label_width + plot_width + 300  # room for the caption after a full bar
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
        low, high = row.get("score_ci_low"), row.get("score_ci_high")
        end = bar
        whisker = ""
        if low is not None and high is not None:
            x1 = label_width + max(0.0, min(1.0, low)) * plot_width
            x2 = label_width + max(0.0, min(1.0, high)) * plot_width
            mid = y + bar_height / 2
            whisker = (
                f'<path class="ci" d="M{x1:.1f},{mid - 6:.1f}v12M{x1:.1f},{mid:.1f}'
                f'H{x2:.1f}M{x2:.1f},{mid - 6:.1f}v12"/>'
            )
            end = max(bar, x2 - label_width)
            caption += f", 95% CI {low:.2f}-{high:.2f}"
        parts.append(
            f'<text x="{label_width - 8}" y="{y + bar_height * 0.7:.1f}" '
            f'text-anchor="end">{_esc(_short(row.get(MODEL_KEY), 30))}</text>'
            f'<rect class="bar" x="{label_width}" y="{y}" width="{bar:.1f}" '
            f'height="{bar_height}" fill="{_PALETTE[index % len(_PALETTE)]}">'
            f"<title>{name}: {_esc(caption)}</title></rect>{whisker}"
            f'<text x="{label_width + end + 6:.1f}" y="{y + bar_height * 0.7:.1f}">'
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


def _log_bin_edges(values: list[float]) -> list[float]:
    """Bin edges evenly spaced in log(latency), so that the tail gets bins of its own."""
    low, high = max(min(values), 1.0), max(max(values), 1.0)
    if high <= low * 1.01:
        low, high = low / 1.5, high * 1.5
    ratio = (high / low) ** (1 / _HISTOGRAM_BINS)
    return [low * ratio**index for index in range(_HISTOGRAM_BINS + 1)]


def _histogram(values: list[float], edges: list[float], color: str, name: str) -> str:
    """One model's latency histogram over the shared ``edges`` (log-spaced), with a log
    x axis: a ``<rect class="bin">`` each, and the model's p50 / p99 marked."""
    plot_width, plot_height, left, top, bottom = 480, 120, 64, 18, 40
    width, height = left + plot_width + 60, top + plot_height + bottom
    counts = [0] * (len(edges) - 1)
    log_low, log_high = math.log(edges[0]), math.log(edges[-1])

    def x_of(value: float) -> float:
        fraction = (math.log(max(value, edges[0])) - log_low) / (log_high - log_low)
        return left + max(0.0, min(1.0, fraction)) * plot_width

    for value in values:
        index = int((math.log(max(value, edges[0])) - log_low) / (log_high - log_low) * len(counts))
        counts[min(max(index, 0), len(counts) - 1)] += 1
    peak = max(counts) or 1
    bin_width = plot_width / len(counts)
    parts = [
        f'<svg class="histogram" role="img" aria-label="Latency histogram of {name}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_height}" '
        f'x2="{left + plot_width}" y2="{top + plot_height}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_height}"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot_height}" text-anchor="end">0</text>',
        f'<text transform="translate(14 {top + plot_height / 2:.0f}) rotate(-90)" '
        'text-anchor="middle">rows</text>',
    ]
    for index, count in enumerate(counts):
        bar = count / peak * plot_height
        x = left + index * bin_width
        parts.append(
            f'<rect class="bin" x="{x + 0.5:.1f}" y="{top + plot_height - bar:.1f}" '
            f'width="{bin_width - 1:.1f}" height="{bar:.1f}" fill="{color}">'
            f"<title>{edges[index]:,.0f}-{edges[index + 1]:,.0f} ms: {count}</title></rect>"
        )
    for tick in _log_ticks(edges[0], edges[-1]):
        x = x_of(tick)
        parts.append(
            f'<line class="axis" x1="{x:.1f}" y1="{top + plot_height}" x2="{x:.1f}" '
            f'y2="{top + plot_height + 4}"/>'
            f'<text x="{x:.1f}" y="{top + plot_height + 16}" text-anchor="middle">'
            f"{_fmt_ms_tick(tick)}</text>"
        )
    ordered = sorted(values)
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        x = x_of(value)
        parts.append(
            f'<line class="marker" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" '
            f'y2="{top + plot_height}"/><text class="marker" x="{x:.1f}" y="{top - 5}" '
            'text-anchor="middle">'
            f"{label} {value:,.0f}</text>"
        )
    parts.append(
        f'<text x="{left + plot_width / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        "latency, ms (log scale)</text></svg>"
    )
    return "".join(parts)


def _log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 steps of each decade within [low, high]; the ends when fewer than two fall in."""
    ticks = []
    decade = 10.0 ** math.floor(math.log10(low))
    while decade <= high:
        ticks += [decade * m for m in (1, 2, 5) if low <= decade * m <= high]
        decade *= 10
    return ticks if len(ticks) >= 2 else [low, high]


def _fmt_ms_tick(value: float) -> str:
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:.3g} ms"


def _cost_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Mean score (with its interval) against the model's total cost: one point a model.
    Models with no known cost are listed below the chart instead."""
    priced = [r for r in rows if r.get("cost_usd") is not None and r.get("mean_score") is not None]
    unpriced = [str(r.get(MODEL_KEY)) for r in rows if r not in priced and r.get("scored")]
    note = (
        f'<p class="note">No known cost, not drawn: {_esc(", ".join(unpriced))}.</p>'
        if unpriced
        else ""
    )
    if not priced:
        return note or '<p class="note">No model has both a cost and a score.</p>'
    left, top, plot_width, plot_height = 64, 14, 480, 220
    width, height = left + plot_width + 220, top + plot_height + 44
    most = max(float(r["cost_usd"]) for r in priced) or 1.0

    def xy(cost: float, score: float) -> tuple[float, float]:
        x = left + cost / (most * 1.1) * plot_width
        return x, top + (1 - max(0.0, min(1.0, score))) * plot_height

    parts = [
        f'<svg class="cost" role="img" aria-label="Mean score against cost" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_height}" x2="{left + plot_width}" '
        f'y2="{top + plot_height}"/><line class="axis" x1="{left}" y1="{top}" x2="{left}" '
        f'y2="{top + plot_height}"/>',
        f'<text transform="translate(16 {top + plot_height / 2:.0f}) rotate(-90)" '
        'text-anchor="middle">mean score</text>',
        f'<text x="{left + plot_width / 2:.0f}" y="{height - 4}" text-anchor="middle">'
        "total cost, USD</text>",
    ]
    for tick in (0.0, 0.5, 1.0):
        _, y = xy(0.0, tick)
        parts.append(
            f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_width}" y2="{y:.1f}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>'
        )
    for fraction in (0.0, 0.5, 1.0):
        cost = most * 1.1 * fraction
        x, _ = xy(cost, 0.0)
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_height + 16}" text-anchor="middle">{cost:.2g}</text>'
        )
    for index, row in enumerate(rows):
        if row not in priced:
            continue
        x, y = xy(float(row["cost_usd"]), float(row["mean_score"]))
        color = _PALETTE[index % len(_PALETTE)]
        low, high = row.get("score_ci_low"), row.get("score_ci_high")
        if low is not None and high is not None:
            _, y1 = xy(0.0, low)
            _, y2 = xy(0.0, high)
            parts.append(f'<path class="ci" d="M{x:.1f},{y1:.1f}V{y2:.1f}"/>')
        name = _esc(row.get(MODEL_KEY))
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}">'
            f"<title>{name}: score {row['mean_score']:.3f}, ${row['cost_usd']:.4f}</title>"
            f'</circle><text x="{x + 8:.1f}" y="{y - 6:.1f}">'
            f"{_esc(_short(row.get(MODEL_KEY), 30))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts) + note


def render_html(
    rows: Sequence[dict[str, Any]],
    frame: pd.DataFrame,
    *,
    title: str = "Model comparison",
    context: dict[str, Any] | None = None,
) -> str:
    """One self-contained HTML page: the run's context, the table (with a 95% confidence
    interval on each mean score), a chart of mean scores with their intervals and one of
    cost against score (when something was scored), the rows where models disagree or are
    wrong, a confusion matrix per model (labels with an expected column), and a latency
    histogram per model on a log axis (answered rows; bins shared by all models).

    Inline CSS and inline SVG only: nothing is fetched, nothing runs. Every text from the
    data (model names, prompts, answers, labels) and the title are HTML-escaped.
    """
    context = context or {}
    config = context.get("_config") or {}
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
            chart = _histogram(latencies[model], _log_bin_edges(every), color, name)
        figures.append(f"<figure><figcaption>{name}</figcaption>{chart}</figure>")
    scored = any(row.get("scored") for row in rows)
    if scored:
        method = {str(row["score_ci_method"]) for row in rows if row.get("score_ci_method")}
        scores = (
            f"<h2>Mean score</h2>{_score_chart(rows)}"
            f'<p class="note">Error bars and brackets: 95% confidence intervals ('
            + "; ".join(_CI_METHODS[m] for m in sorted(method))
            + f").</p><h2>Cost and score</h2>{_cost_chart(rows)}"
        )
    else:
        scores = (
            '<p class="note">Nothing was scored: add --expected-column COLUMN and --score '
            "to the run for scores, intervals and cost against score.</p>"
        )
    body = (
        f"<h1>{_esc(title)}</h1>"
        f"{_context_list(context)}"
        f"<h2>Summary</h2>{_html_table(rows)}"
        f"{scores}"
        f"{_disagreements(frame, models, config)}"
        f"{_confusion(frame, models, config)}"
        f"<h2>Latency (ms, answered rows, log scale)</h2>{''.join(figures)}"
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
