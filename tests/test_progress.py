"""The progress bar and the summary text: what a person watching a run reads.

The bar fits the terminal (80 columns here, through ``COLUMNS``) and always shows the counts
and the cost; it counts results (rows x models) and says so; it shows retries and requests
in flight when there is room; its last counts are the summary's. The summary gives, for
each error type, the message seen most often.
"""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pandas as pd
import pytest
from tqdm.utils import disp_len

from pipeline.config import RunConfig
from pipeline.errors import RunAborted
from pipeline.progress import MIN_BAR, Reporter, bar_text, format_summary
from pipeline.records import RunSummary
from pipeline.runner import Seams, run_async
from pipeline.simulator import SimulatorConfig, SimulatorThread


class Terminal(io.StringIO):
    """What a terminal receives: the bar's frames, separated by carriage returns."""

    def isatty(self) -> bool:
        return True

    def frames(self) -> list[str]:
        return [f for f in re.split(r"[\r\n]", self.getvalue()) if re.match(r"\w+ +\d+/\d+ ", f)]


COUNTS = re.compile(r"^(\w+) +(\d+)/(\d+) \|.*\| ok (\d+) err (\d+)(?: invalid (\d+))?")


def run_on_terminal(tmp_path: Path, sim: SimulatorThread) -> tuple[Terminal, RunSummary]:
    terminal = Terminal()
    config = RunConfig(
        base_url=sim.base_url,
        models=("m1", "gpt-4o-mini"),
        max_retries=1,
        concurrency=4,
        log_interval=3600,
    )
    frame = pd.DataFrame({"prompt": [f"row {i}" for i in range(60)]})

    async def short_sleep(seconds: float) -> None:  # retry waits, cut short
        await asyncio.sleep(min(seconds, 0.01))

    seams = Seams(reporter=Reporter(stream=terminal), sleep=short_sleep, handle_signals=False)
    try:
        summary = asyncio.run(run_async(frame, tmp_path / "out.parquet", config, seams))
    except RunAborted as exc:
        summary = exc.summary  # type: ignore[attr-defined]
    return terminal, summary


def test_the_bar_fits_80_columns_counts_results_and_ends_with_the_summary_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with SimulatorThread(SimulatorConfig(rate_500=0.2, seed=7, latency_ms=20)) as sim:
        terminal, summary = run_on_terminal(tmp_path, sim)

    assert summary.error > 0 and summary.retries > 0, "the test needs errors and retries"
    frames = terminal.frames()
    assert len(frames) >= 2
    for frame in frames:
        assert disp_len(frame) <= 80, frame
        # 60 rows x 2 models: results, counted as such; the counts and the cost always show
        match = COUNTS.match(frame)
        assert match is not None, frame
        assert match.group(1) == "results" and match.group(3) == "120", frame
        assert re.search(r"(\$\d+\.\d{4}|cost unknown)", frame), frame
        assert re.search(rf"\|[^|]{{{MIN_BAR},}}\|", frame), f"the bar is squeezed: {frame}"
    # m1 has no price: the cost is unknown, never $0.0000, once one of its results is in
    assert "cost unknown" in frames[-1]
    assert any(re.search(r"\d+ retries", f) for f in frames)
    last = COUNTS.match(frames[-1])
    assert last is not None
    assert int(last.group(2)) == summary.ok + summary.error + summary.invalid + summary.skipped
    assert int(last.group(4)) == summary.ok
    assert int(last.group(5)) == summary.error
    # the summary names each error type's most common message
    text = terminal.getvalue()
    assert f"errors: ServerError {summary.error}" in text
    assert "ServerError, most often: HTTP 500" in text


def test_a_wide_terminal_shows_retries_rate_control_in_flight_time_left_and_rate() -> None:
    left, right = bar_text(
        200,
        unit="rows",
        done=500,
        todo=2000,
        ok=480,
        errors=20,
        retries=31,
        in_flight=64,
        cost=1.25,
        rate=50.0,
        throttle="429s 12 @3.1/s",
    )
    assert left == "rows  500/2000 |"
    assert right == (
        "| ok 480 err 20  $1.2500  31 retries  429s 12 @3.1/s  64 in flight  00:30 left  50.0/s"
    )


@pytest.mark.parametrize("width", [80, 100])
def test_a_narrow_terminal_drops_the_least_needed_fields_first_and_keeps_the_bar(
    width: int,
) -> None:
    left, right = bar_text(
        width,
        unit="results",
        done=123_456,
        todo=1_000_000,
        ok=120_000,
        errors=3_456,
        invalid=12,
        retries=9_999,
        in_flight=256,
        cost=1234.5678,
        rate=812.3,
    )
    assert len(left) + len(right) + MIN_BAR <= width
    assert "ok 120000 err 3456 invalid 12" in right and "$1234.5678" in right
    shown = [f in right for f in ("retries", "in flight", "left", "/s")]
    assert shown == sorted(shown, reverse=True), "a field shows only if those before it do"


def test_a_very_narrow_terminal_still_shows_the_counts_and_the_cost() -> None:
    left, right = bar_text(
        60, unit="results", done=123_456, todo=1_000_000, ok=120_000, errors=3_456, cost=1.5
    )
    assert left == "123456/1000000 |"
    assert right == "| ok 120000 err 3456  $1.5000"


def test_the_summary_gives_each_error_types_most_common_message() -> None:
    summary = RunSummary(
        output="out.parquet",
        rows_total=10,
        error=4,
        error_types={"ServerError": 3, "Timeout": 1},
        error_messages={"ServerError": "HTTP 500: boom", "Timeout": "no answer in 60 s"},
    )

    text = format_summary(summary)

    assert "errors: ServerError 3, Timeout 1" in text
    assert "  ServerError, most often: HTTP 500: boom" in text
    assert "  Timeout, most often: no answer in 60 s" in text
