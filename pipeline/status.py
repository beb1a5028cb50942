"""The state of a run as its checkpoint records it: ``run_status(output)``.

Owns the counting behind ``pipeline status``: rows per status among the current input,
pending rows, tokens, cost (unknown, never a silent 0, when a model has no price), the
fingerprint, whether a run holds the lock, and the exit code that state maps to.
Does not print or exit (the CLI formats the record) and does not write the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .batch.journal import batches_of
from .checkpoint import Checkpoint, checkpoint_dir
from .errors import (
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    NoCheckpoint,
    PipelineError,
    exit_reason,
)
from .index_join import WindowedPlaces
from .pricing import PriceTable
from .records import STATUS_CODES
from .result_index import ResultIndex
from .saved_arrays import NpyRange
from .shards import ShardTally, shard_holders


@dataclass(frozen=True)
class RunStatus:
    """What ``run_status`` found; ``as_dict()`` is the ``status --json`` object."""

    output: str
    rows_total: int
    counts: dict[str, int]
    pending: int
    prompt_tokens: int
    completion_tokens: int
    fingerprint: Any
    model: Any
    running_by: Any
    output_written: bool
    cost_usd: float | None
    spent_usd: float
    unpriced_models: list[str]
    exit_code: int
    shards: list[dict[str, Any]] = field(default_factory=list)  # see shards.progress
    batches: list[dict[str, Any]] = field(default_factory=list)  # see batch.journal

    @property
    def running(self) -> bool:
        return self.running_by is not None

    @property
    def exit_reason(self) -> str:
        return exit_reason(self.exit_code)

    def as_dict(self) -> dict[str, Any]:
        """The keys and order of ``pipeline status --json``."""
        raw = asdict(self)
        return {
            "output": self.output,
            "rows_total": self.rows_total,
            **self.counts,
            "pending": self.pending,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "running": self.running,
            "running_by": raw["running_by"],
            "output_written": self.output_written,
            "cost_usd": self.cost_usd,
            "unpriced_models": self.unpriced_models,
            "exit_code": self.exit_code,
            "exit_reason": self.exit_reason,
            **({"shards": self.shards} if self.shards else {}),
            **({"batches": self.batches} if self.batches else {}),
        }


def run_status(output: Path | str) -> RunStatus:
    """Count OUTPUT's run from its checkpoint; works during a run and after it.

    Raises ``NoCheckpoint`` when there is none and ``OutputError`` when it is unreadable.
    """
    output = Path(output)
    checkpoint = Checkpoint(output)
    if not checkpoint.exists():
        raise NoCheckpoint(f"no checkpoint for {output} (looked for {checkpoint_dir(output)}).")
    manifest = checkpoint.read_manifest()
    index = checkpoint.load_index()
    keys = checkpoint.recorded_keys()
    # count the rows of the current input only (results of rows that left it are kept
    # in the checkpoint but are not in OUTPUT), a window of keys at a time
    counts, used, shards = index.counts(), index.spent, []
    if keys is not None:
        counts, used, tally = _count_among(index, keys, ShardTally.of(checkpoint.dir, len(keys)))
        shards = tally.progress(checkpoint.dir) if tally is not None else []
    total = len(keys) if keys is not None else int(manifest.get("rows_total", index.size))
    pending = max(total - sum(counts.values()), 0)
    holder = Checkpoint.lock_holder(output) or "; ".join(shard_holders(checkpoint.dir)) or None
    model = manifest.get("fingerprint_parts", {}).get("model")
    unpriced = _unpriced_models(model, manifest)
    prompt_tokens, completion_tokens, spent = used
    index.close()
    if pending:
        code = EXIT_LOCKED if holder else EXIT_INTERRUPTED
    else:
        code = EXIT_FAILED_ROWS if counts["error"] or counts["invalid"] else EXIT_OK
    return RunStatus(
        output=str(output),
        rows_total=total,
        counts=dict(counts),
        pending=pending,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        fingerprint=manifest.get("fingerprint"),
        model=model,
        running_by=holder,
        output_written=checkpoint.output_is_ours(),
        # unknown when a model has no price and no cost was reported: never a silent 0
        cost_usd=None if unpriced and not spent else round(spent, 6),
        spent_usd=spent,
        unpriced_models=unpriced,
        exit_code=code,
        shards=shards,
        batches=batches_of(checkpoint.dir),
    )


STATUS_KEYS = 1 << 20  # unit keys looked up at once


def _count_among(
    index: ResultIndex, keys: NpyRange, tally: ShardTally | None
) -> tuple[dict[str, int], tuple[int, int, float], ShardTally | None]:
    """(status counts, tokens and cost) of the results of ``keys``, a window at a time
    (the index read once), each window's results added to ``tally`` too."""
    counts = dict.fromkeys(STATUS_CODES, 0)
    used = [0, 0, 0.0]
    found_by_window = WindowedPlaces(index, [keys], STATUS_KEYS)
    for start in found_by_window.starts():
        places = found_by_window.at(start)
        found = ~places.missing(0)
        among = places.at[0][found]
        for name, count in index.counts(among).items():
            counts[name] += count
        for i, value in enumerate(index.spent_among(among)):
            used[i] += value
        if tally is not None:
            tally.add(start, found)
    found_by_window.close()
    return counts, (int(used[0]), int(used[1]), float(used[2])), tally


def _unpriced_models(model: Any, manifest: dict[str, Any]) -> list[str]:
    """The run's models that the price table (and the run's --prices file) cannot price."""
    models = model if isinstance(model, list) else [model] if model else []
    try:
        prices = PriceTable.load(manifest.get("config", {}).get("prices"))
    except (PipelineError, OSError):
        prices = PriceTable.load()
    return [m for m in models if prices.resolve(str(m)) is None]
