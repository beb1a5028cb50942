"""``Budget``: ``--max-cost`` and ``--max-total-tokens`` held across a run's requests in flight."""

from __future__ import annotations


class Budget:
    """Spend so far plus what requests in flight could still spend, against the caps.

    ``reserve`` admits a request only if its worst case (estimated prompt + ``max_tokens``, or
    the mean completion when ``max_tokens`` is unset) cannot cross ``max_cost`` or
    ``max_tokens``; ``settle`` swaps the reservation for the actual figures.
    """

    def __init__(
        self,
        *,
        max_cost: float | None,
        max_tokens: int | None,
        spent_cost: float = 0.0,
        spent_tokens: int = 0,
    ) -> None:
        self.max_cost = max_cost
        self.max_tokens = max_tokens
        self.spent_cost = spent_cost
        self.spent_tokens = float(spent_tokens)
        self.reserved_cost = 0.0
        self.reserved_tokens = 0.0

    @property
    def active(self) -> bool:
        return self.max_cost is not None or self.max_tokens is not None

    def reserve(self, cost: float, tokens: float) -> bool:
        if self.max_cost is not None and (
            self.spent_cost + self.reserved_cost + cost > self.max_cost
        ):
            return False
        if self.max_tokens is not None and (
            self.spent_tokens + self.reserved_tokens + tokens > self.max_tokens
        ):
            return False
        self.reserved_cost += cost
        self.reserved_tokens += tokens
        return True

    def settle(self, reserved: tuple[float, float], cost: float, tokens: float) -> None:
        self.reserved_cost -= reserved[0]
        self.reserved_tokens -= reserved[1]
        self.spent_cost += cost
        self.spent_tokens += tokens

    def describe(self) -> str:
        parts = []
        if self.max_cost is not None:
            parts.append(f"${self.spent_cost:.4f} of --max-cost ${self.max_cost:g} spent")
        if self.max_tokens is not None:
            parts.append(f"{int(self.spent_tokens)} of --max-total-tokens {self.max_tokens} used")
        return "; ".join(parts)
