"""The estimate: what a run would send and cost, known before anything is sent.

Rows, the requests left after deduplication and the cache, prompt tokens (tiktoken when
installed, else a documented approximation), completion tokens as a range from 0 to
max_tokens with a typical figure, and the cost of each end of the range from the price table.
"""

from __future__ import annotations

import json
import math
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest

from pipeline.estimate import (
    APPROXIMATION,
    DEFAULT_TYPICAL_COMPLETION,
    ApproxCounter,
    Estimate,
    Estimator,
    TiktokenCounter,
    count_prompt_tokens,
    encoding_name,
    request_identity,
    token_counter,
)
from pipeline.pricing import PriceTable
from pipeline.records import Message


# pipeline.estimate.estimate was used only by these tests; the runner and the CLI drive
# Estimator directly, so the same few lines live here now.
def estimate(
    requests: Iterable[Sequence[Message] | None],
    *,
    model: str,
    max_tokens: int | None,
    prices: PriceTable,
    typical_completion: int | None = None,
    dedup: bool = True,
    cached: Callable[[Sequence[Message]], bool] | None = None,
    tokenizer: str = "auto",
) -> Estimate:
    estimator = Estimator(model=model, dedup=dedup, cached=cached, tokenizer=tokenizer)
    estimator.add(requests)
    return estimator.result(
        max_tokens=max_tokens, prices=prices, typical_completion=typical_completion
    )


SYSTEM = {"role": "system", "content": "Answer with one word."}


def user(text: str) -> list[Message]:
    return [SYSTEM, {"role": "user", "content": text}]


def approx_tokens(messages: Sequence[Message]) -> int:
    chars = sum(len(m["content"]) for m in messages)
    return math.ceil(chars / 4) + 4 * len(messages) + 3


@pytest.fixture(scope="module")
def prices() -> PriceTable:
    return PriceTable.load()


# -- token counting -----------------------------------------------------------------------


def test_approximation_is_the_documented_formula() -> None:
    counter = ApproxCounter()
    assert counter.name == APPROXIMATION == "approximation: ceil(chars/4) + 4 per message + 3"
    # 21 + 5 = 26 chars -> 7 tokens, + 4 x 2 messages + 3
    assert counter.count(user("hello")) == 7 + 8 + 3
    assert counter.count([{"role": "user", "content": ""}]) == 0 + 4 + 3
    # a name and content parts count; an image part counts a fixed figure
    parts = [
        {
            "role": "user",
            "name": "abcd",
            "content": [
                {"type": "text", "text": "12345678"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9999}},
            ],
        }
    ]
    assert counter.count(parts) == 3 + 4 + 3 + 85


def test_encoding_follows_the_model_family() -> None:
    assert encoding_name("gpt-4o-mini") == "o200k_base"
    assert encoding_name("openai/gpt-4.1-2025-04-14") == "o200k_base"
    assert encoding_name("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name("meta-llama/Llama-3.3-70B-Instruct-Turbo") == "cl100k_base"


class WordEncoding:
    """A stand-in tokenizer: one token per space-separated word."""

    def encode_ordinary(self, text: str) -> list[str]:
        return text.split()


def test_tokenizer_path_adds_openai_chat_framing() -> None:
    counter = TiktokenCounter(WordEncoding(), "words")
    assert counter.name == "tiktoken words"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two three", "name": "ann"},
    ]
    # 3 priming + per message 3 + role + content (+1 and the name's tokens for a name)
    assert counter.count(messages) == 3 + (3 + 1 + 2) + (3 + 1 + 3 + 1 + 1)


