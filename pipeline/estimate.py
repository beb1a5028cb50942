"""What a run would cost before it runs: rows, requests, tokens and USD as ranges.

Owns prompt-token counting (``count_prompt_tokens``), the count of rows that deduplication or
the response cache would spare, and the arithmetic of the estimate. It is given the messages
of each row and sends nothing; reading the input and building messages is the caller's (the
same code path as ``run``), and so is the check "is this request in the cache".

Prompt tokens. With ``tiktoken`` installed (an optional extra) they are counted with the
model's encoding (``o200k_base`` for the gpt-4o, gpt-4.1, gpt-5 and o-series families,
``cl100k_base`` otherwise, which for open models is itself only an approximation) plus
OpenAI's chat framing: 3 tokens a message, 1 more for a ``name``, 3 to prime the reply.
tiktoken fetches its encoding file on first use unless it is cached (``TIKTOKEN_CACHE_DIR``).
Without it the approximation is::

    ceil(chars / 4) + 4 * messages + 3

where *chars* counts the characters of every message's text content (and of any field
besides ``role``, such as ``name`` or ``tool_calls`` as JSON) over the whole request, and an
image part counts ``IMAGE_PART_TOKENS``. Four characters a token fits English prose; code,
numbers and non-Latin scripts take more tokens, CJK text up to about four times as many.

Completion tokens are a range: 0 to ``max_tokens`` a request (no upper bound without
``max_tokens``), with a typical figure of ``typical_completion`` a request (default
``DEFAULT_TYPICAL_COMPLETION``, never above ``max_tokens``). Costs are those token ranges
priced by the table; input tokens are priced at the full input rate (no cache discount).

Samples (``--n K``). Each row asks for K completions: with the API's ``n`` (``native``, and
``auto`` as long as the server honours it) in one request, else in K requests that each
send the prompt again. Completion tokens and the request count scale accordingly; in
``auto`` mode the estimate assumes the server honours ``n`` and says so.

Duplicates. A run's estimate takes them from the key pass, as the run does (a row whose
prompt an earlier row has); given messages alone, from a 64-bit hash of each request
(equal as JSON, key order ignored: ~3 in 100 million miscounted among 1M requests).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Protocol

from .pricing import Price, PriceTable
from .records import Message

APPROXIMATION = "approximation: ceil(chars/4) + 4 per message + 3"
DEFAULT_TYPICAL_COMPLETION = 200
IMAGE_PART_TOKENS = 85  # OpenAI's charge for one low-detail image; larger images cost more
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_JSON_MARK = "\0json"  # stands in for the role of a message hashed as JSON


class TokenCounter(Protocol):
    """Counts the prompt tokens of one request's messages."""

    name: str

    def count(self, messages: Sequence[Message]) -> int: ...


def encoding_name(model: str | None) -> str:
    """The tiktoken encoding for ``model``: o200k_base for recent OpenAI families."""
    base = (model or "").casefold().rsplit("/", 1)[-1]
    return "o200k_base" if base.startswith(_O200K_PREFIXES) else "cl100k_base"


