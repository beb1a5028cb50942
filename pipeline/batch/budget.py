"""``--max-cost`` / ``--max-total-tokens`` in batch mode: a batch is paid when it runs, so the
budget holds before each part is created.

``PartBudget`` knows what OUTPUT has spent (its checkpoint's results), what the parts already
created may still cost (their worst case: each line's prompt tokens, counted as ``pipeline
estimate`` counts them, plus its ``max_tokens`` x ``n`` completion tokens, at the model's batch
price), and admits a part only when its worst case fits beside both. A part that does not fit
is held back (not created, kept in the journal): a later run with a larger budget creates it.
When a part is merged its actual spend replaces its worst case. It sends nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..estimate import count_prompt_tokens
from ..pricing import PriceTable
from ..result_index import ResultIndex
from .journal import PartState
from .parts import read_lines


class PartBudget:
    """See the module docstring."""

    def __init__(self, config: RunConfig, index: ResultIndex, prices: PriceTable, where: Path):
        self.max_cost = config.max_cost
        self.max_tokens = config.max_total_tokens
        prompt_tokens, completion_tokens, self.spent_cost = index.spent
        self.spent_tokens = prompt_tokens + completion_tokens
        self.prices = prices
        self.share = prices.batch_share(config.base_url)  # the provider's batch share
        self.directory = where
        self.committed: dict[int, tuple[float, int]] = {}  # part -> its worst case
        self.held: set[int] = set()
        self._worst: dict[int, tuple[float, int]] = {}

    @property
    def active(self) -> bool:
        return self.max_cost is not None or self.max_tokens is not None

    def worst_case(self, state: PartState) -> tuple[float, int]:
        """(USD, tokens) the part can cost at most."""
        if state.part not in self._worst:
            self._worst[state.part] = self._count(state)
        return self._worst[state.part]

    def _count(self, state: PartState) -> tuple[float, int]:
        prompt = completion = 0
        for _, line in read_lines(self.directory / state.file):
            body = json.loads(line)["body"]
            prompt += count_prompt_tokens(body["messages"], state.model)
            most = body.get("max_tokens") or body.get("max_completion_tokens") or 0
            completion += int(most) * int(body.get("n") or 1)
        price = self.prices.price(state.model)
        usd = 0.0 if price is None else price.batch(self.share)[0].cost(prompt, completion)
        return usd, prompt + completion

    def commit_created(self, parts: dict[int, PartState]) -> None:
        """Parts created by an earlier run and not merged yet may still cost their worst."""
        for state in parts.values():
            if state.batch_id is not None and not state.merged and self.active:
                self.committed[state.part] = self.worst_case(state)

    def admit(self, state: PartState) -> str | None:
        """Commit ``state``'s worst case and return None when it fits, else say why not."""
        refusal = self.refusal(state)
        if refusal is None and self.active:
            self.committed[state.part] = self.worst_case(state)
            self.held.discard(state.part)
        return refusal

    def refusal(self, state: PartState) -> str | None:
        """Why ``state`` does not fit now (None: it does), committing nothing."""
        if not self.active:
            return None
        usd, tokens = self.worst_case(state)
        cost = self.spent_cost + sum(c for c, _ in self.committed.values())
        used = self.spent_tokens + sum(t for _, t in self.committed.values())
        if self.max_cost is not None and cost + usd > self.max_cost:
            return (
                f"its worst case ${usd:.4f} beside ${cost:.4f} spent or committed would pass "
                f"--max-cost ${self.max_cost:g}"
            )
        if self.max_tokens is not None and used + tokens > self.max_tokens:
            return (
                f"its worst case {tokens} tokens beside {used} spent or committed would pass "
                f"--max-total-tokens {self.max_tokens}"
            )
        return None

    def settle(self, state: PartState, usd: float, tokens: int) -> None:
        """``state`` is merged: what it cost replaces its worst case."""
        self.committed.pop(state.part, None)
        self.spent_cost += usd
        self.spent_tokens += tokens
