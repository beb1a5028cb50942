"""Plain typed records that flow between modules. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

Status = Literal["ok", "error", "skipped", "invalid"]
Message = dict[str, Any]

# cost_source values: where a row's cost_usd came from (None: no price known). The one
# place these strings are defined; pricing, runner and samples use them.
COST_REPORTED: Final = "reported"  # the server said what it charged
COST_TABLE: Final = "table"  # usage x the price table
COST_DEDUP: Final = "dedup"  # copied from the identical row that was sent
COST_CACHE: Final = "cache"  # answered from the response cache
COST_SHARED: Final = "shared"  # a later sample of one request; the first carries the cost
COST_MIXED: Final = "mixed"  # re-asks of one sample priced from different sources
COST_BATCH: Final = "batch"  # usage x the price table x the Batch API's usual discount (0.5)
COST_BATCH_TABLE: Final = "batch_table"  # usage x the price table's own batch prices
COST_IMPORTED: Final = "imported"  # a result file made elsewhere (pipeline batch import)
COST_SOURCES: Final = (
    COST_REPORTED,
    COST_TABLE,
    COST_DEDUP,
    COST_CACHE,
    COST_SHARED,
    COST_MIXED,
    COST_BATCH,
    COST_BATCH_TABLE,
    COST_IMPORTED,
)


@dataclass(frozen=True, slots=True)
class Cost:
    """What one answered row cost: ``usd`` and where that figure came from.

    ``Cost(None, None)`` means no price is known.
    """

    usd: float | None = None
    source: str | None = None


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One input row ready to send, or a row that will not be sent.

    ``key`` is the row's stable 64-bit key (from ``--id-column`` or derived), ``index`` its
    position in the input. Exactly one of ``messages`` and ``skip_reason``/``invalid_reason``
    is set.
    """

    key: int
    index: int
    messages: list[Message] | None = None
    skip_reason: str | None = None
    invalid_reason: str | None = None
    model: str | None = None  # None: the run's only model
    # (sample index, result key) of each sample to produce; () means sample 0 under ``key``
    samples: tuple[tuple[int, int], ...] = ()

    @property
    def wanted(self) -> tuple[tuple[int, int], ...]:
        """(sample index, result key) of every sample this row is sent for."""
        return self.samples or ((0, self.key),)


def request_id_of(key: int) -> str:
    """The ``X-Client-Request-Id`` of the request answering the result with ``key``."""
    return f"bpp-{key:016x}"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one response; detail fields are None when the server omits them."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of a completion: its text (tool calls as JSON when content is null)."""

    text: str | None
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Completion:
    """A parsed successful chat completion: every choice, in index order.

    ``usage`` and ``reported_cost`` are the response's, covering all its choices (the API
    reports no per-choice usage). ``text`` and ``finish_reason`` are the first choice's.
    """

    choices: tuple[Choice, ...]
    usage: Usage
    model: str | None
    response_id: str | None
    headers: dict[str, str] = field(default_factory=dict)
    reported_cost: float | None = None  # USD the server says this request cost
    raw: bytes = b""  # the body as received (for the response cache)

    @property
    def text(self) -> str | None:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


@dataclass(frozen=True, slots=True)
class RowResult:
    """The outcome of one row: what goes into the output's result columns."""

    key: int
    status: Status
    completion: str | None = None
    finish_reason: str | None = None
    usage: Usage = Usage()
    response_model: str | None = None
    response_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    cost_usd: float | None = None
    cost_source: str | None = None  # reported | table | dedup | cache; None: no price known


@dataclass(slots=True)
class RunSummary:
    """What a run did; printed at the end and written by ``--summary-json``."""

    output: str
    rows_total: int = 0  # results: input rows x models x samples
    ok: int = 0
    error: int = 0
    invalid: int = 0
    skipped: int = 0
    pending: int = 0
    resumed: int = 0
    sent: int = 0
    removed: int = 0
    retries: int = 0
    deduplicated: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    wall_seconds: float = 0.0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)
    error_messages: dict[str, str] = field(default_factory=dict)  # per type, the most common
    aborted: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""
    exit_code: int = 0
    input_rows: int = 0
    exit_reason: str = ""  # the exit code's name (errors.EXIT_CODES): ok, fatal, interrupted...
    unpriced: int = 0  # results of requests whose model has no price: cost_usd is then unknown
    imported: int = 0  # results read from another tool's files (batch import): cost not known
    # --shard: the counts above are this shard's; job_pending counts the results the other
    # shards still owe (OUTPUT is written by the run that finds it 0)
    shard: str | None = None
    job_pending: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        sharded = {"shard": self.shard, "job_pending": self.job_pending} if self.shard else {}
        return {
            **sharded,
            "output": self.output,
            "rows_total": self.rows_total,
            "input_rows": self.input_rows,
            "ok": self.ok,
            "error": self.error,
            "invalid": self.invalid,
            "skipped": self.skipped,
            "pending": self.pending,
            "resumed": self.resumed,
            "sent": self.sent,
            "removed": self.removed,
            "retries": self.retries,
            "deduplicated": self.deduplicated,
            "cache_hits": self.cache_hits,
            # unknown (null) when a request's model has no price, never a silent 0
            "cost_usd": None if self.unpriced else round(self.cost_usd, 6),
            "cost_usd_priced": round(self.cost_usd, 6),
            "unpriced_results": self.unpriced,
            "imported_results": self.imported,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "finish_reasons": dict(self.finish_reasons),
            "error_types": dict(self.error_types),
            "error_messages": dict(self.error_messages),
            "aborted": self.aborted,
            "labels": dict(self.labels),
            "models": list(self.models),
            "fingerprint": self.fingerprint,
            "exit_code": self.exit_code,
            "exit_reason": self.exit_reason,
        }


# Several models with --wide: the column group of model M is named f"{M}{WIDE_SEPARATOR}{col}".
WIDE_SEPARATOR = "__"
# OUTPUT's schema metadata key holding the run's model names (JSON list, in run order).
MODELS_METADATA_KEY = b"pipeline.models"

# The result columns appended to every output row, in this order.
RESULT_COLUMNS: tuple[str, ...] = (
    "completion",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "response_model",
    "response_id",
    "status",
    "error_type",
    "error_message",
    "http_status",
    "attempts",
    "latency_ms",
    "cost_usd",
    "cost_source",
)
STATUS_CODES: dict[str, int] = {"ok": 0, "error": 1, "skipped": 2, "invalid": 3}
