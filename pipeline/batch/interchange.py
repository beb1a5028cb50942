"""OpenAI Batch JSONL in and out: work moves between this tool and others (``vllm run-batch``,
LiteLLM, a provider's console).

``export_requests`` writes the Batch input file of the rows a run would still send (one line
per result; ``custom_id`` is the result key; each body exactly what an online run sends).
``import_results`` reads output and error files (OpenAI's, or ``vllm run-batch``'s single
file) and runs the engine with an executor that answers from them: every line that matches a
row still needing a result is recorded in OUTPUT's checkpoint and OUTPUT is written; rows
without a usable line stay pending, so a following ``pipeline run`` sends only those.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ..asks import Ask, RequestShape, Results, units
from ..atomic import atomic_write
from ..config import RunConfig
from ..planning import read_plan
from ..records import COST_IMPORTED, Cost, RunSummary
from ..stopping import Stop
from .lines import Parsed, parse_results, row_result
from .parts import ask_lines

IMPORTED = Cost(None, COST_IMPORTED)  # what another tool's run cost is not known here


def export_requests(
    data: Any, destination: str | Path, config: RunConfig, output: str | Path | None = None
) -> int:
    """Write the Batch input file for the rows that still need an answer (all of them, or
    those OUTPUT's checkpoint lacks); returns the number of lines. Duplicate prompts
    (``dedup``) are exported once."""
    plan = read_plan(data, config, Path(output) if output is not None else None)
    shape = RequestShape(config)
    destination = Path(destination)
    count = 0
    with atomic_write(destination) as tmp, open(tmp, "wb") as fh:
        offset = 0
        for batch in plan.source.iter_batches(columns=plan.builder.columns):
            for row, model in units(plan, config.n, batch, offset):
                if row.messages is None:
                    continue  # skipped or invalid rows have nothing to send
                for _, line in ask_lines(shape.ask(row, model), config.n, config.base_seed):
                    fh.write(line)
                    count += 1
            offset += batch.num_rows
    return count


class ImportExecutor:
    """Answers the engine's asks from parsed result lines; sends nothing."""

    def __init__(self, parsed: Parsed, shape: RequestShape) -> None:
        self.parsed = parsed
        self.shape = shape
        self.sent = 0
        self.cache_hits = 0
        self.matched = 0

    async def execute(self, asks: AsyncIterator[Ask], results: Results, stop: Stop) -> None:
        async for ask in asks:
            if stop.is_set():
                return
            for _, key in ask.samples:
                outcome = self.parsed.outcomes.get(key)
                if outcome is None or outcome.retryable:
                    continue  # no usable line: stays pending for the next run to send
                self.matched += 1
                results.record(row_result(outcome, attempts=1, cost=IMPORTED, shape=self.shape))


def read_result_files(files: Sequence[str | Path]) -> Parsed:
    """Every line of ``files`` (output and error files, any order)."""
    return parse_results(Path(f).read_bytes() for f in files)


def import_executor(files: Sequence[str | Path], config: RunConfig) -> ImportExecutor:
    return ImportExecutor(read_result_files(files), RequestShape(config))


def import_results(
    data: Any, output: str | Path, config: RunConfig, files: Sequence[str | Path]
) -> RunSummary:
    """Record the lines of ``files`` that match rows of ``data`` into OUTPUT (see the module
    docstring); the run's summary."""
    from ..runner import Seams, run_batch  # the runner wires the engine; imported on use

    executor = import_executor(files, config)
    return run_batch(data, output, config, Seams(executor=executor))
