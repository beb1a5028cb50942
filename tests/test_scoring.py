"""Scoring answers against expected values, and the per-model summary of an evaluation run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.scoring import ALL_ROWS, make_scorer, percentile, summarize_scores

# -- scorers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected", "score"),
    [
        ("Paris", "Paris", 1.0),
        ("  paris\n", "PARIS", 1.0),
        ("New  York", "new york", 1.0),
        ("Paris.", "Paris", 0.0),  # punctuation is part of the answer
        ("Paris, France", "Paris", 0.0),
        ("4", 4, 1.0),
        ("4", 4.0, 1.0),  # an integer column with gaps reads back as float
        ("true", True, 1.0),
    ],
)
def test_exact_compares_normalised_text(answer: str, expected: Any, score: float) -> None:
    assert make_scorer("exact")(answer, expected) == score


@pytest.mark.parametrize(
    ("answer", "expected", "score"),
    [
        ("The capital is PARIS.", "paris", 1.0),
        ("The capital is Lyon.", "paris", 0.0),
        ("it is new\nyork", "New York", 1.0),
    ],
)
def test_contains_finds_the_expected_text(answer: str, expected: str, score: float) -> None:
    assert make_scorer("contains")(answer, expected) == score


@pytest.mark.parametrize(
    ("answer", "pattern", "score"),
    [
        ("The answer is 42.", r"\b42\b", 1.0),  # search, not full match
        ("The answer is 420.", r"\b42\b", 0.0),
        ("42", r"^\d+$", 1.0),
        ("42 apples", r"^\d+$", 0.0),  # anchor for a full match
        ("YES", r"yes", 0.0),  # case-sensitive by default
        ("YES", r"(?i)yes", 1.0),
    ],
)
def test_regex_searches_the_expected_pattern(answer: str, pattern: str, score: float) -> None:
    assert make_scorer("regex")(answer, pattern) == score


def test_a_pattern_that_does_not_compile_is_not_scored() -> None:
    assert make_scorer("regex")("anything", "([unclosed") is None


@pytest.mark.parametrize(
    ("answer", "expected", "score"),
    [
        ('{"answer": {"city": "Paris"}}', "paris", 1.0),
        ('```json\n{"answer": {"city": " Paris "}}\n```', "Paris", 1.0),
        ('{"answer": {"city": "Lyon"}}', "Paris", 0.0),
        ('{"answer": {}}', "Paris", 0.0),
        ("Paris", "Paris", 0.0),  # not JSON at all
    ],
)
def test_json_field_compares_one_field(answer: str, expected: str, score: float) -> None:
    assert make_scorer("json-field=answer.city")(answer, expected) == score


def test_json_field_paths_index_lists() -> None:
    scorer = make_scorer("json-field=items.1.name")
    answer = '{"items": [{"name": "a"}, {"name": "b"}]}'
    assert scorer(answer, "b") == 1.0
    assert scorer(answer, "a") == 0.0
    assert make_scorer("json-field=items.5.name")(answer, "b") == 0.0


@pytest.mark.parametrize(
    ("value", "expected", "score"),
    [
        ("4", 4, 1.0),
        ("4", "4", 1.0),
        ("4", 4.0, 1.0),
        ("4.5", "4.5", 1.0),
        ("4", 5, 0.0),
        ("true", "true", 1.0),
        ("true", True, 1.0),
        ("1", True, 0.0),  # a boolean is not a number
        ('["a", "b"]', '["a", "b"]', 1.0),
        ('"4"', 4, 1.0),  # a string field compares as text
    ],
)
def test_json_field_compares_json_values(value: str, expected: Any, score: float) -> None:
    assert make_scorer("json-field=v")(f'{{"v": {value}}}', expected) == score


@pytest.mark.parametrize("spec", ["exact", "contains", "regex", "json-field=a"])
@pytest.mark.parametrize("expected", [None, float("nan"), pd.NA, np.nan])
def test_nothing_expected_is_not_scored(spec: str, expected: Any) -> None:
    assert make_scorer(spec)("answer", expected) is None


@pytest.mark.parametrize("spec", ["exact", "contains", "regex", "json-field=a"])
def test_no_answer_is_not_scored(spec: str) -> None:
    assert make_scorer(spec)(None, "x") is None


@pytest.mark.parametrize(
    "spec", ["exactly", "json-field", "json-field=", "json-field=a..b", "exact=1", ""]
)
def test_an_unknown_scorer_is_a_config_error_listing_the_choices(spec: str) -> None:
    with pytest.raises(ConfigError, match="json-field=") as caught:
        make_scorer(spec)
    assert "--score" in str(caught.value)


# -- summaries -----------------------------------------------------------------------------


def row(model: Any, status: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"model": model, "status": status, **fields}


def test_summary_per_model_in_order_of_appearance() -> None:
    records = [
        row("b", score=1.0, prompt_tokens=10, completion_tokens=2, latency_ms=100.0),
        row("a", score=0.0, prompt_tokens=5, completion_tokens=1, latency_ms=50.0),
        row("b", score=0.0, prompt_tokens=10, completion_tokens=3, latency_ms=300.0),
        row("b", "invalid", score=0.0, prompt_tokens=20, completion_tokens=9, latency_ms=200.0),
        row("b", "error", score=None, prompt_tokens=None, latency_ms=9999.0),
        row("b", "pending"),
    ]
    b, a = summarize_scores(records)

    assert (b.model, a.model) == ("b", "a")
    assert (b.rows, b.ok, b.invalid, b.error, b.other) == (5, 2, 1, 1, 1)
    assert b.scored == 3 and b.mean_score == pytest.approx(1 / 3)
    assert (b.prompt_tokens, b.completion_tokens) == (40, 14)
    # latency of answered rows only: the error's 9999 ms is not the model's latency
    assert b.latency_p50_ms == 200.0
    assert b.invalid_rate == pytest.approx(1 / 3)
    assert (a.rows, a.mean_score, a.invalid_rate) == (1, 0.0, 0.0)


def test_cost_is_none_when_unknown_and_sums_what_is_known() -> None:
    records = [
        row("priced", cost_usd=0.25),
        row("priced", cost_usd=None),
        row("priced", cost_usd=float("nan")),
        row("priced", cost_usd=0.5),
        row("unpriced"),
        row("unpriced", cost_usd=None),
    ]
    priced, unpriced = summarize_scores(records)
    assert priced.cost_usd == pytest.approx(0.75)
    assert unpriced.cost_usd is None


def test_latency_percentiles_interpolate_like_numpy() -> None:
    records = [row("m", latency_ms=float(ms)) for ms in range(1, 101)]
    [summary] = summarize_scores(records)

    assert summary.latency_p50_ms == pytest.approx(50.5)
    assert summary.latency_p90_ms == pytest.approx(90.1)
    assert summary.latency_p99_ms == pytest.approx(99.01)


def test_a_model_without_answers_has_no_score_or_latency() -> None:
    [summary] = summarize_scores([row("m", "error"), row("m", "error")])
    assert summary.mean_score is None and summary.scored == 0
    assert summary.latency_p50_ms is None and summary.invalid_rate is None


def test_rows_without_a_model_are_summarised_together() -> None:
    [summary] = summarize_scores([{"status": "ok", "score": 1.0}, row(None), row(float("nan"))])
    assert summary.model == ALL_ROWS and summary.rows == 3


def test_list_scores_count_every_sample() -> None:
    records = [row("m", score=[1.0, 0.0, 1.0]), row("m", score=np.array([0.0, None]))]
    [summary] = summarize_scores(records)
    assert summary.scored == 4 and summary.mean_score == pytest.approx(0.5)


def test_as_dict_is_json_ready_with_the_invalid_rate() -> None:
    [summary] = summarize_scores([row("m", score=1.0), row("m", "invalid")])
    view = summary.as_dict()
    assert view["model"] == "m" and view["invalid_rate"] == 0.5 and view["cost_usd"] is None


def test_pandas_records_with_nan_and_na_are_understood() -> None:
    frame = pd.DataFrame(
        {
            "model": ["m", "m", "m"],
            "status": ["ok", "ok", "error"],
            "score": [1.0, np.nan, np.nan],
            "prompt_tokens": pd.array([3, None, None], dtype="Int64"),
            "latency_ms": [10.0, 30.0, np.nan],
        }
    )
    [summary] = summarize_scores(frame.to_dict("records"))
    assert summary.scored == 1 and summary.prompt_tokens == 3
    assert summary.latency_p50_ms == 20.0


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_percentiles_agree_with_numpy_and_are_ordered(values: list[float]) -> None:
    p50, p90, p99 = (percentile(values, q) for q in (50, 90, 99))
    assert p50 is not None and p90 is not None and p99 is not None
    assert min(values) <= p50 <= p90 <= p99 <= max(values)
    for q, got in ((50, p50), (90, p90), (99, p99)):
        assert math.isclose(got, float(np.percentile(values, q)), rel_tol=1e-9, abs_tol=1e-6)
