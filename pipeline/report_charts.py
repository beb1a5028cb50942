"""The inline SVG charts of the HTML report (``report_html``): mean scores with their
intervals, cost against score, and latency histograms on a log axis. Pure functions from the
comparison rows or the long frame to SVG text; every text from the data is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .scoring import ANSWERED, MODEL_KEY

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")
HISTOGRAM_BINS = 20


def short(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def score_chart(rows: Sequence[dict[str, Any]]) -> str:
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
            f'text-anchor="end">{_esc(short(row.get(MODEL_KEY), 30))}</text>'
            f'<rect class="bar" x="{label_width}" y="{y}" width="{bar:.1f}" '
            f'height="{bar_height}" fill="{PALETTE[index % len(PALETTE)]}">'
            f"<title>{name}: {_esc(caption)}</title></rect>{whisker}"
            f'<text x="{label_width + end + 6:.1f}" y="{y + bar_height * 0.7:.1f}">'
            f"{_esc(caption)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def latencies(frame: pd.DataFrame, model: str) -> list[float]:
    if "latency_ms" not in frame.columns or MODEL_KEY not in frame.columns:
        return []
    mine = frame[frame[MODEL_KEY].astype(str) == model]
    if "status" in mine.columns:
        mine = mine[mine["status"].isin(ANSWERED)]
    values = pd.to_numeric(mine["latency_ms"], errors="coerce").dropna()
    return [float(value) for value in values]


def log_bin_edges(values: list[float]) -> list[float]:
    """Bin edges evenly spaced in log(latency), so that the tail gets bins of its own."""
    low, high = max(min(values), 1.0), max(max(values), 1.0)
    if high <= low * 1.01:
        low, high = low / 1.5, high * 1.5
    ratio = (high / low) ** (1 / HISTOGRAM_BINS)
    return [low * ratio**index for index in range(HISTOGRAM_BINS + 1)]


def histogram(values: list[float], edges: list[float], color: str, name: str) -> str:
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


def cost_chart(rows: Sequence[dict[str, Any]]) -> str:
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
        color = PALETTE[index % len(PALETTE)]
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
            f"{_esc(short(row.get(MODEL_KEY), 30))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts) + note