@pytest.fixture
def fake_tiktoken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A stand-in ``tiktoken`` module (no download, no install); yields the encodings asked."""
    asked: list[str] = []

    def get_encoding(name: str) -> WordEncoding:
        asked.append(name)
        if name == "broken":
            raise OSError("no network")
        return WordEncoding()

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=get_encoding))
    token_counter.cache_clear()
    yield asked
    token_counter.cache_clear()


def test_tiktoken_is_used_when_importable_with_the_model_encoding(
    fake_tiktoken: list[str], prices: PriceTable
) -> None:
    assert token_counter("gpt-4o-mini").name == "tiktoken o200k_base"
    assert (
        count_prompt_tokens([{"role": "user", "content": "a b c"}], "gpt-4o-mini") == 3 + 3 + 1 + 3
    )
    assert token_counter("gpt-4o-mini", tokenizer="approx").name == APPROXIMATION
    result = estimate(
        [user("x")], model="mistralai/Mistral-7B-Instruct-v0.2", max_tokens=1, prices=prices
    )
    assert result.tokenizer == "tiktoken cl100k_base"
    assert any("own tokenizer" in note for note in result.notes)
    assert fake_tiktoken == ["o200k_base", "cl100k_base"]


def test_a_tiktoken_that_cannot_load_falls_back_to_the_approximation(
    fake_tiktoken: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.estimate.encoding_name", lambda model: "broken")
    assert token_counter("gpt-4o").name == APPROXIMATION


def test_identity_ignores_key_order_but_not_content() -> None:
    a = [{"role": "user", "content": "x"}]
    assert request_identity(a) == request_identity([{"content": "x", "role": "user"}])
    assert request_identity(a) != request_identity([{"role": "user", "content": "y"}])
    assert request_identity(a) != request_identity([{"role": "system", "content": "x"}])
    named = [{"role": "user", "content": "x", "name": "n"}]
    assert request_identity(named) == request_identity(
        [{"name": "n", "content": "x", "role": "user"}]
    )
    assert request_identity(named) != request_identity(a)


# -- the estimate -------------------------------------------------------------------------


def test_completion_tokens_and_cost_run_from_zero_to_max_tokens(prices: PriceTable) -> None:
    rows = [user("good"), user("bad"), user("fine")]
    result = estimate(rows, model="gpt-4o-mini", max_tokens=100, prices=prices, tokenizer="approx")
    prompt = sum(approx_tokens(r) for r in rows)
    assert (result.rows, result.requests, result.duplicates, result.cache_hits) == (3, 3, 0, 0)
    assert result.prompt_tokens == prompt
    assert result.completion_tokens_low == 0
    assert result.completion_tokens_high == 300
    assert result.completion_tokens_typical == 300  # the default typical figure is capped
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens
    assert result.cost_low == pytest.approx(prompt * 0.15e-6)
    assert result.cost_high == pytest.approx(prompt * 0.15e-6 + 300 * 0.60e-6)
    assert result.priced_as == "gpt-4o-mini"
    assert result.tokenizer == APPROXIMATION


def test_typical_figure_is_given_or_defaulted(prices: PriceTable) -> None:
    rows = [user(str(i)) for i in range(10)]
    given = estimate(
        rows,
        model="gpt-4o",
        max_tokens=1000,
        prices=prices,
        typical_completion=50,
        tokenizer="approx",
    )
    assert given.completion_tokens_typical == 500
    low, typical, high = given.cost_low, given.cost_typical, given.cost_high
    assert low is not None and typical is not None and high is not None
    assert low < typical < high
    default = estimate(rows, model="gpt-4o", max_tokens=1000, prices=prices, tokenizer="approx")
    assert default.typical_per_request == DEFAULT_TYPICAL_COMPLETION
    assert any("typical assumes" in note for note in default.notes)


def test_without_max_tokens_the_high_end_is_unbounded(prices: PriceTable) -> None:
    result = estimate([user("x")], model="gpt-4o-mini", max_tokens=None, prices=prices)
    assert result.completion_tokens_high is None
    assert result.cost_high is None
    assert result.cost_low is not None and result.cost_typical is not None
    assert any("max-tokens" in note for note in result.notes)
    assert "no limit" in result.format()


def test_duplicate_rows_are_counted_once_and_no_dedup_sends_each(prices: PriceTable) -> None:
    reordered = [
        {"content": "Answer with one word.", "role": "system"},
        {"content": "same", "role": "user"},
    ]
    rows = [user("same"), user("same"), user("other"), reordered]
    deduped = estimate(rows, model="gpt-4o-mini", max_tokens=10, prices=prices, tokenizer="approx")
    assert (deduped.rows, deduped.duplicates, deduped.requests) == (4, 2, 2)
    assert deduped.prompt_tokens == approx_tokens(user("same")) + approx_tokens(user("other"))
    assert deduped.completion_tokens_high == 20
    each = estimate(
        rows, model="gpt-4o-mini", max_tokens=10, prices=prices, dedup=False, tokenizer="approx"
    )
    assert (each.duplicates, each.requests, each.completion_tokens_high) == (0, 4, 40)


def test_cache_hits_are_counted_and_cost_nothing(prices: PriceTable) -> None:
    in_cache = {"cached one", "cached two"}
    asked: list[str] = []

    def cached(messages: Sequence[Message]) -> bool:
        asked.append(messages[-1]["content"])
        return messages[-1]["content"] in in_cache

    rows = [user("cached one"), user("cached one"), user("cached two"), user("new")]
    result = estimate(
        rows, model="gpt-4o-mini", max_tokens=10, prices=prices, cached=cached, tokenizer="approx"
    )
    assert (result.duplicates, result.cache_hits, result.requests) == (1, 2, 1)
    assert result.prompt_tokens == approx_tokens(user("new"))
    assert asked == ["cached one", "cached two", "new"]  # once per distinct request


def test_rows_without_a_request_are_counted_as_skipped(prices: PriceTable) -> None:
    result = estimate(
        [user("a"), None, [], user("b")], model="gpt-4o-mini", max_tokens=5, prices=prices
    )
    assert (result.rows, result.skipped, result.requests) == (4, 2, 2)


def test_unknown_model_has_no_cost_and_says_so(prices: PriceTable) -> None:
    result = estimate([user("x")], model="acme/unknown-1", max_tokens=10, prices=prices)
    assert result.requests == 1 and result.prompt_tokens > 0
    assert (result.cost_low, result.cost_typical, result.cost_high) == (None, None, None)
    assert result.price is None and result.priced_as is None
    assert any("acme/unknown-1" in note and "no price" in note for note in result.notes)
    assert "unknown" in result.format()


def test_estimator_accumulates_batches_like_one_pass(prices: PriceTable) -> None:
    rows = [user(str(i % 7)) for i in range(50)]
    whole = estimate(rows, model="gpt-4.1", max_tokens=20, prices=prices, tokenizer="approx")
    estimator = Estimator(model="gpt-4.1", tokenizer="approx")
    for start in range(0, 50, 8):
        estimator.add(rows[start : start + 8])
    assert estimator.result(max_tokens=20, prices=prices) == whole
    assert whole.requests == 7 and whole.duplicates == 43


def test_as_dict_is_json_and_format_shows_the_figures(prices: PriceTable) -> None:
    result = estimate(
        [user("a"), user("a"), user("b")], model="gpt-4o-mini", max_tokens=10, prices=prices
    )
    data: dict[str, Any] = json.loads(json.dumps(result.as_dict()))
    assert data["rows"] == 3 and data["duplicates"] == 1 and data["requests"] == 2
    assert data["completion_tokens"] == {
        "low": 0,
        "typical": 20,
        "high": 20,
        "typical_per_request": 10,
        "max_tokens": 10,
    }
    assert data["cost_usd"]["high"] == pytest.approx(result.cost_high)
    assert data["price"]["model"] == "gpt-4o-mini" and data["price"]["input"] == 0.15
    text = result.format()
    assert "nothing was sent" in text
    assert "gpt-4o-mini" in text and "0 to 20" in text and "$" in text


def test_nothing_to_send_costs_nothing(prices: PriceTable) -> None:
    result = estimate([None, None], model="gpt-4o-mini", max_tokens=10, prices=prices)
    assert result.requests == 0
    assert (result.cost_low, result.cost_high) == (0.0, 0.0)
