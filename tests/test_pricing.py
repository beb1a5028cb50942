"""Prices: what a row costs, from the server's own figure or from usage and the price table.

The default table (``configs/prices.toml``) covers the AI/ML API's common chat models, each
with its source and date; a user's file replaces entries of the same id and adds new ones;
a malformed file is an error naming the file, the model and the field. Dated snapshot ids
find their family's price only where the table says snapshots cost the same.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.pricing import (
    COST_REPORTED,
    COST_TABLE,
    DEFAULT_PRICES_PATH,
    Price,
    PriceTable,
    reported_cost,
    row_cost,
)
from pipeline.records import Cost

REQUIRED_MODELS = (
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-0125",
    "gpt-3.5-turbo-1106",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "deepseek/deepseek-chat",
    "mistralai/Mistral-7B-Instruct-v0.2",
    "Qwen/Qwen2.5-72B-Instruct-Turbo",
)


@pytest.fixture(scope="module")
def prices() -> PriceTable:
    return PriceTable.load()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- the default table ------------------------------------------------------------------------


def test_default_table_prices_the_common_models_with_source_and_date(prices: PriceTable) -> None:
    assert DEFAULT_PRICES_PATH.is_file()
    assert prices.notes == ()
    for model in REQUIRED_MODELS:
        price = prices.price(model)
        assert price is not None, model
        assert price.input > 0 and price.output > 0, model
        assert price.source.strip() and "verify" in price.source, model
        assert len(price.date) == 10 and price.date[4] == "-", (model, price.date)
    assert set(REQUIRED_MODELS) <= set(prices.models)


def test_gpt_4o_mini_cost_is_computed_from_usage_and_the_table(prices: PriceTable) -> None:
    # 1,000 prompt tokens at $0.15/M + 500 completion tokens at $0.60/M
    assert prices.cost("gpt-4o-mini", 1000, 500) == pytest.approx(0.00015 + 0.0003)


def test_cached_tokens_cost_the_cached_rate_when_the_table_has_one(prices: PriceTable) -> None:
    # 600 uncached at $0.15/M + 400 cached at $0.075/M + 500 out at $0.60/M
    expected = 600 * 0.15e-6 + 400 * 0.075e-6 + 500 * 0.60e-6
    assert prices.cost("gpt-4o-mini", 1000, 500, cached_tokens=400) == pytest.approx(expected)


def test_cached_tokens_cost_the_input_rate_when_the_table_has_no_cached_rate(
    prices: PriceTable,
) -> None:
    price = prices.price("gpt-3.5-turbo")
    assert price is not None and price.cached_input is None
    assert prices.cost("gpt-3.5-turbo", 1000, 0, cached_tokens=400) == pytest.approx(
        1000 * price.input / 1e6
    )


def test_unknown_model_or_missing_usage_has_no_cost(prices: PriceTable) -> None:
    assert prices.price("no-such-model") is None
    assert prices.cost("no-such-model", 10, 10) is None
    assert prices.cost("gpt-4o-mini", None, 10) is None
    assert prices.cost("gpt-4o-mini", 10, None) is None
    assert prices.cost("gpt-4o-mini", -1, 10) is None


def test_model_ids_match_case_insensitively_and_by_alias(prices: PriceTable) -> None:
    assert prices.price("GPT-4o-Mini") == prices.price("gpt-4o-mini")
    assert prices.resolve("openai/gpt-4.1-2025-04-14") == ("gpt-4.1", prices.price("gpt-4.1"))


def test_dated_snapshot_finds_its_family_only_where_the_table_allows_it(
    prices: PriceTable,
) -> None:
    gpt_4o = prices.price("gpt-4o")
    assert prices.resolve("gpt-4o-2024-11-20") == ("gpt-4o", gpt_4o)
    assert prices.resolve("gpt-4o-mini-2024-07-18") is not None
    # the first gpt-4o snapshot has its own, higher price
    first = prices.price("gpt-4o-2024-05-13")
    assert first is not None and gpt_4o is not None and first.input > gpt_4o.input
    # gpt-3.5-turbo snapshots were priced differently: no guessing for unlisted ones
    assert prices.price("gpt-3.5-turbo-0613") is None


# -- a user's file ----------------------------------------------------------------------------


def test_user_file_overrides_an_entry_whole_and_adds_models(tmp_path: Path) -> None:
    user = write(
        tmp_path / "mine.toml",
        """
[models."gpt-4o-mini"]
input = 1.0
output = 2.0

[models."my-org/finetune-1"]
input = 3
output = 4
cached_input = 0.5
source = "contract 2026"
date = "2026-01-01"
""",
    )
    table = PriceTable.load(user)
    mini = table.price("gpt-4o-mini")
    assert mini == Price(1.0, 2.0, None, f"price file {user}", "unspecified")
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert table.price("my-org/finetune-1") == Price(3.0, 4.0, 0.5, "contract 2026", "2026-01-01")
    # untouched defaults stay
    assert table.price("gpt-4.1") == PriceTable.load().price("gpt-4.1")
    assert "my-org/finetune-1" in table.models


def test_user_entry_for_a_snapshot_or_alias_beats_the_default(tmp_path: Path) -> None:
    user = write(
        tmp_path / "mine.toml",
        """
[models."gpt-4o-2024-11-20"]
input = 9
output = 9

