"""Progress bar, log lines and the summary. Observes the run; never gates it.

``Reporter`` receives events from the runner (start, each result, retries, notes, the end).
On a TTY it draws a tqdm bar on stderr; otherwise (or with ``--no-progress``) it writes a
progress line every ``log_interval`` seconds. With ``log_format="json"`` every line is one JSON
object (``event`` names it) for log collectors. ``quiet`` keeps only errors and the summary.
It never sees the API key: the config it logs is ``RunConfig.public_dict()``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from .records import COST_IMPORTED, RowResult, RunSummary

if TYPE_CHECKING:
    from .limits import RateView

# a retry wait at least this long gets its own log line in every format
LONG_WAIT = 5.0


class Reporter:
    """Turns run events into a bar or log lines on ``stream`` (stderr by default)."""

    def __init__(
        self,
        *,
        progress: bool = True,
        log_format: str = "text",
        quiet: bool = False,
        log_interval: float = 10.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.json = log_format == "json"
        self.quiet = quiet
        self.log_interval = log_interval
        self.clock = clock
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.use_bar = progress and not quiet and not self.json and isatty
        self.bar: tqdm[Any] | None = None
        self.total = 0
        self.done = 0
        self.ok = 0
        self.errors = 0
        self.invalid = 0
        self.skipped = 0
        self.retries = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self.unpriced = 0  # results of requests with no price: the cost is then unknown
        self.imported = 0  # results another tool paid for (batch import): not priced here
        self.todo = 0
        self.finish_reasons: Counter[str] = Counter()
        self.error_types: Counter[str] = Counter()
        self.error_messages: dict[str, Counter[str]] = {}  # per error type
        self.in_flight: Callable[[], int] | None = None  # the runner's count of requests out
        self.unit = "rows"  # what the bar counts: rows, or results (several per row)
        self.started = clock()
        self._last_log = self.started
        # what the rate controller believes (set by the runner); shown in progress and summary
        self.rate_view: Callable[[], RateView] | None = None

    # -- output helpers -------------------------------------------------------------------

    def _emit(self, event: str, text: str, **fields: Any) -> None:
        if self.json:
            line = json.dumps(
                {"ts": round(time.time(), 3), "event": event, **fields},
                default=str,
                ensure_ascii=False,
            )
        elif self.use_bar:
            line = f"pipeline: {text}"
        else:  # a log file (cron, CI): every line says when
            line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} pipeline: {text}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    # -- events ---------------------------------------------------------------------------

    def run_started(
        self,
        *,
        output: str,
        fingerprint: str,
        config: dict[str, Any],
        total: int,
        todo: int,
        resumed: int,
        input_rows: int | None = None,
        per_row: str = "",
    ) -> None:
        """``total`` counts results: ``input_rows`` x what ``per_row`` names (e.g. "2
        models x 3 samples"; empty when there is one result per input row)."""
        self.total = total
        self.todo = todo
        self.started = self._last_log = self.clock()
        if not self.quiet:
            rows = input_rows if input_rows is not None else total
            counted = (
                f"{rows} input rows x {per_row} = {total} results" if per_row else (f"{total} rows")
            )
            self._emit(
                "run_start",
                f"{counted}; {resumed} already done, {todo} to send "
                f"(fingerprint {fingerprint}) -> {output}",
                output=output,
                fingerprint=fingerprint,
                config=config,
                rows_total=total,
                rows_todo=todo,
                rows_resumed=resumed,
                input_rows=rows,
            )
        self.unit = "results" if per_row else "rows"
        if self.use_bar and todo:
            width, bar_format = self._bar_format(todo)
            # redrawn by tick() only (mininterval): each redraw fits the text to the width
            self.bar = tqdm(
                total=todo,
                file=self.stream,
                mininterval=float("inf"),
                ncols=width,
                bar_format=bar_format,
            )

    def row_done(self, result: RowResult) -> None:
        self.done += 1
        if result.status == "ok":
            self.ok += 1
            if result.finish_reason:
                self.finish_reasons[result.finish_reason] += 1
        elif result.status == "error":
            self.errors += 1
            kind = result.error_type or "error"
            self.error_types[kind] += 1
            messages = self.error_messages.setdefault(kind, Counter())
            # a bounded sample: messages that name a row or a request id are each new
            if result.error_message and (len(messages) < 100 or result.error_message in messages):
                messages[result.error_message] += 1
        elif result.status == "invalid":
            self.invalid += 1
        else:
            self.skipped += 1
        if result.attempts:  # copies (dedup, cache) made no request and spent nothing
            self.prompt_tokens += result.usage.prompt_tokens or 0
            self.completion_tokens += result.usage.completion_tokens or 0
        self.cost_usd += result.cost_usd or 0.0
        if result.cost_source == COST_IMPORTED:
            self.imported += 1
        elif result.cost_usd is None and result.attempts and result.usage.total_tokens:
            self.unpriced += 1
        if self.bar is not None:
            self.bar.update(1)

    def retry(
        self,
        *,
        row_index: int,
        error: str,
        status: int | None,
        attempt: int,
        wait: float,
        asked: float | None = None,
    ) -> None:
        self.retries += 1
        if wait >= LONG_WAIT and not self.json and not self.quiet:
            capped = (
                f" (the server asked {asked:g} s)" if asked is not None and asked > wait else ""
            )
            self._emit(
                "retry",
                f"row {row_index}: {f'HTTP {status}' if status else error}, retry {attempt} "
                f"in {wait:.0f} s{capped}",
            )
        if self.json and not self.quiet:
            self._emit(
                "retry",
                "",
                row=row_index,
                reason=error,
                http_status=status,
                attempt=attempt,
                wait_s=round(wait, 3),
                **({"asked_s": asked} if asked is not None else {}),
            )

    def rate_changed(self, why: str, view: RateView) -> None:
        """The rate controller changed its mind (a limit found, noise recognised, ...)."""
        if not self.quiet:
            self._emit(
                "rate", f"rate control: {why}; {view.describe()}", reason=why, **view.as_dict()
            )

    def tick(self) -> None:
        """Called about twice a second: refresh the bar, or log a line every log_interval."""
        now = self.clock()
        if self.bar is not None:
            self._draw_bar()
            return
        if now - self._last_log >= self.log_interval and not self.quiet:
            self._last_log = now
            elapsed = max(now - self.started, 1e-9)
            control = self.rate_view() if self.rate_view is not None else None
            believed = {"rate_control": control.as_dict()} if control is not None else {}
            speed = self.done / elapsed
            pending = max(self.todo - self.done, 0)
            eta = round(pending / speed) if speed > 0 else None
            cost = None if self.unpriced else round(self.cost_usd, 6)
            self._emit(
                "progress",
                f"{self.done} of {self.todo} to send done ({self.ok} ok, {self.errors} error, "
                f"{self.skipped} skipped), {pending} pending, {speed:.1f} rows/s, ETA "
                f"{_duration(eta)}, {self.retries} retries, tokens in {self.prompt_tokens} out "
                f"{self.completion_tokens}, cost {_usd(cost)}"
                + (
                    f"; {control.describe()}"
                    if control is not None and control.rate_limited
                    else ""
                ),
                total=self.total,
                todo=self.todo,
                done=self.done,
                pending=pending,
                ok=self.ok,
                error=self.errors,
                skipped=self.skipped,
                rows_per_s=round(speed, 2),
                eta_s=eta,
                retries=self.retries,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cost_usd=cost,
                unpriced_results=self.unpriced,
                **believed,
            )

    def note(self, text: str, **fields: Any) -> None:
        if not self.quiet:
            self._emit("note", text, message=text, **fields)

    def error(self, text: str, **fields: Any) -> None:
        self._emit("error", text, message=text, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self._draw_bar()  # the last results, not those of the last tick
            self.bar.close()
            self.bar = None

    def common_error_messages(self) -> dict[str, str]:
        """Per error type, the message its errors gave most often this run."""
        return {
            kind: messages.most_common(1)[0][0]
            for kind, messages in self.error_messages.items()
            if messages
        }

    def summary(self, summary: RunSummary) -> None:
        self.close()
        rate = self.rate_view() if self.rate_view is not None else None
        if self.json:
            believed = {"rate_control": rate.as_dict()} if rate is not None else {}
            self._emit("summary", "", **summary.as_dict(), **believed)
            return
        text = format_summary(summary)
        if rate is not None and rate.rate_limited:
            text += f"\nrate control: {rate.describe()}"
        print(text, file=self.stream, flush=True)

    # -- the bar ----------------------------------------------------------------------------

    def _draw_bar(self) -> None:
        assert self.bar is not None
        self.bar.n = self.done
        self.bar.ncols, self.bar.bar_format = self._bar_format(self.todo)
        self.bar.refresh()

    def _bar_format(self, todo: int) -> tuple[int, str]:
        """The terminal's width, and a tqdm ``bar_format`` of the counts that fits it."""
        width = terminal_columns(self.stream)
        elapsed = self.clock() - self.started
        left, right = bar_text(
            width,
            unit=self.unit,
            done=self.done,
            todo=todo,
            ok=self.ok,
            errors=self.errors,
            invalid=self.invalid,
            skipped=self.skipped,
            retries=self.retries,
            in_flight=self.in_flight() if self.in_flight is not None else None,
            cost=None if self.unpriced else self.cost_usd,
            rate=self.done / elapsed if elapsed > 0 and self.done else None,
            throttle=_throttle(self.rate_view() if self.rate_view is not None else None),
        )
        return width, _literal(left) + "{bar}" + _literal(right)


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


MIN_BAR = 10  # columns the bar itself keeps, whatever the width


def terminal_columns(stream: TextIO) -> int:
    """The width to draw in: ``COLUMNS`` when set, else the terminal's, else 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 80


def bar_text(
    width: int,
    *,
    unit: str,
    done: int,
    todo: int,
    ok: int,
    errors: int,
    invalid: int = 0,
    skipped: int = 0,
    retries: int = 0,
    in_flight: int | None = None,
    cost: float | None = None,
    rate: float | None = None,
    throttle: str | None = None,
) -> tuple[str, str]:
    """The text left and right of the progress bar, fitted to ``width`` columns.

    The counts and the cost always show; retries, what rate control does (``throttle``,
    once the server has refused requests), requests in flight, the time left and the rate
    follow while the line keeps ``MIN_BAR`` columns for the bar (they go from the last); on
    a narrow terminal the unit goes first. ``cost`` None reads "cost unknown".
    """
    left = f"{unit} {done:>{len(str(todo))}}/{todo} |"
    counts = f"| ok {ok} err {errors}"
    counts += f" invalid {invalid}" if invalid else ""
    counts += f" skipped {skipped}" if skipped else ""
    fields = [counts, "cost unknown" if cost is None else f"${cost:.4f}"]
    if len(left) + len("  ".join(fields)) + MIN_BAR > width:  # narrow: the numbers matter
        left = f"{done}/{todo} |"
    optional = [f"{retries} retries"] + ([throttle] if throttle else [])
    if in_flight is not None and done < todo:
        optional.append(f"{in_flight} in flight")
    if rate and done < todo:
        optional.append(f"{tqdm.format_interval(max(todo - done, 0) / rate)} left")
        optional.append(f"{rate:.1f}/s")
    for text in optional:
        if len(left) + len("  ".join([*fields, text])) + MIN_BAR <= width:
            fields.append(text)
        else:
            break
    return left, "  ".join(fields)


def _throttle(view: RateView | None) -> str | None:
    """Rate control in a few words, once the server has answered 429: "429s 12 @3.1/s"."""
    if view is None or not view.rate_limited:
        return None
    pace = "free" if view.rate is None else f"{view.rate:.1f}/s"
    return f"429s {view.rate_limited} @{pace}"


def _literal(text: str) -> str:
    """``text`` inside a tqdm bar_format (a str.format template)."""
    return text.replace("{", "{{").replace("}", "}}")


def format_summary(s: RunSummary) -> str:
    """The human summary printed at the end of a run."""
    lines = [
        (f"shard {s.shard}: " if s.shard else "")
        + (
            f"results: {s.rows_total} total ({s.input_rows} input rows)"
            if s.input_rows and s.input_rows != s.rows_total
            else f"rows: {s.rows_total} total"
        )
        + f" | {s.ok} ok | {s.error} error | {s.skipped} skipped"
        + (f" | {s.invalid} invalid" if s.invalid else "")
        + (f" | {s.pending} pending" if s.pending else ""),
        f"this run: {s.sent} sent ({s.retries} retries), {s.resumed} resumed from the checkpoint"
        + (f", {s.removed} left the input" if s.removed else ""),
        f"tokens this run: {s.prompt_tokens} in, {s.completion_tokens} out; "
        + (
            f"cost unknown: {s.unpriced} results of models with no price"
            + (f" (the priced rest: ${s.cost_usd:.6f})" if s.cost_usd else "")
            + "; add their prices with --prices FILE"
            if s.unpriced
            else f"cost ${s.cost_usd:.6f}"
        )
        + (f"; {s.imported} imported results (their cost is not known here)" if s.imported else "")
        + (f"; {s.deduplicated} duplicates answered once" if s.deduplicated else "")
        + (f"; {s.cache_hits} from the cache" if s.cache_hits else ""),
        f"wall time: {s.wall_seconds:.1f}s",
    ]
    if s.finish_reasons:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.finish_reasons.items()))
        lines.append(f"finish_reason: {reasons}")
    if s.error_types:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.error_types.items()))
        lines.append(f"errors: {kinds}")
        for kind, message in sorted(s.error_messages.items()):
            shown = message if len(message) <= 160 else message[:157] + "..."
            lines.append(f"  {kind}, most often: {shown}")
    answered = s.ok + s.invalid
    if s.invalid or s.labels:
        rate = s.invalid / answered if answered else 0.0
        lines.append(f"invalid answers: {s.invalid} ({rate:.1%} of answered)")
    if s.labels:
        shares = ", ".join(f"{k} {v}" for k, v in sorted(s.labels.items(), key=lambda x: -x[1]))
        lines.append(f"labels: {shares}")
    if len(s.models) > 1 or any(m.get("scored") for m in s.models):
        from .report import format_table

        lines.append(format_table(s.models))
    if s.aborted:
        lines.append(f"stopped: {s.aborted}")
    if s.shard and s.job_pending:
        lines.append(
            f"output: {s.output} not written yet: the other shards owe {s.job_pending} "
            "results; the shard that finishes the job writes it (or `pipeline merge` does)"
        )
    else:
        lines.append(f"output: {s.output}")
    return "\n".join(lines)
