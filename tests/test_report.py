"""``pipeline report``: OUTPUT in either layout -> per-model comparison, table and HTML page."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import OutputError
from pipeline.report import (
    MODELS_METADATA_KEY,
    comparison_table,
    format_table,
    load_output,
    run_context,
    score_interval,
)
from pipeline.report_html import render_html
from pipeline.simulator import SimulatorThread

# Two models over the same three input rows; "b" gets one invalid answer and one error.
RESULTS: dict[str, dict[str, list[Any]]] = {
    "gpt-a": {
        "completion": ["yes", "no", "yes"],
        "status": ["ok", "ok", "ok"],
        "score": [1.0, 1.0, 0.0],
        "prompt_tokens": [10, 10, 12],
        "completion_tokens": [1, 1, 1],
        "cost_usd": [0.001, 0.001, 0.002],
        "latency_ms": [100.0, 200.0, 300.0],
        "response_model": ["gpt-a-2024", "gpt-a-2024", "gpt-a-2024"],
    },
    "gpt-b": {
        "completion": ["yes", "maybe", None],
        "status": ["ok", "invalid", "error"],
        "score": [1.0, 0.0, None],
        "prompt_tokens": [10, 25, None],
        "completion_tokens": [1, 4, None],
        "cost_usd": [None, None, None],
        "latency_ms": [1000.0, 1500.0, 30000.0],
        "response_model": ["gpt-b", "gpt-b", None],
    },
}
INPUT = {"id": [1, 2, 3], "text": ["q1", "q2", "q3"], "expected": ["yes", "no", "no"]}


def write_long(path: Path, results: dict[str, dict[str, list[Any]]] = RESULTS) -> Path:
    rows: list[dict[str, Any]] = []
    for index in range(3):
        for model, columns in results.items():
            record = {name: values[index] for name, values in INPUT.items()}
            record["model"] = model
            record.update({name: values[index] for name, values in columns.items()})
            rows.append(record)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_wide(path: Path, metadata: dict[bytes, bytes] | None = None) -> Path:
    columns: dict[str, list[Any]] = dict(INPUT)
    for model, results in RESULTS.items():
        for name, values in results.items():
            columns[f"{model}__{name}"] = values
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def by_model(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["model"]: row for row in rows}


# -- reading OUTPUT and comparing ----------------------------------------------------------


def test_comparison_of_a_long_output(tmp_path: Path) -> None:
    rows = comparison_table(load_output(write_long(tmp_path / "long.parquet")))

    assert [row["model"] for row in rows] == ["gpt-a", "gpt-b"]
    a, b = by_model(rows)["gpt-a"], by_model(rows)["gpt-b"]
    assert (a["rows"], a["ok"], a["invalid"], a["error"]) == (3, 3, 0, 0)
    assert a["mean_score"] == pytest.approx(2 / 3)
    assert (a["prompt_tokens"], a["completion_tokens"]) == (32, 3)
    assert a["cost_usd"] == pytest.approx(0.004)
    assert a["latency_p50_ms"] == 200.0
    assert (b["ok"], b["invalid"], b["error"], b["scored"]) == (1, 1, 1, 2)
    assert b["mean_score"] == 0.5
    assert b["cost_usd"] is None  # unknown, not free
    assert b["latency_p99_ms"] < 1500.0 + 1e-9  # the error's 30 s is not an answer's latency
    assert b["invalid_rate"] == 0.5


def test_a_wide_output_compares_the_same_as_the_long_one(tmp_path: Path) -> None:
    long = comparison_table(load_output(write_long(tmp_path / "long.parquet")))
    wide_frame = load_output(write_wide(tmp_path / "wide.parquet"))

    assert comparison_table(wide_frame) == long
    assert len(wide_frame) == 6
    assert {"id", "text", "expected", "model", "completion", "score"} <= set(wide_frame.columns)
    assert not [column for column in wide_frame.columns if "__" in column]


def test_wide_model_order_and_names_come_from_metadata(tmp_path: Path) -> None:
    metadata = {MODELS_METADATA_KEY: json.dumps(["gpt-b", "gpt-a"]).encode()}
    frame = load_output(write_wide(tmp_path / "wide.parquet", metadata))
    assert [row["model"] for row in comparison_table(frame)] == ["gpt-b", "gpt-a"]


def test_a_model_name_that_extends_another_keeps_its_own_columns(tmp_path: Path) -> None:
    columns = {
        "id": [1],
        "m__status": ["ok"],
        "m__score": [1.0],
        "m__x__status": ["invalid"],
        "m__x__score": [0.0],
    }
    pq.write_table(pa.table(columns), tmp_path / "o.parquet")

    rows = by_model(comparison_table(load_output(tmp_path / "o.parquet")))
    assert (rows["m"]["ok"], rows["m"]["mean_score"]) == (1, 1.0)
    assert (rows["m__x"]["invalid"], rows["m__x"]["mean_score"]) == (1, 0.0)


def test_a_single_model_output_is_named_by_its_response_model(tmp_path: Path) -> None:
    columns = {**INPUT, **RESULTS["gpt-a"]}
    pq.write_table(pa.table(columns), tmp_path / "single.parquet")

    [row] = comparison_table(load_output(tmp_path / "single.parquet"))
    assert row["model"] == "gpt-a-2024"
    assert row["rows"] == 3


@pytest.mark.parametrize("case", ["missing", "not-parquet", "not-an-output"])
def test_what_is_not_an_output_is_an_output_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "out.parquet"
    if case == "not-parquet":
        path.write_text("id,text\n1,a\n")
    elif case == "not-an-output":
        pq.write_table(pa.table({"id": [1], "text": ["a"]}), path)
    with pytest.raises(OutputError, match=re.escape(str(path))):
        load_output(path)


# -- the terminal table --------------------------------------------------------------------


def test_the_terminal_table_is_aligned_and_shows_each_model(tmp_path: Path) -> None:
    rows = comparison_table(load_output(write_long(tmp_path / "long.parquet")))
    text = format_table(rows)
    lines = text.splitlines()

    assert len(lines) == 2 + len(rows)  # header, rule, one line per model
    assert len({len(line) for line in lines}) == 1  # right-aligned columns end together
    header = lines[0].split()
    assert header[0] == "model" and "score" in header and "p99" in header
    a_line = next(line for line in lines if line.startswith("gpt-a"))
    assert "0.667" in a_line and "0.0040" in a_line
    b_line = next(line for line in lines if line.startswith("gpt-b"))
    assert "50.0%" in b_line  # invalid rate
    assert " - " in b_line  # unknown cost


def test_a_model_name_cannot_break_the_table_layout() -> None:
    text = format_table([{"model": "evil\nname", "rows": 1}])
    assert len(text.splitlines()) == 3
    assert "evil\\nname" in text


def test_an_empty_comparison_says_so() -> None:
    assert format_table([]) == "(no rows)"


# -- the HTML page -------------------------------------------------------------------------


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside <title> of SVG elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.svg_titles: list[str] = []
        self._in_title = False
        self._svg_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "svg":
            self._svg_depth += 1
        self._in_title = tag == "title" and self._svg_depth > 0

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg_depth -= 1
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.svg_titles.append(data)

    def having(self, tag: str, css_class: str) -> list[dict[str, str | None]]:
        return [
            attrs for name, attrs in self.tags if name == tag and attrs.get("class") == css_class
        ]


def page_of(tmp_path: Path, results: dict[str, dict[str, list[Any]]] = RESULTS) -> str:
    frame = load_output(write_long(tmp_path / "long.parquet", results))
    return render_html(comparison_table(frame), frame)


def parse(page: str) -> Elements:
    elements = Elements()
    elements.feed(page)
    return elements


def test_the_page_is_one_self_contained_document(tmp_path: Path) -> None:
    page = page_of(tmp_path)
    elements = parse(page)

    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")
    assert [name for name, _ in elements.tags].count("body") == 1
    for name, attrs in elements.tags:
        assert name not in ("script", "link", "img", "iframe", "object", "embed"), name
        for attribute in ("src", "href", "xlink:href"):
            assert attribute not in attrs, (name, attrs)
    assert not re.search(r"https?://|url\(|@import", page)


def test_one_score_bar_per_model_sized_by_its_mean_score(tmp_path: Path) -> None:
    bars = parse(page_of(tmp_path)).having("rect", "bar")

    assert len(bars) == 2
    widths = [float(bar["width"] or 0) for bar in bars]
    assert widths[0] == pytest.approx(widths[1] * (2 / 3) / 0.5, rel=0.01)  # a: 0.667, b: 0.5


def test_one_latency_histogram_per_model_holding_its_answered_rows(tmp_path: Path) -> None:
    elements = parse(page_of(tmp_path))
    histograms = elements.having("svg", "histogram")

    assert len(histograms) == 2
    counts = [int(title.rsplit(":", 1)[1]) for title in elements.svg_titles if " ms: " in title]
    assert sum(counts) == 3 + 2  # gpt-a: 3 answered rows; gpt-b: 2 (the error is left out)


def test_model_names_are_escaped(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script> & co'
    page = page_of(tmp_path, {evil: RESULTS["gpt-a"], "plain": RESULTS["gpt-b"]})

    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert len(parse(page).having("rect", "bar")) == 2


def test_a_model_without_score_or_latency_still_gets_its_bar(tmp_path: Path) -> None:
    silent = {**RESULTS["gpt-b"], "status": ["error"] * 3, "score": [None] * 3}
    page = page_of(tmp_path, {"gpt-a": RESULTS["gpt-a"], "down": silent})
    elements = parse(page)

    assert len(elements.having("rect", "bar")) == 2
    assert len(elements.having("svg", "histogram")) == 1
    assert "no score" in page and "No answered rows" in page


# -- what an evaluation needs: context, intervals, wrong rows, confusion, cost -----------------


def write_manifest(output: Path, **config: Any) -> None:
    directory = output.with_name(output.name + ".checkpoint")
    directory.mkdir()
    manifest = {
        "input": "eval.csv",
        "created_at": 1_700_000_000.0,  # 2023-11-14 22:13:20 UTC
        "fingerprint": "00eb3719b970f5ba",
        "config": {"models": ["gpt-a", "gpt-b"], "n": 1, **config},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def evaluation_page(tmp_path: Path, results: dict[str, dict[str, list[Any]]] = RESULTS) -> str:
    path = write_long(tmp_path / "long.parquet", results)
    write_manifest(
        path, template="Q: {text}", expected_column="expected", score="exact", labels=None
    )
    frame = load_output(path)
    return render_html(comparison_table(frame), frame, context=run_context(path))


def test_each_score_has_a_95_percent_interval_wilson_for_proportions(tmp_path: Path) -> None:
    a, b = comparison_table(load_output(write_long(tmp_path / "long.parquet")))

    # gpt-a: 2 right of 3; gpt-b: 1 of 2 (its error row has no score)
    assert (a["score_ci_low"], a["score_ci_high"]) == pytest.approx((0.2077, 0.9385), abs=1e-4)
    assert (b["score_ci_low"], b["score_ci_high"]) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    assert a["score_ci_method"] == b["score_ci_method"] == "Wilson"
    (tmp_path / "page").mkdir()
    page = evaluation_page(tmp_path / "page")
    assert "0.208-0.939 (Wilson)" in page and "Wilson score interval" in page


def test_scores_other_than_0_or_1_get_a_t_interval() -> None:
    low, high, method = score_interval([0.5, 1.0, 0.75])
    # mean 0.75, sd 0.25, n 3: t(0.975, 2 df) = 4.303
    assert method == "t"
    assert (low, high) == pytest.approx(
        (0.75 - 4.303 * 0.25 / 3**0.5, 0.75 + 4.303 * 0.25 / 3**0.5)
    )
    assert score_interval([]) == (None, None, None)
    assert score_interval([0.5]) == (None, None, None)


def test_the_page_gives_the_runs_context(tmp_path: Path) -> None:
    page = evaluation_page(tmp_path)
    context = page[page.index('<dl class="context">') : page.index("</dl>")]

    for text in (
        "eval.csv",
        "2023-11-14 22:13:20 UTC",
        "gpt-a, gpt-b",
        "Q: {text}",
        "exact against column &#x27;expected&#x27;",
        "00eb3719b970f5ba",
    ):
        assert text in context, text


def test_without_a_checkpoint_the_page_says_the_context_is_unknown(tmp_path: Path) -> None:
    path = write_long(tmp_path / "long.parquet")
    context = run_context(path)
    assert "written" in context and "no checkpoint manifest" in context["note"]


def table_rows(page: str, css_class: str) -> list[list[str]]:
    """The cells (text) of each body row of the first <table class=css_class>."""
    start = page.index(f'<table class="{css_class}">')
    table = page[start : page.index("</table>", start)]
    body = table[table.index("<tbody>") :]
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", cell))
            for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)
        ]
        for row in re.findall(r"<tr>(.*?)</tr>", body)
    ]


def test_rows_where_models_disagree_or_are_wrong_are_listed_with_each_answer(
    tmp_path: Path,
) -> None:
    rows = table_rows(evaluation_page(tmp_path), "rows")

    # row 1: both "yes", both right: left out; row 2: gpt-b invalid; row 3: gpt-a wrong,
    # gpt-b failed. Columns: row, the prompt's column, expected, each model's answer.
    assert rows == [
        ["2", "q2", "no", "no", "maybe [invalid]"],
        ["3", "q3", "no", "yes [wrong]", " [error]"],
    ]


def test_hostile_prompt_text_is_escaped_in_the_rows_table(tmp_path: Path) -> None:
    path = tmp_path / "long.parquet"
    hostile = '<img src=x onerror="alert(1)"></td></table><script>x</script>'
    rows = [
        {"text": hostile, "expected": "a", "model": m, "status": "ok", "completion": c}
        for m, c in (("m1", "a"), ("m2", "b"))
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    write_manifest(path, prompt_column="text", expected_column="expected")
    frame = load_output(path)
    page = render_html(comparison_table(frame), frame, context=run_context(path))

    assert "<img" not in page and "<script>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&lt;/td&gt;&lt;/table&gt;" in page
    assert [row[1:] for row in table_rows(page, "rows")] == [[hostile, "a", "a", "b"]]


def test_a_confusion_matrix_per_model_counts_expected_against_answered_labels(
    tmp_path: Path,
) -> None:
    labelled = {
        "gpt-a": {**RESULTS["gpt-a"], "label": ["yes", "no", "yes"]},
        "gpt-b": {**RESULTS["gpt-b"], "label": ["yes", None, None]},
    }
    page = evaluation_page(tmp_path, labelled)
    start = page.index("Confusion matrices")
    first, second = (
        table_rows(page[page.index(f"<figcaption>{m}</figcaption>", start) :], "confusion")
        for m in ("gpt-a", "gpt-b")
    )

    assert first == [["no", "1", "1"], ["yes", "0", "1"]]  # columns: no, yes
    assert second == [["no", "0", "0", "1", "1"], ["yes", "0", "1", "0", "0"]]
    heads = page[page.index("<figcaption>gpt-b</figcaption>", start) :]
    assert re.search(r"<th>no</th><th>yes</th><th>\(error\)</th><th>\(invalid\)</th>", heads)


def test_cost_against_score_has_a_point_per_priced_model(tmp_path: Path) -> None:
    page = evaluation_page(tmp_path)
    points = parse(page).having("circle", "point")

    assert len(points) == 1  # gpt-b has no cost: named below the chart instead
    assert "No known cost, not drawn: gpt-b." in page


def test_nothing_scored_draws_no_score_panel(tmp_path: Path) -> None:
    unscored = {m: {k: v for k, v in r.items() if k != "score"} for m, r in RESULTS.items()}
    page = page_of(tmp_path, unscored)

    assert "Mean score" not in page and not parse(page).having("rect", "bar")
    assert "Nothing was scored" in page


def test_latency_has_a_log_axis_that_shows_the_tail(tmp_path: Path) -> None:
    slow = {**RESULTS["gpt-b"], "status": ["ok"] * 3, "latency_ms": [1000.0, 1500.0, 30000.0]}
    page = page_of(tmp_path, {"gpt-a": RESULTS["gpt-a"], "gpt-b": slow})
    elements = parse(page)
    bins = [t for t in elements.svg_titles if " ms: " in t and not t.endswith(": 0")]

    # 100, 200, 300, 1000, 1500 and 30000 ms each in a bin of its own on the shared axis
    assert len(bins) == 6
    assert "latency, ms (log scale)" in page
    assert all(tick in page for tick in (">100 ms<", ">1 s<", ">10 s<"))
    assert "p99 30,000" in page


def test_the_report_of_a_real_run_gives_its_context_confusion_and_wrong_rows(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    data = pd.DataFrame(
        {
            "q": ["first [[sim:label=yes]]", "second [[sim:label=no]]", "<b>third</b>"],
            "gold": ["yes", "yes", "no"],
        }
    )
    out = tmp_path / "o.parquet"
    frame = pipeline.run(
        data,
        out,
        base_url=simulator.base_url,
        progress=False,
        prompt_column="q",
        labels="yes,no",
        expected_column="gold",
        score="exact",
        model=["gpt-4o-mini", "gpt-4.1"],
    )
    fingerprint = frame.attrs["summary"]["fingerprint"]
    third = frame["label"].tolist()[4:6]  # each model's pick for the third row (no rule)

    report = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", str(out), "--html", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert report.returncode == 0, report.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    context = page[page.index('<dl class="context">') : page.index("</dl>")]
    assert fingerprint in context and "exact against column &#x27;gold&#x27;" in context
    assert "<dd>q</dd>" in context  # the prompt column
    wrong = table_rows(page, "rows")
    assert wrong[0][:3] == ["2", "second [[sim:label=no]]", "yes"]
    assert ("<b>third</b>" in wrong[-1][1]) == (third != ["no", "no"]) and "<b>" not in page
    start = page.index("<figcaption>gpt-4o-mini</figcaption>", page.index("Confusion"))
    matrix = table_rows(page[start:], "confusion")
    right = 1 if third[0] == "no" else 0
    assert matrix == [["no", str(right), str(1 - right)], ["yes", "1", "1"]]
