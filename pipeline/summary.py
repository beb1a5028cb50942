"""A run's summary: the counts of its results, what it sent and spent, how it ended and the
exit code that says so (``errors.EXIT_CODES``). Built from the checkpoint's counts, the
recorder, the executor and the reporter's tallies; reads OUTPUT only for the answer tables
(labels, per-model scores) of runs that have them.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import remote_output
from .engine import Executor
from .errors import EXIT_BUDGET, EXIT_FAILED_ROWS, EXIT_OK, EXIT_STORAGE, RunAborted, exit_reason
from .planning import Plan
from .recording import Recorder
from .records import RunSummary
from .stopping import Stop, StopKind


def summarize(
    plan: Plan,
    status_counts: tuple[dict[str, int], int, int],
    executor: Executor,
    recorder: Recorder,
    stop: Stop,
    *,
    output: Path,
    fingerprint: str,
    started: float,
) -> RunSummary:
    """The run's summary with its exit code; ``status_counts`` is (count per status, pending,
    pending in other shards): a shard's summary counts its own rows."""
    counts, pending, job_pending = status_counts
    rep = recorder.reporter
    summary = RunSummary(
        output=remote_output.shown_output(output),
        rows_total=plan.results_in_scope(),
        input_rows=plan.rows_in_scope(),
        ok=counts["ok"],
        error=counts["error"],
        invalid=counts["invalid"],
        skipped=counts["skipped"],
        pending=pending,
        resumed=plan.resumed,
        sent=executor.sent,
        removed=plan.removed,
        retries=rep.retries,
        deduplicated=recorder.deduplicated,
        cache_hits=executor.cache_hits,
        cost_usd=rep.cost_usd,
        unpriced=rep.unpriced,
        imported=rep.imported,
        prompt_tokens=rep.prompt_tokens,
        completion_tokens=rep.completion_tokens,
        total_tokens=rep.prompt_tokens + rep.completion_tokens,
        wall_seconds=time.monotonic() - started,
        finish_reasons=dict(rep.finish_reasons),
        error_types=dict(rep.error_types),
        error_messages=rep.common_error_messages(),
        aborted=stop.reason,
        fingerprint=fingerprint,
        shard=str(plan.shard) if plan.shard else None,
        job_pending=job_pending,
    )
    summary.exit_code = exit_code(summary, stop, recorder.storage_error)
    summary.exit_reason = exit_reason(summary.exit_code)
    return summary


def exit_code(summary: RunSummary, stop: Stop, storage_error: str | None) -> int:
    """A budget stop says so even when storage failed after; then storage, then the stop."""
    if stop.kind is StopKind.BUDGET:
        return EXIT_BUDGET
    if storage_error is not None:
        return EXIT_STORAGE
    if stop.kind is not None:
        return stop.kind.exit_code
    if summary.error or summary.invalid or summary.pending:
        return EXIT_FAILED_ROWS
    return EXIT_OK


def add_answer_summary(summary: RunSummary, output: Path) -> None:
    """Label distribution and the per-model table (score, tokens, cost, latency)."""
    from .report import comparison_table, load_output

    frame = load_output(output)
    if "label" in frame.columns:
        # a label is set only on an ok sample; --samples list holds a list of them per row
        counts = frame["label"].explode().dropna().value_counts()
        summary.labels = {str(k): int(v) for k, v in counts.items()}
    summary.models = comparison_table(frame)


def raise_aborted(summary: RunSummary) -> None:
    error = RunAborted(
        f"run stopped: {summary.aborted}. Completed rows are kept; rerun the same command "
        "to continue.",
        reason=summary.aborted or "",
    )
    error.summary = summary  # type: ignore[attr-defined]
    raise error
