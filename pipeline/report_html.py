"""The HTML page of ``pipeline report --html``: one self-contained file (inline CSS and inline
SVG; no scripts, fonts, images or links to fetch) with the run's context, the comparison
table with confidence intervals, score and cost charts, the rows where models disagree, a
confusion matrix per model and latency histograms. The figures come from ``report``; this
module only draws them, and writes no file.
"""

from __future__ import annotations

import contextlib
import html
import math
import string
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .records import RESULT_COLUMNS
from .report import INPUT_ROW, TABLE_COLUMNS, table_cells
from .report_charts import (
    PALETTE,
    cost_chart,
    histogram,
    log_bin_edges,
    score_chart,
    short,
)
from .report_charts import (
    latencies as latencies_of,
)
from .scoring import MODEL_KEY, SCORE_KEY

# -- the HTML page -------------------------------------------------------------------------

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
    titles = [title for title, _, _ in TABLE_COLUMNS]
    at = titles.index("score") + 1
    head = "".join(f"<th>{_esc(title)}</th>" for title in [*titles[:at], "95% CI", *titles[at:]])
    lines = []
    for row in rows:
        cells = [f"<td>{_esc(cell)}</td>" for cell in table_cells(row)]
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
        f"<dt>{_esc(label)}</dt><dd>{_esc(short(context[key], 400))}</dd>"
        for key, label in labels
        if key in context
    )
    return f'<dl class="context">{items}</dl>' if items else ""


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
        tds += [f"<td>{_esc(short(_text(first.get(c)), 300))}</td>" for c in prompts]
        if expected:
            tds.append(f"<td>{_esc(short(_text(first.get(expected)), 120))}</td>")
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
            tds.append(f"<td{css}>{_esc(short(text, 200) + mark)}</td>")
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
    latencies = {model: latencies_of(frame, model) for model in models}
    every = [value for values in latencies.values() for value in values]
    figures = []
    for index, model in enumerate(models):
        name = _esc(model)
        if not latencies[model]:
            chart = '<p class="note">No answered rows with a latency.</p>'
        else:
            color = PALETTE[index % len(PALETTE)]
            chart = histogram(latencies[model], log_bin_edges(every), color, name)
        figures.append(f"<figure><figcaption>{name}</figcaption>{chart}</figure>")
    scored = any(row.get("scored") for row in rows)
    if scored:
        method = {str(row["score_ci_method"]) for row in rows if row.get("score_ci_method")}
        scores = (
            f"<h2>Mean score</h2>{score_chart(rows)}"
            f'<p class="note">Error bars and brackets: 95% confidence intervals ('
            + "; ".join(_CI_METHODS[m] for m in sorted(method))
            + f").</p><h2>Cost and score</h2>{cost_chart(rows)}"
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