class ApproxCounter:
    """The documented approximation: ceil(chars/4) + 4 per message + 3."""

    name = APPROXIMATION

    def count(self, messages: Sequence[Message]) -> int:
        chars = extra = 0
        for message in messages:
            content = message.get("content")
            if type(content) is str and len(message) == 2:
                chars += len(content)
            else:
                more_chars, more_tokens = _message_size(message)
                chars += more_chars
                extra += more_tokens
        return -(-chars // 4) + 4 * len(messages) + 3 + extra


def _message_size(message: Message) -> tuple[int, int]:
    """(characters, extra tokens) of a message that is not plain {role, content: str}."""
    chars = extra = 0
    for key, value in message.items():
        if key == "role" or value is None:
            continue
        if isinstance(value, str):
            chars += len(value)
        elif key == "content" and isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
                elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                    extra += IMAGE_PART_TOKENS
                else:
                    chars += len(json.dumps(part, ensure_ascii=False, default=str))
        else:
            chars += len(json.dumps(value, ensure_ascii=False, default=str))
    return chars, extra


class TiktokenCounter:
    """Exact counts with tiktoken, plus OpenAI's chat framing tokens."""

    def __init__(self, encoding: Any, encoding_name: str) -> None:
        self.encode = encoding.encode_ordinary  # ordinary: "<|endoftext|>" is plain text here
        self.name = f"tiktoken {encoding_name}"
        self._memo: dict[str, int] = {}  # system prompts and other repeated texts

    def _text(self, text: str, repeated: bool) -> int:
        if repeated:
            found = self._memo.get(text)
            if found is None:
                found = len(self.encode(text))
                if len(self._memo) < 4096:
                    self._memo[text] = found
            return found
        return len(self.encode(text))

    def count(self, messages: Sequence[Message]) -> int:
        total = 3
        for message in messages:
            total += 3
            repeated = message.get("role") != "user"
            for key, value in message.items():
                if value is None:
                    continue
                if key == "name":
                    total += 1
                if isinstance(value, str):
                    total += self._text(value, repeated or key == "role")
                elif key == "content" and isinstance(value, list):
                    for part in value:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            total += self._text(part["text"], repeated)
                        elif isinstance(part, dict) and part.get("type") in (
                            "image_url",
                            "input_image",
                        ):
                            total += IMAGE_PART_TOKENS
                        else:
                            total += self._text(json.dumps(part, ensure_ascii=False), False)
                else:
                    total += self._text(json.dumps(value, ensure_ascii=False, default=str), False)
        return total


@functools.lru_cache(maxsize=8)
def token_counter(model: str | None = None, *, tokenizer: str = "auto") -> TokenCounter:
    """tiktoken when importable and ``tokenizer`` is "auto", else the approximation.

    ``tokenizer="approx"`` forces the approximation. A tiktoken that cannot load its
    encoding (for example offline with no cached file) falls back to the approximation too.
    """
    if tokenizer not in ("auto", "approx"):
        raise ValueError(f"tokenizer must be 'auto' or 'approx', not {tokenizer!r}")
    if tokenizer == "auto":
        try:
            import tiktoken
        except ImportError:
            return ApproxCounter()
        name = encoding_name(model)
        try:
            encoding = tiktoken.get_encoding(name)
        except Exception:  # network, cache or version trouble: the estimate still works
            return ApproxCounter()
        return TiktokenCounter(encoding, name)
    return ApproxCounter()


def _is_openai(model: str) -> bool:
    base = model.casefold().removeprefix("openai/")
    return base.startswith(("gpt-", "chatgpt-", "o1", "o3", "o4"))


def count_prompt_tokens(messages: Sequence[Message], model: str | None = None) -> int:
    """Prompt tokens of one request (tiktoken if installed, else the approximation)."""
    return token_counter(model).count(messages)


def request_identity(messages: Sequence[Message]) -> int:
    """A hash equal for requests whose messages are equal as JSON (key order ignored)."""
    parts: list[Any] = []
    for message in messages:
        content = message.get("content")
        if type(content) is str and len(message) == 2 and "role" in message:
            parts.append(message["role"])
            parts.append(content)
        else:
            parts.append(_JSON_MARK)
            parts.append(json.dumps(message, sort_keys=True, ensure_ascii=False, default=str))
    return hash(tuple(parts))


@dataclass(frozen=True, slots=True)
class Estimate:
    """The estimate of one run; nothing was sent to make it.

    ``rows`` counts every input row given; ``skipped`` those that make no request (empty or
    invalid prompts); ``duplicates`` rows whose request equals an earlier row's (sent once);
    ``cache_hits`` distinct requests already in the response cache; ``requests`` what would
    be sent: rows - skipped - duplicates - cache_hits. Token and cost figures are for those
    ``requests`` only. ``*_high`` is None without ``max_tokens``; every ``cost_*`` is None
    when the model has no price (``notes`` says so). ``priced_as`` is the price table's id
    that priced ``model``.
    """

    model: str
    rows: int
    skipped: int
    duplicates: int
    cache_hits: int
    requests: int
    prompt_tokens: int
    completion_tokens_low: int
    completion_tokens_high: int | None
    completion_tokens_typical: int
    typical_per_request: int
    max_tokens: int | None
    cost_low: float | None
    cost_high: float | None
    cost_typical: float | None
    priced_as: str | None
    price: Price | None
    tokenizer: str
    notes: tuple[str, ...] = ()
    samples_per_row: int = 1  # --n: completions each row asks for

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        price = None
        if self.price is not None:
            price = {
                "model": self.priced_as,
                "input": self.price.input,
                "output": self.price.output,
                "cached_input": self.price.cached_input,
                "source": self.price.source,
                "date": self.price.date,
            }
        return {
            "model": self.model,
            "rows": self.rows,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "cache_hits": self.cache_hits,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": {
                "low": self.completion_tokens_low,
                "typical": self.completion_tokens_typical,
                "high": self.completion_tokens_high,
                "typical_per_request": self.typical_per_request,
                "max_tokens": self.max_tokens,
            },
            "cost_usd": {
                "low": self.cost_low,
                "typical": self.cost_typical,
                "high": self.cost_high,
            },
            "price": price,
            "tokenizer": self.tokenizer,
            "samples_per_row": self.samples_per_row,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """Human-readable text, one figure a line."""
        high_tokens = (
            "no limit (set --max-tokens)"
            if self.completion_tokens_high is None
            else (f"{self.completion_tokens_high:,}")
        )
        lines = [
            f"Estimate for model {self.model} (nothing was sent)",
            f"  rows               {self.rows:>14,}",
            f"  skipped            {self.skipped:>14,}   empty or invalid prompts",
            f"  duplicates         {self.duplicates:>14,}   sent once, the answer shared",
            f"  from cache         {self.cache_hits:>14,}",
            f"  requests to send   {self.requests:>14,}",
            f"  prompt tokens      {self.prompt_tokens:>14,}   ({self.tokenizer})",
            f"  completion tokens  {self.completion_tokens_low:,} to {high_tokens}; typical "
            f"{self.completion_tokens_typical:,} ({self.typical_per_request:,} a "
            f"{'sample' if self.samples_per_row > 1 else 'request'})",
        ]
        if self.samples_per_row > 1:
            lines.insert(6, f"  samples a row      {self.samples_per_row:>14,}")
        if self.cost_low is None or self.price is None:
            lines.append("  cost (USD)         unknown: no price for this model")
        else:
            high = "no limit" if self.cost_high is None else _usd(self.cost_high)
            typical = "" if self.cost_typical is None else f"; typical {_usd(self.cost_typical)}"
            lines.append(f"  cost (USD)         {_usd(self.cost_low)} to {high}{typical}")
            cached = (
                ""
                if self.price.cached_input is None
                else f", cached input ${self.price.cached_input:g}"
            )
            lines.append(
                f"  priced as {self.priced_as}: input ${self.price.input:g}, output "
                f"${self.price.output:g}{cached} per 1M tokens ({self.price.source}; "
                f"{self.price.date})"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def estimate_total(estimates: Sequence[Estimate]) -> dict[str, Any]:
    """The sums over several models' estimates (a run with ``--model`` given more than
    once). A cost is None when any model's is unknown: a partial sum would look complete."""

    def total(values: list[Any]) -> Any:
        return None if any(v is None for v in values) else sum(values)

    return {
        "models": [e.model for e in estimates],
        "requests": sum(e.requests for e in estimates),
        "prompt_tokens": sum(e.prompt_tokens for e in estimates),
        "completion_tokens": {
            "low": sum(e.completion_tokens_low for e in estimates),
            "typical": sum(e.completion_tokens_typical for e in estimates),
            "high": total([e.completion_tokens_high for e in estimates]),
        },
        "cost_usd": {
            "low": total([e.cost_low for e in estimates]),
            "typical": total([e.cost_typical for e in estimates]),
            "high": total([e.cost_high for e in estimates]),
        },
    }


def format_total(total: dict[str, Any]) -> str:
    """``estimate_total`` as text."""
    tokens, cost = total["completion_tokens"], total["cost_usd"]
    high = "no limit" if tokens["high"] is None else f"{tokens['high']:,}"
    if cost["low"] is None:
        cost_line = "unknown: a model has no price"
    else:
        cost_high = "no limit" if cost["high"] is None else _usd(cost["high"])
        cost_line = f"{_usd(cost['low'])} to {cost_high}; typical {_usd(cost['typical'])}"
    return "\n".join(
        [
            f"Total over {len(total['models'])} models ({', '.join(total['models'])})",
            f"  requests to send   {total['requests']:>14,}",
            f"  prompt tokens      {total['prompt_tokens']:>14,}",
            f"  completion tokens  {tokens['low']:,} to {high}; typical {tokens['typical']:,}",
            f"  cost (USD)         {cost_line}",
        ]
    )


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.6f}"


class Estimator:
    """Accumulates rows batch by batch (``add``), then prices them (``result``).

    ``cached`` is asked once per distinct request whether the response cache holds it.
    ``dedup=False`` counts every row as its own request, as ``--no-dedup`` sends it.
    ``samples`` completions a row: in one request with ``native`` n, else one request
    (with the prompt) each.
    """

    def __init__(
        self,
        *,
        model: str,
        dedup: bool = True,
        cached: Callable[[Sequence[Message]], bool] | None = None,
        tokenizer: str = "auto",
        samples: int = 1,
        native: bool = True,
    ) -> None:
        self.model = model
        self.samples = samples
        self.requests_per_row = 1 if native else samples
        self.dedup = dedup
        self.cached = cached
        self.counter = token_counter(model, tokenizer=tokenizer)
        self.rows = self.skipped = self.duplicates = self.cache_hits = 0
        self.requests = self.prompt_tokens = self.completions = 0
        self._seen: set[int] = set()

    def add(
        self,
        requests: Iterable[Sequence[Message] | None],
        repeated: Iterable[bool] | None = None,
    ) -> None:
        """Count rows: each item is a row's messages, or None for a row that is not sent;
        ``repeated``: which rows repeat an earlier row's prompt (else ``_repeats`` finds
        them, remembering each distinct request: tens of bytes each)."""
        count, cached, dedup = self.counter.count, self.cached, self.dedup
        rows = skipped = duplicates = hits = sent = tokens = 0
        flags = repeat(None) if repeated is None else repeated
        pairs = zip(requests, flags, strict=repeated is not None)
        for messages, again in pairs:
            rows += 1
            if not messages:
                skipped += 1
                continue
            if dedup and self._repeats(messages, again):
                duplicates += 1
                continue
            if cached is not None and cached(messages):
                hits += 1
                continue
            sent += 1
            tokens += count(messages)
        self.rows += rows
        self.skipped += skipped
        self.duplicates += duplicates
        self.cache_hits += hits
        self.requests += sent * self.requests_per_row
        self.prompt_tokens += tokens * self.requests_per_row
        self.completions += sent * self.samples

    def _repeats(self, messages: Sequence[Message], again: bool | None) -> bool:
        """Whether a row repeats an earlier row: as ``again`` says, else as seen so far."""
        if again is not None:
            return again
        before = len(self._seen)
        self._seen.add(request_identity(messages))
        return len(self._seen) == before

    def result(
        self, *, max_tokens: int | None, prices: PriceTable, typical_completion: int | None = None
    ) -> Estimate:
        """The estimate of the rows added so far."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        notes = list(prices.notes)
        typical = DEFAULT_TYPICAL_COMPLETION if typical_completion is None else typical_completion
        if typical < 0:
            raise ValueError("typical_completion must be 0 or more")
        if max_tokens is not None:
            typical = min(typical, max_tokens)
        if typical_completion is None:
            notes.append(
                f"typical assumes {typical} completion tokens a request; the real figure "
                "depends on the prompt (pass --typical-completion N, e.g. completion_tokens / sent "
                "from an earlier run's summary, to refine it)"
            )
        if max_tokens is None:
            notes.append("no --max-tokens: completion tokens and cost have no upper bound")
        requests = self.requests
        completions = self.completions
        high_tokens = None if max_tokens is None else max_tokens * completions
        typical_tokens = typical * completions
        resolved = prices.resolve(self.model)
        price = None if resolved is None else resolved[1]
        if price is None:
            notes.append(
                f"no price for model '{self.model}' in the price table: cost unknown. Add it "
                'to your own prices file ([models."ID"] input/output, see configs/prices.toml).'
            )
            cost_low = cost_high = cost_typical = None
        else:
            cost_low = price.cost(self.prompt_tokens, 0)
            cost_typical = price.cost(self.prompt_tokens, typical_tokens)
            cost_high = None if high_tokens is None else price.cost(self.prompt_tokens, high_tokens)
        if isinstance(self.counter, TiktokenCounter) and not _is_openai(self.model):
            notes.append(
                f"prompt tokens counted with {self.counter.name}, not {self.model}'s own "
                "tokenizer: expect some difference"
            )
        if self.counter.name == APPROXIMATION:
            notes.append(
                "prompt tokens approximated (4 characters a token); install tiktoken for "
                "exact counts"
            )
        return Estimate(
            model=self.model,
            rows=self.rows,
            skipped=self.skipped,
            duplicates=self.duplicates,
            cache_hits=self.cache_hits,
            requests=requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens_low=0,
            completion_tokens_high=high_tokens,
            completion_tokens_typical=typical_tokens,
            typical_per_request=typical,
            max_tokens=max_tokens,
            cost_low=cost_low,
            cost_high=cost_high,
            cost_typical=cost_typical,
            priced_as=None if resolved is None else resolved[0],
            price=price,
            tokenizer=self.counter.name,
            notes=tuple(notes),
            samples_per_row=self.samples,
        )
