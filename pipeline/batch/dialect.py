"""What the batch executor needs of a provider's Batch API, whatever its dialect.

``openai.OpenAIDialect`` (Files + Batches: OpenAI, Azure, Groq, DeepInfra) uploads a file
and creates a batch of it, tagged in its metadata, so that a create whose answer was lost is
found again (``finds``). ``anthropic.AnthropicDialect`` (Message Batches: Anthropic, the AI/ML
API's Claude batches) sends the requests inline and cannot tag them: a create announced
without its answer cannot be told from one that never happened, and the run stops there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .lines import Outcome, Parsed

TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})


@dataclass(frozen=True)
class BatchView:
    """A batch as the executor sees it: ``status`` is one of ``TERMINAL`` or ``running``."""

    status: str
    remote: str = ""  # the provider's own word for the status (in_progress, ended, ...)
    output_ref: str | None = None  # where the answers are (a file id, a results URL)
    error_ref: str | None = None
    errors: list[Any] = field(default_factory=list)  # validation errors of a failed batch
    completed: int | None = None
    failed: int | None = None
    total: int | None = None
    token_limited: bool = False  # refused for the enqueued-token limit: create it again


class Dialect(Protocol):
    name: str  # openai | anthropic | aimlapi: journaled with each batch it creates
    uploads: bool  # the part file is uploaded first (an ``upload`` step in the journal)
    finds: bool  # a batch can be found by its tag (closes the create window)

    async def upload(self, path: Path) -> str: ...

    async def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> str: ...

    async def find(self, tag: dict[str, str]) -> str | None: ...

    def new_cycle(self, batch_ids: Iterable[str]) -> None:
        """A poll cycle asks about ``batch_ids`` (a dialect may answer them with one call)."""
        ...

    async def view(self, batch_id: str) -> BatchView: ...

    async def fetch(self, view: BatchView, dest: Path) -> list[Path]: ...

    def parse(self, chunks: Iterable[bytes]) -> Parsed: ...

    def outcomes(self, chunks: Iterable[bytes]) -> Iterator[tuple[int, Outcome]]:
        """(key, outcome) of each result line, one at a time (``lines.iter_results``)."""
        ...

    async def cancel(self, batch_id: str) -> None: ...

    async def aclose(self) -> None: ...
