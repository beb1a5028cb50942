"""The executor seam: planning, checkpoint parts, dedup, resume, stopping and OUTPUT are the
engine's, whatever obtains the answers.

``DictExecutor`` (below, a few dozen lines) answers from a dict and sends nothing. A run
through it writes the same OUTPUT as a run over real HTTP against the simulator (every
column but the measured latency), resumes after a stop by asking only what is missing, and
asks each distinct prompt once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.asks import Ask, Results
from pipeline.checkpoint import Checkpoint
from pipeline.config import RunConfig
from pipeline.errors import EXIT_INTERRUPTED, EXIT_OK, RunAborted
from pipeline.progress import Reporter
from pipeline.records import RowResult, RunSummary, Usage
from pipeline.runner import Seams, run_async
from pipeline.simulator import SimulatorThread
from pipeline.stopping import Stop, StopKind

Answer = dict[str, Any]  # a result row of OUTPUT, by column


class DictExecutor:
    """Answers each ask from ``answers`` (prompt -> OUTPUT's result columns); after
    ``stop_after`` asks it stops the run as a deadline would."""

    def __init__(self, answers: dict[str, Answer], stop_after: int | None = None) -> None:
        self.answers = answers
        self.stop_after = stop_after
        self.asked: list[str] = []
        self.cache_hits = 0

    @property
    def sent(self) -> int:
        return len(self.asked)

    async def execute(self, asks: AsyncIterator[Ask], results: Results, stop: Stop) -> None:
        async for ask in asks:
            if stop.is_set():
                return
            prompt = ask.messages[-1]["content"]
            self.asked.append(prompt)
            a = self.answers[prompt]
            for _, key in ask.samples:
                results.record(
                    RowResult(
                        key=key,
                        status="ok",
                        completion=a["completion"],
                        finish_reason=a["finish_reason"],
                        usage=Usage(
                            **{k: _int(a[k]) for k in ("prompt_tokens", "completion_tokens")},
                            **{k: _int(a[k]) for k in ("total_tokens", "cached_tokens")},
                            reasoning_tokens=_int(a["reasoning_tokens"]),
                        ),
                        response_model=a["response_model"],
                        response_id=a["response_id"],
                        http_status=200,
                        attempts=1,
                        latency_ms=1.0,
                        cost_usd=a["cost_usd"],
                        cost_source=a["cost_source"],
                    )
                )
            await asyncio.sleep(0)  # let the flusher and the stop in, as real I/O would
            if self.stop_after is not None and len(self.asked) >= self.stop_after:
                stop.request(StopKind.DEADLINE, "deadline: the test's executor stopped")


def _int(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


def _run(data: Path, output: Path, executor: Any = None, **options: Any) -> RunSummary:
    seams = Seams(
        reporter=Reporter(progress=False, quiet=True), handle_signals=False, executor=executor
    )
    config = RunConfig(progress=False, checkpoint_rows=7, **options)
    try:
        return asyncio.run(run_async(data, output, config, seams))
    except RunAborted as exc:
        summary: RunSummary = exc.summary  # type: ignore[attr-defined]
        return summary


@pytest.fixture
def job(tmp_path: Path) -> Path:
    # 60 rows, 40 distinct prompts: the last 20 repeat the first 20
    prompts = [f"question {i % 40}" for i in range(60)]
    path = tmp_path / "in.csv"
    pd.DataFrame({"id": range(60), "prompt": prompts}).to_csv(path, index=False)
    return path


def _answers(output: Path) -> dict[str, Answer]:
    frame = pd.read_parquet(output)
    first = frame[frame["cost_source"] != "dedup"]
    return {row["prompt"]: row for row in first.to_dict("records")}


def _without_latency(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output).drop(columns=["latency_ms"])


def test_a_run_through_a_dict_executor_writes_the_output_of_an_http_run(
    job: Path, tmp_path: Path, simulator: SimulatorThread
) -> None:
    over_http = tmp_path / "http.parquet"
    summary = _run(job, over_http, base_url=simulator.base_url)
    assert summary.exit_code == EXIT_OK and summary.ok == 60 and summary.deduplicated == 20
    executor = DictExecutor(_answers(over_http))
    from_dict = tmp_path / "dict.parquet"
    summary = _run(job, from_dict, executor, base_url=simulator.base_url)

    assert summary.exit_code == EXIT_OK and summary.ok == 60 and summary.deduplicated == 20
    assert sorted(executor.asked) == sorted(set(executor.asked))  # each prompt asked once
    assert len(executor.asked) == 40
    pd.testing.assert_frame_equal(_without_latency(from_dict), _without_latency(over_http))
    assert pq.read_schema(from_dict) == pq.read_schema(over_http)
    # results reached the checkpoint in parts of at most checkpoint_rows, as over HTTP
    assert len(Checkpoint(from_dict).part_paths()) > 1


def test_a_run_through_a_dict_executor_resumes_after_a_stop_asking_only_what_is_missing(
    job: Path, tmp_path: Path, simulator: SimulatorThread
) -> None:
    over_http = tmp_path / "http.parquet"
    _run(job, over_http, base_url=simulator.base_url)
    answers = _answers(over_http)
    output = tmp_path / "dict.parquet"

    first = DictExecutor(answers, stop_after=15)
    stopped = _run(job, output, first, base_url=simulator.base_url)
    assert stopped.exit_code == EXIT_INTERRUPTED and stopped.aborted
    assert 15 <= stopped.ok < 60 and stopped.pending == 60 - stopped.ok
    partial = pd.read_parquet(output)  # OUTPUT of a stopped run: every row, some pending
    assert len(partial) == 60 and (partial["status"] == "pending").sum() == stopped.pending

    second = DictExecutor(answers)
    finished = _run(job, output, second, base_url=simulator.base_url)
    assert finished.exit_code == EXIT_OK and finished.ok == 60
    assert finished.resumed == stopped.ok
    assert not set(second.asked) & set(first.asked)  # nothing asked twice
    assert set(first.asked) | set(second.asked) == set(answers)
    pd.testing.assert_frame_equal(_without_latency(output), _without_latency(over_http))