[models."cheap"]
input = 0
output = 0
aliases = ["openai/gpt-4.1"]
""",
    )
    table = PriceTable.load(user)
    snapshot = table.price("gpt-4o-2024-11-20")
    assert snapshot is not None and snapshot.input == 9
    assert table.resolve("openai/gpt-4.1") == ("cheap", table.price("cheap"))
    # the default entry keeps its id, only the alias moved
    resolved = table.resolve("gpt-4.1")
    assert resolved is not None and resolved[0] == "gpt-4.1"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[models."m"]\ninput = "0.15"\noutput = 1\n', ["'m'", "'input'", "'0.15'"]),
        ('[models."m"]\ninput = 1\n', ["'m'", "'output'", "missing"]),
        ('[models."m"]\ninput = 1\nouput = 2\n', ["'m'", "'ouput'", "unknown field"]),
        ('[models."m"]\ninput = -1\noutput = 1\n', ["'m'", "'input'", "-1"]),
        ('[models."m"]\ninput = 1\noutput = true\n', ["'m'", "'output'"]),
        ('[models."m"]\ninput = 1\noutput = 1\ncached_input = nan\n', ["'m'", "'cached_input'"]),
        ('[models."m"]\ninput = 1\noutput = 1\naliases = "x"\n', ["'m'", "'aliases'"]),
        ('[models."m"]\ninput = 1\noutput = 1\nsource = 3\n', ["'m'", "'source'"]),
        ('[models."m"]\ninput = 1\noutput = 1\n[models."M"]\ninput = 1\noutput = 1\n', ["'M'"]),
        ("models = 3\n", ["'models'"]),
        ('[model."m"]\ninput = 1\noutput = 1\n', ["'model'", "top-level"]),
        ('[models."m"\ninput = 1\n', ["not valid TOML"]),
    ],
)
def test_malformed_user_file_is_a_config_error_naming_file_model_and_field(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)


def test_missing_user_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PriceTable.load(tmp_path / "nope.toml")


# -- the server's own figure ---------------------------------------------------------------


def test_reported_cost_from_the_header() -> None:
    assert reported_cost({"x-aimlapi-usd-spent": "0.000315"}, None) == pytest.approx(0.000315)
    assert reported_cost({"X-AIMLAPI-USD-Spent": " 0.5 "}, {}) == pytest.approx(0.5)


def test_reported_cost_from_the_body_meta() -> None:
    body = {"choices": [], "meta": {"usage": {"credits_used": 120000, "usd_spent": 0.06}}}
    assert reported_cost({}, body) == pytest.approx(0.06)
    assert reported_cost({}, {"meta": {"usage": {"usd_spent": "0.02"}}}) == pytest.approx(0.02)


def test_reported_cost_header_wins_over_body() -> None:
    body = {"meta": {"usage": {"usd_spent": 0.06}}}
    assert reported_cost({"x-aimlapi-usd-spent": "0.05"}, body) == pytest.approx(0.05)
    # an unusable header falls back to the body
    assert reported_cost({"x-aimlapi-usd-spent": "n/a"}, body) == pytest.approx(0.06)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, None),
        ({}, {"meta": None}),
        ({}, {"meta": {"usage": "x"}}),
        ({}, {"meta": {"usage": {"usd_spent": True}}}),
        ({}, {"meta": {"usage": {"usd_spent": -1}}}),
        ({"x-aimlapi-usd-spent": "nan"}, None),
        ({"x-aimlapi-usd-spent": "inf"}, None),
        ({"x-aimlapi-usd-spent": ""}, None),
    ],
)
def test_reported_cost_is_none_when_absent_or_garbled(
    headers: dict[str, str], body: dict[str, object] | None
) -> None:
    assert reported_cost(headers, body) is None


def test_row_cost_says_where_the_figure_comes_from(prices: PriceTable) -> None:
    reported = row_cost(
        prices,
        model="gpt-4o-mini",
        prompt_tokens=1000,
        completion_tokens=500,
        reported=reported_cost({"x-aimlapi-usd-spent": "0.001"}, None),
    )
    assert reported == Cost(pytest.approx(0.001), COST_REPORTED)
    table = row_cost(prices, model="gpt-4o-mini", prompt_tokens=1000, completion_tokens=500)
    assert table == Cost(pytest.approx(0.00045), COST_TABLE)
    # priced by the model the server says it used when the requested one has no price
    by_response = row_cost(
        prices,
        model="my-router",
        response_model="gpt-4o-mini-2024-07-18",
        prompt_tokens=1000,
        completion_tokens=500,
    )
    assert by_response == Cost(pytest.approx(0.00045), COST_TABLE)
    assert row_cost(prices, model="x", prompt_tokens=1, completion_tokens=1) == Cost(None, None)


def test_price_arithmetic_is_per_million_tokens() -> None:
    price = Price(input=2.0, output=8.0, cached_input=0.5, source="s", date="d")
    assert math.isclose(price.cost(1_000_000, 1_000_000, 1_000_000), 0.5 + 8.0)


def test_batch_prices_are_the_entrys_own_or_half_and_need_both_fields(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    own.write_text(
        '[models."m"]\ninput = 1.0\noutput = 3.0\nbatch_input = 0.4\nbatch_output = 1.0\n'
    )
    price = PriceTable.load(own).price("m")
    assert price is not None
    batch, source = price.batch()
    assert (source, batch.cost(1_000_000, 1_000_000)) == ("batch_table", pytest.approx(1.4))
    half = tmp_path / "half.toml"
    half.write_text('[models."m"]\ninput = 1.0\noutput = 3.0\n')
    plain = PriceTable.load(half).price("m")
    assert plain is not None
    batch, source = plain.batch()
    assert (source, batch.cost(1_000_000, 1_000_000)) == ("batch", pytest.approx(2.0))
    one = tmp_path / "one.toml"
    one.write_text('[models."m"]\ninput = 1.0\noutput = 3.0\nbatch_input = 0.4\n')
    with pytest.raises(ConfigError, match="both batch_input and batch_output"):
        PriceTable.load(one)
