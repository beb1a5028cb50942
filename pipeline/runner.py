"""Orchestration only: wires reader -> prompts -> limits -> retry(client) -> checkpoint -> writer.

``run_batch`` (sync) and ``run_async`` are the library's entry points; the CLI and
``pipeline.run`` call them. Order of a run:

1. open the input, validate the prompt source and the API key: every usage error is raised
   here, before any request (exit code 2);
2. lock OUTPUT's checkpoint, check its fingerprint, compute every row's key, and find which
   rows still need a result;
3. send those rows with ``concurrency`` workers, persisting results into checkpoint parts
   every ``checkpoint_seconds`` / ``checkpoint_rows``;
4. on the end, a fatal error (401/403/quota), a signal or the deadline: stop sending, keep
   what is done, and write OUTPUT with every input row in input order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .cache import ResponseCache
from .checkpoint import Checkpoint, ResultIndex, file_signature
from .client import ChatClient, build_body, make_transport, parse_completion
from .config import FINGERPRINT_DEFAULTS, RunConfig, resolve_api_key
from .errors import (
    EXIT_ABORTED,
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RETRY_LATER,
    EXIT_STORAGE,
    BudgetReached,
    ConfigError,
    ConnectFailed,
    FatalError,
    InputError,
    OutputError,
    RateLimited,
    RequestError,
    RunAborted,
    ServerSaysLater,
    UnexpectedError,
    exit_reason,
)
from .estimate import Estimate, Estimator
from .keys import compute_keys, model_row_keys, sample_row_keys
from .limits import Budget, Limits, RowGate
from .memory import map_large_blocks, release_memory
from .pricing import PriceTable
from .progress import Reporter
from .prompts import PromptBuilder
from .proxy import ProxySettings, settings_from
from .reader import InputSource, Resume, delimiter_hint, open_input
from .records import (
    RESULT_COLUMNS,
    STATUS_CODES,
    WIDE_SEPARATOR,
    Choice,
    Completion,
    Message,
    PromptRow,
    RowResult,
    RunSummary,
    Usage,
    request_id_of,
)
from .retry import RetryPolicy
from .samples import SAMPLE_COLUMN, SHARED, SampleRequest, plan_requests
from .scoring import make_scorer
from .structured import (
    ParsedAnswer,
    add_system_text,
    label_instruction,
    load_labels,
    load_schema,
    parse_answer,
    parse_label,
    plan_schema_request,
    reask_messages,
    schema_columns,
)
from .writer import OutputSpec, write_output

WORKERS_PER_SLOT = 8  # rows in progress per request in flight (see _Run.execute)
_ONE_SAMPLE = [SampleRequest((0,))]  # the only request of a row without --n


@dataclass
class Seams:
    """Injectable pieces: tests swap the transport, the sleep, the clock and the reporter.

    ``sleep`` and ``clock`` go together (retry waits and pacing): a fake sleep must advance
    the fake clock it comes with.
    """

    transport: httpx.AsyncBaseTransport | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    reporter: Reporter | None = None
    environ: dict[str, str] | None = None
    handle_signals: bool = True
    # Where SIGINT reaches a run that is not on the main thread (``RunThread``): given the
    # run's handler, deliver signals to it and return a function that stops delivering.
    signals: Callable[[Callable[[int], None]], Callable[[], None]] | None = None


@dataclass
class _Plan:
    """What a run works on, decided before any request."""

    source: InputSource
    builder: PromptBuilder
    checkpoint: Checkpoint
    keys: np.ndarray  # per input row
    resume_from: Resume | None  # where reading may start: the rows before need nothing
    models: tuple[str, ...]
    model_keys: tuple[np.ndarray, ...]  # per model: the key of (row, model), i.e. of sample 0
    # per unit u = model * n + sample: the key of (row, model, sample); one unit per model
    # when n == 1
    unit_keys: tuple[np.ndarray, ...]
    todo: np.ndarray  # bool [row, unit]: needs a result
    send: np.ndarray  # bool [row, unit]: needs a request (todo, not a duplicate)
    index: ResultIndex
    prices: PriceTable
    followers: dict[int, list[int]]  # leader key -> keys of its duplicates sent with it
    copy_from: np.ndarray  # index positions of done leaders whose duplicates need a copy
    copy_to: np.ndarray  # the duplicates' keys, aligned with copy_from
    resumed: int
    removed: int
    ids_only: bool  # --id-column rows keyed by id alone (a checkpoint of key scheme 1)
    api_key: str | None
    notes: list[str] = field(default_factory=list)
    proxies: ProxySettings = field(default_factory=ProxySettings)


def _check_output_path(output: Path, config: RunConfig, checkpoint: Checkpoint) -> None:
    if output.is_dir():
        raise OutputError(f"-o {output} is a directory; give a file name like results.parquet.")
    if not output.parent.exists():
        raise OutputError(
            f"-o {output}: the directory {output.parent} does not exist. Create it first."
        )
    if output.exists() and not config.overwrite and not checkpoint.output_is_ours():
        raise OutputError(
            f"{output} already exists and was not written by an earlier run of this "
            "checkpoint. Refusing to replace it: pass --overwrite, or choose another -o."
        )


def open_job(data: Any, config: RunConfig) -> tuple[InputSource, PromptBuilder]:
    """The input and its prompt builder, with every column the options name checked."""
    source = open_input(
        data, input_format=config.input_format, limit=config.limit, delimiter=config.delimiter
    )
    schema = source.schema()
    columns = list(schema.names)
    try:
        _check_added_columns(source, config)
        kind, value = config.prompt_source
        builder = PromptBuilder(
            kind, value, system=config.system, columns=columns, source_name=source.name
        )
        if config.id_column is not None and config.id_column not in columns:
            raise InputError(
                f"{source.name} has no column '{config.id_column}' for --id-column "
                f"(columns: {', '.join(columns)})."
            )
        if config.expected_column is not None and config.expected_column not in columns:
            raise InputError(
                f"{source.name} has no column '{config.expected_column}' for --expected-column "
                f"(columns: {', '.join(columns)})."
            )
    except InputError as exc:
        hint = delimiter_hint(columns, config.delimiter)
        if hint:
            raise InputError(f"{exc} {hint}") from exc
        raise
    return source, builder


def _check_added_columns(source: InputSource, config: RunConfig) -> None:
    """Refuse, before any request, an input column that OUTPUT would add again (a Parquet
    file cannot hold two columns of one name), naming the option that adds it."""
    schema = source.schema()
    columns = list(schema.names)
    spec = output_spec(config)
    added = spec.schema_for(schema).names[len(columns) :]
    schema_names = (
        {n for n, _ in schema_columns(spec.schema, spec.schema_prefix)} if spec.schema else set()
    )
    seen = set(columns)
    for column in added:
        if column not in seen:
            seen.add(column)
            continue
        where = "the input already has" if column in columns else "OUTPUT already has"
        # with --wide the schema's columns sit in each model's group: {model}__{column}
        own = column.split(WIDE_SEPARATOR, 1)[-1] if config.wide else column
        if own in schema_names:
            raise ConfigError(
                f"--json-schema {config.json_schema}: its property would become the column "
                f"'{column}', which {where}. Set --schema-prefix (e.g. "
                "--schema-prefix answer_) so that the schema's columns get their own names."
            )
        if column in RESULT_COLUMNS:
            because = "which OUTPUT adds for every result (is this an earlier output?)"
        elif column == SAMPLE_COLUMN:
            because = "which --samples long adds; or use --samples list"
        elif column == "model":
            because = "which OUTPUT adds when several models run (--model given more than once)"
        elif column in ("label", "score"):
            because = f"which --{'labels' if column == 'label' else 'score'} adds"
        else:
            because = "which --wide adds (model name + '__' + result column)"
        raise InputError(
            f"{source.name} already has a column '{column}', {because}. Rename or drop it in the "
            "input."
        )


KEY_SCHEME = 2  # 2: with --id-column a row's key is made of its id and its content


def _ids_only_keys(checkpoint: Checkpoint, config: RunConfig) -> bool:
    """Whether this checkpoint keys --id-column rows by their id alone (made before key
    scheme 2): it keeps that scheme, or every row would be sent again."""
    if config.id_column is None or config.restart:
        return False
    manifest = checkpoint.read_manifest()
    return bool(manifest) and manifest.get("key_scheme", 1) < KEY_SCHEME


def _removed_since_last_run(
    checkpoint: Checkpoint, present: np.ndarray, unit_keys: list[np.ndarray]
) -> int:
    """Results whose rows left the input since the last run (not those that left before:
    their results stay in the checkpoint, and counting them again said "8 left" for 5)."""
    absent = int((~present).sum())
    if not absent:
        return 0  # the usual resume: nothing to compare
    last = checkpoint.read_keys()
    if last is None:
        return absent
    return int((~np.isin(last, np.concatenate(unit_keys))).sum())


def plan_run(data: Any, output: Path, config: RunConfig, seams: Seams) -> _Plan:
    """Everything that can fail before a request is sent (raises UsageError / LockHeld)."""
    source, builder = open_job(data, config)
    api_key = resolve_api_key(config, seams.environ)
    proxies = settings_from(config.proxy, os.environ if seams.environ is None else seams.environ)
    proxies.check(config.base_url)
    checkpoint = Checkpoint(output)
    # The key pass reads the whole input: a malformed row, bad bytes or a duplicate id is
    # found here, before the checkpoint is touched and before any request. What an earlier
    # run's pass saw of the same bytes is reused rather than read again.
    previous = checkpoint.load_key_pass()
    ids_only = _ids_only_keys(checkpoint, config)
    row_keys = compute_keys(
        source,
        id_column=config.id_column,
        content_columns=builder.columns,
        previous=previous,
        ids_only=ids_only,
    )
    new_pass = row_keys.key_pass if row_keys.key_pass is not previous else None
    del previous
    release_memory()  # the pass's read buffers and sort temporaries
    keys = row_keys.keys
    models = config.all_models
    model_keys = [keys] if len(models) == 1 else [model_row_keys(keys, m) for m in models]
    unit_keys = [sample_row_keys(mk, s) for mk in model_keys for s in range(config.n)]
    prices = PriceTable.load(config.prices)
    for model in models:
        if config.max_cost is not None and prices.price(model) is None:
            raise ConfigError(
                f"--max-cost needs a price for model '{model}', and the price table has "
                "none. Add it in a file given with --prices (see configs/prices.toml), or use "
                "--max-total-tokens."
            )

    _check_output_path(output, config, checkpoint)
    notes: list[str] = []
    note = checkpoint.acquire_lock()
    if note:
        notes.append(note)
    try:
        if config.restart and checkpoint.dir.exists():
            backup = checkpoint.set_aside()
            checkpoint.release_lock()
            checkpoint.acquire_lock()
            notes.append(f"--restart: the old checkpoint was moved to {backup}")
        if ids_only:
            notes.append(
                f"{checkpoint.dir} keys --id-column rows by their id alone (an older version "
                "made it): a prompt edited since its answer keeps that answer; --restart "
                "starts over with keys that follow the prompt"
            )
        elif checkpoint.holds_results():  # no result yet (a run that failed): nothing to mix
            checkpoint.check_fingerprint(config.fingerprint_parts(), FINGERPRINT_DEFAULTS)
        notes.extend(checkpoint.prepare(config.fingerprint()))
        if new_pass is not None:
            checkpoint.save_key_pass(new_pass)
            del new_pass
        index = checkpoint.load_index()
        release_memory()
    except BaseException:
        checkpoint.release_lock()
        raise
    n = len(keys)
    todo = np.zeros((n, len(unit_keys)), dtype=bool)
    present = np.zeros(len(index.keys), dtype=bool)
    followers: dict[int, list[int]] = {}
    copy_from: list[int] = []
    copy_to: list[int] = []
    duplicate = row_keys.first != np.arange(n)
    send = np.zeros_like(todo)
    for j, mkeys in enumerate(unit_keys):
        pos = index.lookup(mkeys)
        done = pos >= 0
        if config.retry_failed and len(index.keys):
            status = index.status[np.maximum(pos, 0)]
            done &= (status != STATUS_CODES["error"]) & (status != STATUS_CODES["invalid"])
        present[pos[pos >= 0]] = True
        todo[:, j] = ~done
        send[:, j] = ~done
        if config.dedup:
            # a later row with the same prompt is not sent: it gets its first row's result
            for i in np.nonzero(~done & duplicate)[0]:
                leader = int(row_keys.first[i])
                send[i, j] = False
                if not done[leader]:
                    followers.setdefault(int(mkeys[leader]), []).append(int(mkeys[i]))
                else:
                    copy_from.append(int(pos[leader]))
                    copy_to.append(int(mkeys[i]))
    done_all = ~todo
    needed = np.flatnonzero(send.any(axis=1))
    release_memory()  # the lookups' temporaries
    return _Plan(
        source=source,
        builder=builder,
        checkpoint=checkpoint,
        keys=keys,
        resume_from=row_keys.resume_point(int(needed[0])) if len(needed) else None,
        models=models,
        model_keys=tuple(model_keys),
        unit_keys=tuple(unit_keys),
        todo=todo,
        send=send,
        index=index,
        prices=prices,
        followers=followers,
        copy_from=np.array(copy_from, dtype=np.int64),
        copy_to=np.array(copy_to, dtype=np.uint64),
        resumed=int(done_all.sum()),
        removed=_removed_since_last_run(checkpoint, present, unit_keys),
        ids_only=ids_only,
        api_key=api_key,
        notes=[*notes, *filter(None, [proxies.describe(config.base_url)])],
        proxies=proxies,
    )


async def _uncancellable(step: Coroutine[Any, Any, None]) -> None:
    """Run ``step`` to its end even if the caller is cancelled meanwhile (the cancel is
    raised after): the last checkpoint writes must not be cut off."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


class _FailFast:
    """Tells a run whose first requests all fail the same way because of its setup (a wrong
    --base-url path, a host that does not resolve, a refused port, a server that answers
    500 to everything) from one where some rows fail: ``limit`` such attempts in a row, no
    answer yet, one kind and status. Only failures that say "this address or server is
    wrong" count (``counts``): not 429s (rate control), not timeouts (a cold start), not
    400s (the rows' own content). The first answer disarms it for the rest of the run.
    """

    limit = 10

    def __init__(self) -> None:
        self.armed = True
        self.failures = 0
        self.signature: tuple[str, int | None] | None = None
        self.tripped: tuple[str, int | None] | None = None  # the signature that stopped the run

    @staticmethod
    def counts(exc: RequestError) -> bool:
        if isinstance(exc, ConnectFailed):
            return True
        return exc.status in (404, 405, 500, 501, 505) and not isinstance(exc, FatalError)

    def failed(self, exc: RequestError) -> bool:
        """Count one failed attempt; True when the run should stop."""
        if not self.armed or not self.counts(exc):
            return False
        signature = (exc.kind, exc.status)
        if self.signature is not None and signature != self.signature:
            self.armed = False  # two kinds of setup failure: rows fail, not the setup
            return False
        self.signature = signature
        self.failures += 1
        return self.failures >= self.limit

    def holds(self, result: RowResult) -> bool:
        """Whether ``result`` waits for the verdict: an error like the ones counted."""
        return (
            self.armed
            and result.status == "error"
            and self.signature is not None
            and (result.error_type, result.http_status) == self.signature
        )


class _Run:
    """The sending phase of one run: workers, the part flusher, stop handling."""

    def __init__(
        self,
        plan: _Plan,
        config: RunConfig,
        seams: Seams,
        reporter: Reporter,
        started: float | None = None,
    ) -> None:
        self.started = time.monotonic() if started is None else started
        self.plan = plan
        self.config = config
        self.seams = seams
        self.reporter = reporter
        self.buffer: list[RowResult] = []
        self.flush_lock = asyncio.Lock()
        self._flushes: set[asyncio.Task[bool]] = set()  # flushes record() started
        self._flusher_done = asyncio.Event()
        self.storage_error: str | None = None  # the first failed checkpoint write
        self.unsaved = 0  # answers that could not be written anywhere
        self._open_keys: set[int] = set()  # keys of rows a worker holds, not yet recorded
        self.fail_fast = _FailFast()
        # while nothing has succeeded, error rows wait here: if every request fails the same
        # way the run stops and they stay pending (a rerun after the fix sends them)
        self._on_probation: list[RowResult] = []
        self.stopping = asyncio.Event()
        self.stopping_now = asyncio.Event()
        self.abort_reason: str | None = None
        self.hard_stop = False
        self.sent = 0
        self.params = config.body_params()
        self._last_flush = time.monotonic()
        self._flush_scheduled = False
        self.limits = Limits(
            concurrency=config.concurrency,
            rpm=config.rpm,
            tpm=config.tpm,
            max_tokens=config.max_tokens,
            adaptive=config.adaptive,
            max_pause=config.max_retry_wait,
            clock=seams.clock,
            sleep=seams.sleep,
            on_change=lambda why, view: reporter.rate_changed(why, view),
        )
        reporter.rate_view = self.limits.view
        self.rows = RowGate(config.concurrency)
        self.policy = RetryPolicy(
            max_retries=config.max_retries,
            max_retry_wait=config.max_retry_wait,
            sleep=self.rows.parked(seams.sleep),
        )
        index = plan.index
        self.budget = Budget(
            max_cost=config.max_cost,
            max_tokens=config.max_total_tokens,
            spent_cost=float(index.cost_usd.sum()),
            spent_tokens=int(index.prompt_tokens.sum() + index.completion_tokens.sum()),
        )
        self.cache = ResponseCache(config.cache) if config.cache else None
        self.answer_schema = load_schema(config.json_schema) if config.json_schema else None
        self.labels = load_labels(config.labels) if config.labels else None
        self._shapes: dict[str, tuple[dict[str, Any], str | None]] = {}
        self.abort_kind: str | None = None
        self.deduplicated = 0
        self.cache_hits = 0
        self.ignores_n: set[str] = set()  # models whose server answered fewer choices than n

    # -- results --------------------------------------------------------------------------

    def record(self, result: RowResult) -> None:
        self._open_keys.discard(result.key)
        if self.fail_fast.signature is not None and result.status == "error":
            if self.fail_fast.holds(result):
                self._on_probation.append(result)
                return
            if self.fail_fast.tripped == (result.error_type, result.http_status):
                return  # failed like every request before the stop: stays pending
        self.buffer.append(result)
        self.reporter.row_done(result)
        for key in self.plan.followers.pop(result.key, ()):
            self.record_copy(result, key)
        if (
            len(self.buffer) >= self.config.checkpoint_rows
            and not self._flush_scheduled
            and self.storage_error is None
        ):
            # one flush at a time: while a part is being written, results keep collecting
            # for the next one (scheduling a flush per result would write tiny parts)
            self._flush_scheduled = True
            task = asyncio.get_running_loop().create_task(self.flush())
            self._flushes.add(task)  # awaited before the run ends: never dropped
            task.add_done_callback(self._flushes.discard)

    def _answered(self) -> None:
        """A 2xx came back: the setup works, the held errors are ordinary row results."""
        if self.fail_fast.armed:
            self.fail_fast.armed = False
            self._end_probation()

    def _end_probation(self) -> None:
        held, self._on_probation = self._on_probation, []
        for result in held:
            self.record(result)

    def _fail_fast(self, exc: RequestError) -> None:
        """Every request so far failed the same way: stop, leaving those rows pending."""
        self.fail_fast.armed = False
        self.fail_fast.tripped = self.fail_fast.signature
        if self.abort_kind is None:
            self.abort_kind = "fatal"
        self._on_probation = []
        status = f" {exc.status}" if exc.status else ""
        message = (
            f"the first {self.fail_fast.failures} requests all failed the same way and none "
            f"succeeded ({exc.kind}{status}: {exc.message}); check --base-url "
            f"({self.config.base_url}), the network, the proxy and the server; those rows "
            "stay pending"
        )
        self.reporter.error(f"stopping the run: {message}", http_status=exc.status)
        self.stop(f"failing: {message}", hard=True)

    def record_copy(self, result: RowResult, key: int) -> None:
        """A duplicate row gets its first row's result; it cost nothing itself."""
        self.deduplicated += 1
        self.record(
            dataclasses.replace(
                result,
                key=key,
                attempts=0,
                latency_ms=None,
                # marked whatever its status: budgets and status count no tokens for it
                cost_usd=0.0,
                cost_source="dedup",
            )
        )

    async def flush(self) -> bool:
        """Write the buffered results as one part; False when the write failed.

        Never cancelled half way (the flusher is stopped by an event, record()'s flushes are
        awaited): a part write that went on in its thread after a cancel let the next flush
        take the same part number and lose a part. A failed write puts its results back in
        the buffer (nothing received is dropped) and stops the run.
        """
        async with self.flush_lock:
            self._flush_scheduled = False
            if not self.buffer:
                return True
            batch, self.buffer = self.buffer, []
            self._last_flush = time.monotonic()
            try:
                await asyncio.to_thread(self.plan.checkpoint.write_part, batch)
            except Exception as exc:  # disk full, read-only, I/O error: all stop
                self.buffer[:0] = batch
                self._storage_failed(exc)
                return False
            return True

    def storage_failed_at_end(self, exc: OSError, path: Path) -> None:
        """OUTPUT or the manifest could not be written after every result was saved."""
        if self.storage_error is None:
            self.storage_error = f"{type(exc).__name__}: {exc}"
            self.abort_kind = "storage"
            self.abort_reason = self.abort_reason or f"storage: cannot write {path}"
        self.reporter.error(
            f"cannot write {path} ({type(exc).__name__}: {exc}); every result received is in "
            "the checkpoint: free space or fix permissions, then rerun to write OUTPUT"
        )

    def _storage_failed(self, exc: Exception) -> None:
        if self.storage_error is not None:
            return
        self.storage_error = f"{type(exc).__name__}: {exc}"
        self.abort_kind = "storage"
        self.reporter.error(
            f"stopping the run: cannot write the checkpoint ({self.storage_error}). "
            "Nothing more is sent; the answers received are kept in memory and written "
            "when the run ends if the disk allows. Free space or fix permissions, then rerun."
        )
        self.stop(f"storage: checkpoint write failed: {self.storage_error}")

    async def flusher(self) -> None:
        tick = min(self.config.checkpoint_seconds, 0.5)
        while not self._flusher_done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flusher_done.wait(), tick)
            self.reporter.tick()
            if (
                self.buffer
                and self.storage_error is None
                and time.monotonic() - self._last_flush >= self.config.checkpoint_seconds
            ):
                await self.flush()

    async def _last_flushes(self) -> None:
        """Every result received reaches a part before the run says it is done."""
        if self._on_probation:
            self.fail_fast.armed = False
            self._end_probation()  # a small job whose rows all failed: ordinary errors
        self._flusher_done.set()
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if await self.flush() or not self.buffer:
            return
        # the checkpoint cannot be written: one more try in a moment, then the rescue place
        await asyncio.sleep(min(self.config.grace, 1.0))
        if await self.flush() or not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        try:
            rescued = await asyncio.to_thread(self.plan.checkpoint.rescue_part, batch)
        except Exception as exc:  # nowhere left to write
            self.unsaved = len(batch)
            self.reporter.error(
                f"{len(batch)} answers received could not be saved anywhere "
                f"({type(exc).__name__}: {exc}); a rerun sends those rows again"
            )
            return
        self.reporter.error(
            f"{len(batch)} answers received could not be written to the checkpoint; they "
            f"were saved to {rescued} and the next run of this OUTPUT takes them from there"
        )

    # -- sending --------------------------------------------------------------------------

    def stop(self, reason: str, *, hard: bool = False) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        self.hard_stop = self.hard_stop or hard
        self.stopping.set()
        if hard:
            self.stopping_now.set()

    async def produce(self, queue: asyncio.Queue[PromptRow | None], workers: int) -> None:
        plan = self.plan
        # start reading at the first row that needs a request, where its byte is known
        # (rows appended since the last run): a resume does not re-read what is done
        start = plan.resume_from
        batches = iter(plan.source.iter_batches(columns=plan.builder.columns, start=start))
        offset = start.row if start is not None else 0
        finished = False
        try:
            while not self.stopping.is_set():
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                n = batch.num_rows
                need = plan.send[offset : offset + n]
                if need.any():
                    where = np.nonzero(need.any(axis=1))[0]
                    # a run of consecutive rows (the usual case) is a slice, not a take
                    contiguous = where[-1] - where[0] + 1 == len(where)
                    part = (
                        batch.slice(int(where[0]), len(where)) if contiguous else batch.take(where)
                    )
                    rows = plan.builder.build(part, plan.keys[offset + where], offset + where)
                    for i, row in zip(where, rows, strict=True):
                        for j, model in enumerate(plan.models):
                            unit = self._unit(row, offset + int(i), j, model, need[i])
                            if unit is None:
                                continue
                            if unit.messages is None:
                                for _, key in unit.wanted:
                                    self.record(self._unsent_result(unit, key))
                                continue
                            await queue.put(unit)
                        if self.stopping.is_set():
                            break
                offset += n
            finished = True
        finally:
            # Sentinels only when the producer ended by itself: after a cancel or an error
            # nobody may read the queue, and a put on a full queue would never return
            # (execute stops the workers then).
            if finished:
                for _ in range(workers):
                    await queue.put(None)

    def _unit(
        self, row: PromptRow, position: int, model_index: int, model: str, need: np.ndarray
    ) -> PromptRow | None:
        """``row`` as sent to model ``model_index`` for the samples it still needs, or None."""
        plan, n = self.plan, self.config.n
        first = model_index * n
        if n == 1:
            if not need[first]:
                return None
        elif not need[first : first + n].any():
            return None
        unit = row
        if len(plan.models) > 1:
            unit = dataclasses.replace(
                unit, key=int(plan.model_keys[model_index][position]), model=model
            )
        if n > 1:
            samples = tuple(
                (s, int(plan.unit_keys[first + s][position])) for s in range(n) if need[first + s]
            )
            unit = dataclasses.replace(unit, samples=samples)
        return unit

    def _unsent_result(self, row: PromptRow, key: int) -> RowResult:
        if row.skip_reason is not None:
            return RowResult(key=key, status="skipped", error_message=row.skip_reason)
        return RowResult(
            key=key,
            status="error",
            error_type="InvalidRow",
            error_message=row.invalid_reason,
        )

    async def work(self, queue: asyncio.Queue[PromptRow | None], client: ChatClient) -> None:
        while True:
            row = await queue.get()
            if row is None or self.stopping.is_set():
                return
            keys = [key for _, key in row.wanted]
            self._open_keys.update(keys)
            try:
                await self.send_row(row, client)
            except Exception as exc:  # a row's failure is its own
                if not self.stopping.is_set():  # in a stop, the row just stays pending
                    self._row_failed(keys, exc)
            self._open_keys.difference_update(keys)

    def _row_failed(self, keys: list[int], exc: Exception) -> None:
        """An unexpected exception while a row was handled ends that row as an error."""
        while isinstance(exc, ExceptionGroup) and exc.exceptions:  # from a TaskGroup
            exc = exc.exceptions[0]
        message = str(exc) or repr(exc)
        for key in keys:
            if key in self._open_keys:
                self.record(
                    RowResult(
                        key=key,
                        status="error",
                        error_type=type(exc).__name__,
                        error_message=message[:2000],
                    )
                )

    # -- one row: request(s), answer checks and re-asks -------------------------------------

    def _request_shape(self, model: str) -> tuple[dict[str, Any], str | None]:
        """(body parameters, system text to add) for ``model``: schema and label options."""
        shape = self._shapes.get(model)
        if shape is None:
            params, system = dict(self.params), None
            if self.answer_schema is not None:
                plan = plan_schema_request(self.answer_schema, model, self.config.schema_mode)  # type: ignore[arg-type]
                params["response_format"] = plan.response_format
                system = plan.system_prompt
            elif self.labels is not None:
                system = label_instruction(self.labels)
            shape = self._shapes[model] = (params, system)
        return shape

    def _check_answer(self, text: str | None, finish_reason: str | None) -> ParsedAnswer | None:
        if self.answer_schema is not None:
            return parse_answer(text, self.answer_schema, finish_reason=finish_reason)
        if self.labels is not None:
            return parse_label(text, self.labels, finish_reason=finish_reason)
        return None

    def _native(self, model: str) -> bool:
        """Whether ``model``'s samples are asked for with the API's ``n`` (see --n-mode)."""
        mode = self.config.n_mode
        return mode == "native" or (mode == "auto" and model not in self.ignores_n)

    def _plan(self, model: str, samples: list[int]) -> list[SampleRequest]:
        config = self.config
        if config.n == 1:
            return _ONE_SAMPLE  # the hot path without --n: nothing to decide
        return plan_requests(
            samples, n=config.n, native=self._native(model), base_seed=config.base_seed
        )

    async def send_row(self, row: PromptRow, client: ChatClient) -> None:
        """Every sample ``row`` still needs; each result is recorded when it is final.

        At most ``--concurrency`` rows are in progress, not counting rows waiting out a
        retry: those leave their place to the next row (``RowGate``)."""
        await self.rows.enter()
        try:
            await self._send_row(row, client)
        finally:
            self.rows.leave()

    async def _send_row(self, row: PromptRow, client: ChatClient) -> None:
        model = row.model or self.config.model
        params, system_text = self._request_shape(model)
        messages = row.messages or []
        if system_text:
            messages = add_system_text(messages, system_text)
        keys = dict(row.wanted)
        requests = self._plan(model, list(keys))
        if len(requests) == 1:
            await self._send_samples(row, model, messages, params, requests[0], keys, client)
            return
        # a TaskGroup: if one request fails unexpectedly its siblings stop too, so the
        # row is settled once (by the worker) and nothing outlives the run
        async with asyncio.TaskGroup() as group:
            for request in requests:
                group.create_task(
                    self._send_samples(row, model, messages, params, request, keys, client)
                )

    def _stop_for(self, exc: BudgetReached | FatalError) -> None:
        """A budget or a fatal error ends the run; what it interrupted stays pending."""
        if isinstance(exc, ServerSaysLater) and self.abort_kind is None:
            self.abort_kind = "retry_later"
        if isinstance(exc, BudgetReached):
            if self.abort_kind is None:
                self.abort_kind = "budget"
                self.reporter.error(f"stopping the run: {exc.message}")
            self.stop(f"{exc.kind}: {exc.message}")  # requests in flight may finish
            return
        self.reporter.error(f"stopping the run: {exc.message}", http_status=exc.status)
        self.stop(f"{exc.kind}: {exc.message}", hard=True)

    async def _send_samples(
        self,
        row: PromptRow,
        model: str,
        messages: list[Message],
        params: dict[str, Any],
        request: SampleRequest,
        keys: dict[int, int],
        client: ChatClient,
    ) -> None:
        """One request for ``request.samples``, then each sample's checks and re-asks.

        The request's usage, cost and attempts go to its first sample; the others share it
        (no usage of their own, ``cost_source`` shared) unless re-asks of theirs spend.
        """
        if self.stopping.is_set():
            return  # not sent: these samples stay pending
        first = request.samples[0]
        started = time.monotonic()
        body_params = {**params, **request.params} if request.params else params
        try:
            completion, tries, cached = await self._exchange(
                row,
                model,
                messages,
                body_params,
                client,
                request_id_of(keys[first]),
                choices=len(request.samples),
            )
        except (BudgetReached, FatalError) as exc:
            self._stop_for(exc)
            return
        except RequestError as exc:
            for sample in request.samples:
                self.record(
                    RowResult(
                        key=keys[sample],
                        status="error",
                        error_type=exc.kind,
                        error_message=exc.message,
                        http_status=exc.status,
                        attempts=getattr(exc, "attempts", 1) if sample == first else 0,
                        latency_ms=round((time.monotonic() - started) * 1000, 1),
                        cost_source=None if sample == first else SHARED,
                    )
                )
            return
        cost = (0.0, "cache") if cached else self._cost(completion, model)
        answered = request.samples[: len(completion.choices)]
        missing = request.samples[len(completion.choices) :]
        pending: list[Coroutine[Any, Any, None]] = []
        if missing:
            pending.extend(
                self._fill_missing(
                    row,
                    model,
                    messages,
                    params,
                    request,
                    keys,
                    client,
                    got=len(answered),
                    started=started,
                )
            )
        reask_params = {**params, **request.reask_params} if request.params else params
        if len(answered) == 1 and not pending:
            await self._settle(
                row,
                model,
                messages,
                reask_params,
                client,
                key=keys[first],
                choice=completion.choices[0],
                completion=completion,
                spent=[(completion, cost)],
                attempts=tries,
                started=started,
                shared=False,
            )
            return
        for sample, choice in zip(answered, completion.choices, strict=False):
            shared = sample != first
            pending.append(
                self._settle(
                    row,
                    model,
                    messages,
                    reask_params,
                    client,
                    key=keys[sample],
                    choice=choice,
                    completion=completion,
                    spent=[] if shared else [(completion, cost)],
                    attempts=0 if shared else tries,
                    started=started,
                    shared=shared,
                )
            )
        async with asyncio.TaskGroup() as group:
            for coroutine in pending:
                group.create_task(coroutine)

    def _fill_missing(
        self,
        row: PromptRow,
        model: str,
        messages: list[Message],
        params: dict[str, Any],
        request: SampleRequest,
        keys: dict[int, int],
        client: ChatClient,
        *,
        got: int,
        started: float,
    ) -> list[Coroutine[Any, Any, None]]:
        """A reply with fewer choices than ``n`` asked: auto falls back to seeds for this
        model (these samples now, every later row too); native makes them errors."""
        missing = request.samples[got:]
        asked = len(request.samples)
        if self.config.n_mode != "auto":
            message = (
                f"the server answered {got} choice(s) for n={asked}: it may not support n. "
                "Use --n-mode auto or seeds (one request per sample)."
            )
            for sample in missing:
                self.record(
                    RowResult(
                        key=keys[sample],
                        status="error",
                        error_type="MissingChoice",
                        error_message=message,
                        http_status=200,
                        latency_ms=round((time.monotonic() - started) * 1000, 1),
                        cost_source=SHARED,
                    )
                )
            return []
        if model not in self.ignores_n:
            self.ignores_n.add(model)
            self.reporter.note(
                f"{model} answered {got} choice(s) for n={asked}: the server ignores n, so "
                f"its samples are sent one request each (seed {self.config.base_seed} + sample)"
            )
        return [
            self._send_samples(row, model, messages, params, seeded, keys, client)
            for seeded in self._plan(model, list(missing))
        ]

    async def _settle(
        self,
        row: PromptRow,
        model: str,
        messages: list[Message],
        params: dict[str, Any],
        client: ChatClient,
        *,
        key: int,
        choice: Choice,
        completion: Completion,
        spent: list[tuple[Completion, tuple[float | None, str | None]]],
        attempts: int,
        started: float,
        shared: bool,
    ) -> None:
        """Check one sample's answer, re-ask while it does not parse or validate, record it."""
        text, finish_reason = choice.text, choice.finish_reason

        def cost() -> tuple[float | None, str | None]:
            return _sum_cost(spent) if spent or not shared else (None, SHARED)

        reask = 0
        while True:
            parsed = self._check_answer(text, finish_reason)
            if parsed is None or parsed.ok:
                break
            # a truncated answer would be cut again at the same limit: report it as it is
            if parsed.truncated or reask == self.config.max_reasks:
                self.record(
                    dataclasses.replace(
                        self._ok(
                            key,
                            text,
                            finish_reason,
                            completion,
                            attempts=attempts,
                            started=started,
                            cost=cost(),
                        ),
                        status="invalid",
                        usage=_sum_usage([c for c, _ in spent]),
                        error_type="TruncatedAnswer" if parsed.truncated else "InvalidAnswer",
                        error_message=parsed.error,
                    )
                )
                return
            reask += 1
            current = reask_messages(messages, text, parsed.error or "")
            try:
                completion, tries, cached = await self._exchange(
                    row, model, current, params, client, f"{request_id_of(key)}.r{reask}"
                )
            except (BudgetReached, FatalError) as exc:
                self._stop_for(exc)
                return  # the sample stays pending; a rerun sends it
            except RequestError as exc:
                self.record(
                    RowResult(
                        key=key,
                        status="error",
                        error_type=exc.kind,
                        error_message=exc.message,
                        http_status=exc.status,
                        attempts=attempts + getattr(exc, "attempts", 1),
                        latency_ms=round((time.monotonic() - started) * 1000, 1),
                        usage=_sum_usage([c for c, _ in spent]),
                        cost_usd=cost()[0],
                        cost_source=cost()[1],
                    )
                )
                return
            attempts += tries
            spent.append((completion, (0.0, "cache") if cached else self._cost(completion, model)))
            text, finish_reason = completion.text, completion.finish_reason
        if len(spent) == 1 and spent[0][1][1] == "cache":
            self.cache_hits += 1
        self.record(
            self._ok(
                key,
                text,
                finish_reason,
                completion,
                attempts=attempts,
                started=started,
                cost=cost(),
                usage=_sum_usage([c for c, _ in spent]),
            )
        )

    async def _exchange(
        self,
        row: PromptRow,
        model: str,
        messages: list[Message],
        params: dict[str, Any],
        client: ChatClient,
        request_id: str,
        choices: int = 1,
    ) -> tuple[Completion, int, bool]:
        """One request with its retries (or a cache hit): (completion, attempts, cached).

        ``choices`` is the number of completions it asks for (the API's ``n``): budgets and
        token pacing reserve that many.
        """
        body = build_body(model, messages, params)
        cache_key = None
        if self.cache is not None:
            cache_key = self.cache.key(self.config.base_url, body)
            stored = await asyncio.to_thread(self.cache.get, cache_key)
            if stored is not None:
                try:
                    return parse_completion(stored), 0, True
                except RequestError:
                    pass  # a damaged entry is a miss

        def on_retry(error: RequestError, attempt: int, wait: float) -> None:
            self.reporter.retry(
                row_index=row.index,
                error=error.message,
                status=error.status,
                attempt=attempt,
                wait=wait,
                asked=error.retry_after,
            )

        chars = sum(len(str(m.get("content") or "")) for m in messages)

        async def attempt() -> Completion:
            reservation = self._reserve(chars, model, choices)
            if reservation is None:
                return await limited_send()
            used = (0.0, 0.0)
            try:
                completion = await limited_send()
                used = (self._cost(completion, model)[0] or 0.0, _tokens(completion))
                return completion
            finally:
                self.budget.settle(reservation, *used)

        async def limited_send() -> Completion:
            cost, began = await self.limits.start(chars, choices)
            if self.hard_stop:
                # the run stopped at once while this row waited for a place: it stays
                # pending; execute() cancels this worker with the others
                await self.limits.finish(chars=chars, cost=cost, started=began, headers=None)
                await asyncio.Event().wait()
            try:
                completion = await client.send(body, request_id)
            except RequestError as exc:
                if self.fail_fast.failed(exc):
                    self._fail_fast(exc)
                elif not self.fail_fast.armed and self._on_probation:
                    self._end_probation()  # disarmed by a second kind of failure
                await self.limits.finish(
                    chars=chars,
                    cost=cost,
                    started=began,
                    headers=exc.headers,
                    rate_limited=isinstance(exc, RateLimited),
                    retry_after=exc.retry_after,
                    choices=choices,
                )
                if isinstance(exc, RateLimited) and self.limits.come_back_later:
                    raise _come_back_later(exc, self.config.max_retry_wait) from exc
                raise
            except Exception as exc:  # anything else ends this row, not the worker
                await self.limits.finish(chars=chars, cost=cost, started=began, headers=None)
                raise UnexpectedError(exc) from exc
            except BaseException:
                await self.limits.finish(chars=chars, cost=cost, started=began, headers=None)
                raise
            if self.fail_fast.armed:
                self._answered()
            await self.limits.finish(
                chars=chars,
                cost=cost,
                started=began,
                headers=completion.headers,
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
                choices=choices,
                answered=True,
            )
            return completion

        self.sent += 1
        try:
            completion, attempts = await self.policy.call(attempt, on_retry=on_retry)
        except BudgetReached:
            self.sent -= 1  # nothing went out
            raise
        if cache_key is not None and self.cache is not None and completion.raw:
            await asyncio.to_thread(
                self.cache.put,
                cache_key,
                completion.raw,
                {"model": model, "base_url": self.config.base_url},
            )
        return completion, attempts, False

    def _ok(
        self,
        key: int,
        text: str | None,
        finish_reason: str | None,
        completion: Completion,
        *,
        attempts: int,
        started: float,
        cost: tuple[float | None, str | None],
        usage: Usage | None = None,
    ) -> RowResult:
        """The result of an answered sample: ``text`` from ``completion``, whose model and
        id it reports."""
        return RowResult(
            key=key,
            status="ok",
            completion=text,
            finish_reason=finish_reason,
            usage=completion.usage if usage is None else usage,
            response_model=completion.model,
            response_id=completion.response_id,
            http_status=200,
            attempts=attempts,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            cost_usd=cost[0],
            cost_source=cost[1],
        )

    def _cost(self, completion: Completion, model: str) -> tuple[float | None, str | None]:
        """(USD, source): the server's figure when it reports one, else the price table."""
        if completion.reported_cost is not None:
            return completion.reported_cost, "reported"
        usage = completion.usage
        for name in (model, completion.model):
            if name is None:
                continue
            cost = self.plan.prices.cost(
                name, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
            )
            if cost is not None:
                return cost, "table"
        return None, None

    def _reserve(self, chars: int, model: str, choices: int = 1) -> tuple[float, float] | None:
        """Hold the worst case of one request (``choices`` completions) against the budget,
        or raise BudgetReached."""
        if not self.budget.active:
            return None
        estimator = self.limits.estimator
        tokens = estimator.cost(chars, choices)
        prompt = estimator.prompt_tokens(chars)
        cost = 0.0
        if self.budget.max_cost is not None:
            priced = self.plan.prices.cost(model, round(prompt), round(tokens - prompt))
            cost = priced or 0.0
        if not self.budget.reserve(cost, tokens):
            worst = f"${cost:.4f}, " if self.budget.max_cost is not None else ""
            raise BudgetReached(
                f"budget reached: {self.budget.describe()}; the next request could cross it "
                f"(it reserves up to {worst}{tokens:,.0f} tokens: its prompt plus "
                + ("--max-tokens" if self.config.max_tokens is not None else "a typical answer")
                + f" x {choices} completion{'s' if choices != 1 else ''}). Rerun with a larger "
                "budget to continue."
            )
        return (cost, tokens)

    async def execute(self) -> None:
        config = self.config
        transport = self.seams.transport or make_transport(
            config.http_backend, config.concurrency, config.max_response_bytes, self.plan.proxies
        )
        client = ChatClient(
            config.base_url,
            api_key=self.plan.api_key,
            timeout=config.timeout,
            transport=transport,
            max_response_bytes=config.max_response_bytes,
        )
        if len(self.plan.copy_from):
            stored = self.plan.checkpoint.results_at(self.plan.index, self.plan.copy_from)
            by_key = {
                int(k): r
                for k, r in zip(self.plan.index.keys[self.plan.copy_from], stored, strict=True)
            }
            for source_key, key in zip(
                self.plan.index.keys[self.plan.copy_from], self.plan.copy_to, strict=True
            ):
                self.record_copy(by_key[int(source_key)], int(key))
        queue: asyncio.Queue[PromptRow | None] = asyncio.Queue(maxsize=config.concurrency * 2)
        self._last_flush = time.monotonic()
        flusher = asyncio.create_task(self.flusher())
        # more workers than --concurrency (RowGate and Limits hold rows in progress and
        # requests in flight to it): a row waiting out its Retry-After holds a worker but
        # no place, so the others keep going
        workers = [
            asyncio.create_task(self.work(queue, client))
            for _ in range(config.concurrency * WORKERS_PER_SLOT)
        ]
        producer = asyncio.create_task(self.produce(queue, len(workers)))
        producer.add_done_callback(self._producer_ended)
        remover = self._install_signals()
        deadline = asyncio.create_task(self._deadline()) if config.max_runtime else None
        gather = asyncio.gather(*workers)
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        now_wait: asyncio.Future[Any] = asyncio.ensure_future(self.stopping_now.wait())
        try:
            await asyncio.wait([gather, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if self.stopping.is_set() and not gather.done() and not self.hard_stop:
                # requests in flight get the grace period, unless a hard stop comes first
                await asyncio.wait(
                    [gather, now_wait], timeout=config.grace, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            # whatever ended the wait (the end, a stop, a cancel from outside): no task is
            # left running, and every result received is written before the run goes on
            for task in (*workers, producer, stop_wait, now_wait):
                task.cancel()
            await asyncio.gather(gather, producer, return_exceptions=True)
            remover()
            if deadline is not None:
                deadline.cancel()
            await _uncancellable(self._last_flushes())
            await flusher
            if self.seams.transport is None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        if not producer.cancelled() and producer.exception() is not None:
            raise producer.exception()  # type: ignore[misc]

    def _producer_ended(self, producer: asyncio.Task[None]) -> None:
        """An input that fails while it is read stops the run (the error is raised after)."""
        if not producer.cancelled() and producer.exception() is not None:
            self.stop(f"input: {producer.exception()}", hard=True)

    async def _deadline(self) -> None:
        assert self.config.max_runtime is not None
        left = self.config.max_runtime - (time.monotonic() - self.started)
        await asyncio.sleep(max(left, 0.0))
        self.reporter.note(
            f"--max-runtime {self.config.max_runtime:g}s reached: stopping; requests in "
            f"flight get {self.config.grace:g}s"
        )
        self.abort_kind = self.abort_kind or "interrupted"
        self.stop(f"deadline: --max-runtime {self.config.max_runtime:g}s reached")

    def _install_signals(self) -> Callable[[], None]:
        relayed = self.seams.signals
        if not self.seams.handle_signals or (
            relayed is None and threading.current_thread() is not threading.main_thread()
        ):
            return lambda: None
        loop = asyncio.get_running_loop()
        seen = {"count": 0}

        def on_signal(signum: int) -> None:
            seen["count"] += 1
            name = signal.Signals(signum).name
            self.abort_kind = self.abort_kind or "interrupted"
            if seen["count"] == 1:
                self.reporter.note(
                    f"{name}: stopping; requests in flight get {self.config.grace:g}s "
                    "(send the signal again to stop at once)"
                )
                self.stop(f"interrupted by {name}")
            else:
                self.reporter.note(f"{name} again: stopping now")
                self.stop(f"interrupted by {name}", hard=True)

        if relayed is not None:
            return relayed(on_signal)
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):
                pass

        def remove() -> None:
            for sig in installed:
                loop.remove_signal_handler(sig)

        return remove


def _sum_usage(completions: list[Completion]) -> Usage:
    """Usage of all requests of one row (re-asks count)."""
    if len(completions) == 1:
        return completions[0].usage

    def total(name: str) -> int | None:
        values = [getattr(c.usage, name) for c in completions]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return Usage(
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        total_tokens=total("total_tokens"),
        cached_tokens=total("cached_tokens"),
        reasoning_tokens=total("reasoning_tokens"),
    )


def _sum_cost(
    spent: list[tuple[Completion, tuple[float | None, str | None]]],
) -> tuple[float | None, str | None]:
    costs = [cost for _, cost in spent]
    if not costs or any(c is None for c, _ in costs):
        return None, None
    sources = {source for _, source in costs}
    source = sources.pop() if len(sources) == 1 else "mixed"
    return sum(c for c, _ in costs if c is not None), source


def _tokens(completion: Completion) -> float:
    usage = completion.usage
    if usage.total_tokens is not None:
        return float(usage.total_tokens)
    return float((usage.prompt_tokens or 0) + (usage.completion_tokens or 0))


def _add_answer_summary(summary: RunSummary, output: Path) -> None:
    """Label distribution and the per-model table (score, tokens, cost, latency)."""
    from .report import comparison_table, load_output

    frame = load_output(output)
    if "label" in frame.columns:
        # a label is set only on an ok sample; --samples list holds a list of them per row
        counts = frame["label"].explode().dropna().value_counts()
        summary.labels = {str(k): int(v) for k, v in counts.items()}
    summary.models = comparison_table(frame)


def output_spec(config: RunConfig) -> OutputSpec:
    """OUTPUT's shape under ``config``."""
    return OutputSpec(
        models=config.all_models,
        wide=config.wide,
        schema=load_schema(config.json_schema) if config.json_schema else None,
        schema_prefix=config.schema_prefix,
        labels=tuple(load_labels(config.labels)) if config.labels else None,
        scorer=make_scorer(config.score) if config.score else None,
        expected_column=config.expected_column,
        n=config.n,
        samples=config.samples,
    )


def _output_state(plan: _Plan, config: RunConfig) -> dict[str, Any]:
    parts = plan.checkpoint.part_paths()
    source_sig = file_signature(plan.source.path) if plan.source.path else None
    return {
        "input": plan.source.name,
        "input_signature": source_sig,
        "limit": config.limit,
        "last_part": parts[-1].name if parts else None,
        "rows": len(plan.keys),
        "models": list(plan.models),
        **_output_shape(config),
    }


def _output_shape(config: RunConfig) -> dict[str, Any]:
    """The options that shape OUTPUT without changing a response: a change rewrites OUTPUT
    even when nothing is sent. Only those not at their default, so that the state of a run
    that sets none stays what it was."""
    shape = {
        "wide": config.wide,
        "samples": config.samples if config.n > 1 else "list",
        "score": config.score,
        "expected_column": config.expected_column,
        "schema_prefix": config.schema_prefix,
    }
    defaults = {"wide": False, "samples": "list", "score": None, "expected_column": None}
    return {name: value for name, value in shape.items() if value != defaults.get(name, "")}


async def run_async(
    data: Any, output: str | Path, config: RunConfig, seams: Seams | None = None
) -> RunSummary:
    """Run the whole job; returns the summary. Raises UsageError/LockHeld before sending,
    RunAborted (with ``.summary``) after a fatal error or a signal."""
    seams = seams or Seams()
    output = Path(output)
    started = time.monotonic()
    map_large_blocks()
    reporter = seams.reporter or Reporter(
        progress=config.progress, log_interval=config.log_interval
    )
    plan = plan_run(data, output, config, seams)
    checkpoint = plan.checkpoint
    try:
        for note in plan.notes:
            reporter.note(note)
        manifest = checkpoint.read_manifest()
        fingerprint = config.fingerprint()
        manifest.update(
            fingerprint=fingerprint,
            fingerprint_parts=config.fingerprint_parts(),
            config=config.public_dict(),
            input=plan.source.name,
            rows_total=len(plan.keys) * len(plan.unit_keys),
            created_at=manifest.get("created_at", time.time()),
            # what each part names as its job (with the fingerprint): a part of another
            # job, or of this checkpoint before a --restart, is never used
            job_id=manifest.get("job_id") or checkpoint.job_id or uuid.uuid4().hex,
            key_scheme=1 if plan.ids_only else KEY_SCHEME,
            legacy_upto=checkpoint.legacy_upto,
            running=True,
        )
        checkpoint.identity = {"fingerprint": fingerprint, "job": manifest["job_id"]}
        checkpoint.write_manifest(manifest)
        checkpoint.write_keys(np.concatenate(plan.unit_keys))
        todo = int(plan.todo.sum())
        reporter.run_started(
            output=str(output),
            fingerprint=fingerprint,
            config=config.public_dict(),
            total=len(plan.keys) * len(plan.unit_keys),
            todo=todo,
            resumed=plan.resumed,
            input_rows=len(plan.keys),
            per_row=" x ".join(
                f"{count} {word}"
                for count, word in ((len(plan.models), "models"), (config.n, "samples"))
                if count > 1
            ),
        )
        run = _Run(plan, config, seams, reporter, started)
        reporter.in_flight = lambda: run.limits.concurrency.in_flight
        if todo:
            await run.execute()
            # the plan's index is out of date now: drop it before building the new one
            plan.index = ResultIndex.empty()
            release_memory()  # what the sending freed: the index is built on top of it
            full = checkpoint.load_index()
        else:
            full = plan.index
        if checkpoint.parts_read and run.storage_error is None:
            with contextlib.suppress(OSError):  # a cache: the next run rebuilds it if missing
                checkpoint.save_index(full)  # the next run starts from it
        # from here on only where each input row's result is matters (8 bytes a row and
        # unit): drop the index (41 bytes a key) once the counts are taken
        plan.index = ResultIndex.empty()
        counts = full.counts_of(plan.unit_keys)
        places = full.places(plan.unit_keys)
        del full
        release_memory()
        state = _output_state(plan, config)
        unchanged = (
            not todo and manifest.get("output_state") == state and checkpoint.output_is_ours()
        )
        interrupted = (
            run.hard_stop and run.abort_reason and run.abort_reason.startswith("interrupted")
        )
        # a checkpoint that cannot be written cannot feed OUTPUT: the old OUTPUT stays
        if not interrupted and run.storage_error is None:
            try:
                if not unchanged:

                    def record_next(signature: dict[str, int] | None) -> None:
                        manifest["output_signatures"] = [signature]
                        checkpoint.write_manifest(manifest)

                    await asyncio.to_thread(
                        write_output,
                        plan.source,
                        output_spec(config),
                        places,
                        checkpoint,
                        output,
                        record_next,
                    )
                manifest.update(
                    output_signature=file_signature(output),
                    output_state=state,
                    output_signatures=[],
                )
            except OSError as exc:
                run.storage_failed_at_end(exc, output)
        manifest["running"] = False
        try:
            checkpoint.write_manifest(manifest)
        except OSError as exc:
            run.storage_failed_at_end(exc, checkpoint.manifest_path)
        del places
        summary = _summarize(plan, counts, run, output, fingerprint, started)
        if output.exists() and (len(plan.models) > 1 or config.labels or config.score):
            _add_answer_summary(summary, output)
    finally:
        checkpoint.release_lock()
    reporter.summary(summary)
    if summary.aborted:
        raise_aborted(summary)
    return summary


def raise_aborted(summary: RunSummary) -> None:
    error = RunAborted(
        f"run stopped: {summary.aborted}. Completed rows are kept; rerun the same command "
        "to continue.",
        reason=summary.aborted or "",
    )
    error.summary = summary  # type: ignore[attr-defined]
    raise error


def _summarize(
    plan: _Plan,
    status_counts: tuple[dict[str, int], int],
    run: _Run,
    output: Path,
    fingerprint: str,
    started: float,
) -> RunSummary:
    counts, pending = status_counts
    rep = run.reporter
    summary = RunSummary(
        output=str(output),
        rows_total=sum(len(keys) for keys in plan.unit_keys),
        input_rows=len(plan.keys),
        ok=counts["ok"],
        error=counts["error"],
        invalid=counts["invalid"],
        skipped=counts["skipped"],
        pending=pending,
        resumed=plan.resumed,
        sent=run.sent,
        removed=plan.removed,
        retries=rep.retries,
        deduplicated=run.deduplicated,
        cache_hits=run.cache_hits,
        cost_usd=rep.cost_usd,
        unpriced=rep.unpriced,
        prompt_tokens=rep.prompt_tokens,
        completion_tokens=rep.completion_tokens,
        total_tokens=rep.prompt_tokens + rep.completion_tokens,
        wall_seconds=time.monotonic() - started,
        finish_reasons=dict(rep.finish_reasons),
        error_types=dict(rep.error_types),
        error_messages=rep.common_error_messages(),
        aborted=run.abort_reason,
        fingerprint=fingerprint,
    )
    if summary.aborted and run.abort_kind == "budget":
        summary.exit_code = EXIT_BUDGET
    elif run.storage_error is not None:
        summary.exit_code = EXIT_STORAGE
    elif summary.aborted and run.abort_kind == "retry_later":
        summary.exit_code = EXIT_RETRY_LATER
    elif summary.aborted and run.abort_kind == "interrupted":
        summary.exit_code = EXIT_INTERRUPTED
    elif summary.aborted:
        summary.exit_code = EXIT_ABORTED
    elif summary.error or summary.invalid or summary.pending:
        summary.exit_code = EXIT_FAILED_ROWS
    else:
        summary.exit_code = EXIT_OK
    summary.exit_reason = exit_reason(summary.exit_code)
    return summary


def _come_back_later(exc: RequestError, max_wait: float) -> ServerSaysLater:
    """The error that ends a run whose server asks, again and again, to come back later."""
    asked = exc.retry_after or 0.0
    when = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + asked))
    return ServerSaysLater(
        f"the server answers 429 asking to come back in {asked:g} s (after {when}), "
        f"longer than --max-retry-wait {max_wait:g} s, three times in a row; the rows not "
        "done stay pending. Rerun the same command after that time to resume.",
        status=exc.status,
        retry_after=asked,
    )


def _run_in_new_loop(main: Coroutine[Any, Any, RunSummary]) -> RunSummary:
    """Run on uvloop when it is installed (less CPU per request), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def estimate_job(
    data: Any,
    output: str | Path | None,
    config: RunConfig,
    *,
    typical_completion: int | None = None,
) -> tuple[Estimate, ...]:
    """What ``run`` would send and spend, one estimate per model, without sending anything
    or touching OUTPUT.

    Rows that OUTPUT's checkpoint already has for a model are left out of that model's
    estimate; duplicates (``dedup``) and responses in ``cache`` are counted apart.
    """
    source, builder = open_job(data, config)
    checkpoint = Checkpoint(Path(output)) if output is not None else None
    row_keys = compute_keys(
        source,
        id_column=config.id_column,
        content_columns=builder.columns,
        previous=checkpoint.load_key_pass() if checkpoint is not None else None,
        ids_only=checkpoint is not None and _ids_only_keys(checkpoint, config),
    )
    models = config.all_models
    model_keys = (
        [row_keys.keys] if len(models) == 1 else [model_row_keys(row_keys.keys, m) for m in models]
    )
    done = [np.zeros(len(row_keys), dtype=bool) for _ in models]
    if checkpoint is not None and checkpoint.exists():
        index = checkpoint.load_index()
        for j, mkeys in enumerate(model_keys):
            # a row is done for a model when every one of its samples is
            missing = np.zeros(len(row_keys), dtype=bool)
            for sample in range(config.n):
                missing |= index.lookup(sample_row_keys(mkeys, sample)) < 0
            done[j] = ~missing
    params = config.body_params()
    cache = ResponseCache(config.cache) if config.cache else None

    requests = plan_requests(
        range(config.n),
        n=config.n,
        native=config.n_mode != "seeds",
        base_seed=config.base_seed,
    )

    def cached_for(model: str) -> Callable[[Any], bool] | None:
        """Whether every request of a row to ``model`` is in the cache."""
        if cache is None:
            return None

        def cached(messages: Any) -> bool:
            for request in requests:
                body = build_body(model, list(messages), {**params, **request.params})
                if not cache.contains(cache.key(config.base_url, body)):
                    return False
            return True

        return cached

    estimators = [
        Estimator(
            model=model,
            dedup=config.dedup,
            cached=cached_for(model),
            samples=config.n,
            native=config.n_mode != "seeds",
        )
        for model in models
    ]
    offset = 0
    for batch in source.iter_batches(columns=builder.columns):
        n = batch.num_rows
        for estimator, model_done in zip(estimators, done, strict=True):
            where = np.nonzero(~model_done[offset : offset + n])[0]
            rows = builder.build(batch.take(where), row_keys.keys[offset + where], offset + where)
            estimator.add(row.messages for row in rows)
        offset += n
    prices = PriceTable.load(config.prices)
    results = []
    for estimator, model_done in zip(estimators, done, strict=True):
        result = estimator.result(
            max_tokens=config.max_tokens, prices=prices, typical_completion=typical_completion
        )
        notes = list(result.notes)
        if config.n > 1 and config.n_mode == "auto":
            notes.append(
                f"--n {config.n} with --n-mode auto: counted as one request a row (the API's "
                f"n); a server that ignores n gets {config.n} requests a row, each with the "
                "prompt"
            )
        already = int(model_done.sum())
        if already:
            notes.append(f"{already} rows already done in {output} not counted")
        results.append(dataclasses.replace(result, notes=tuple(notes)))
    return tuple(results)


class RunThread:
    """``run_async`` on its own loop in a worker thread, for callers whose thread already runs
    an event loop (Jupyter, a coroutine): that loop stays free, and the run can still be stopped.

    ``interrupt()``, from any thread, does what SIGINT does to a run on the main thread: the
    first stops sending and gives requests in flight ``grace`` seconds, the next stops at
    once; what is done is kept, OUTPUT is written (after the first) and the lock released,
    and the run raises ``RunAborted``. An interrupt that comes before the run starts sending
    takes effect when it does.
    """

    def __init__(
        self, data: Any, output: str | Path, config: RunConfig, seams: Seams | None = None
    ) -> None:
        self._job = (
            data,
            output,
            config,
            dataclasses.replace(seams or Seams(), signals=self._listen),
        )
        self._guard = threading.Lock()
        self._handler: tuple[asyncio.AbstractEventLoop, Callable[[int], None]] | None = None
        self._waiting = 0  # interrupts that came while no handler listened
        self._on_done: Callable[[], None] | None = None
        self._outcome: RunSummary | BaseException | None = None
        self.interrupts = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._target, name="pipeline-run")

    def start(self, on_done: Callable[[], None] | None = None) -> None:
        """Start the run; ``on_done`` is called from the run's thread when it has ended."""
        self._on_done = on_done
        self.thread.start()

    def _target(self) -> None:
        try:
            self._outcome = _run_in_new_loop(run_async(*self._job))
        except BaseException as exc:  # re-raised by result() in the caller's thread
            self._outcome = exc
        finally:
            self.done.set()
            if self._on_done is not None:
                self._on_done()

    def _listen(self, on_signal: Callable[[int], None]) -> Callable[[], None]:
        # called on the run's loop while it sends (see _Run._install_signals)
        with self._guard:
            self._handler = (asyncio.get_running_loop(), on_signal)
            waiting, self._waiting = min(self._waiting, 2), 0
        for _ in range(waiting):
            on_signal(signal.SIGINT)

        def stop_listening() -> None:
            with self._guard:
                self._handler = None

        return stop_listening

    def interrupt(self) -> None:
        """Stop the run as SIGINT would (see the class docstring); safe from any thread."""
        with self._guard:
            self.interrupts += 1
            handler = self._handler
            if handler is None:
                self._waiting += 1
                return
        loop, on_signal = handler
        with contextlib.suppress(RuntimeError):  # the loop has just closed: the run is over
            loop.call_soon_threadsafe(on_signal, signal.SIGINT)

    def result(self) -> RunSummary:
        """The run's summary once ``done``; raises what the run raised."""
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None, "result() before the run ended"
        return outcome


# The RunThreads that Ctrl-C stops now, and the SIGINT handler to put back after the last.
_interruptible: list[RunThread] = []
_sigint_before: list[Any] = []


def _interrupt_runs(signum: int, frame: Any) -> None:
    for run in list(_interruptible):
        run.interrupt()


@contextlib.contextmanager
def sigint_interrupts(run: RunThread, handle_signals: bool = True) -> Iterator[None]:
    """While the caller waits for ``run``, Ctrl-C (SIGINT) interrupts the run, in place of
    whatever the handler did before (raise, cancel a task): the run stops cleanly and the
    caller raises once it has. Several runs at once are all interrupted; the previous
    handler is back when the last one ends. Main thread only (where signals arrive)."""
    if not handle_signals or threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _interruptible:
        _sigint_before[:] = [signal.getsignal(signal.SIGINT)]
        signal.signal(signal.SIGINT, _interrupt_runs)
    _interruptible.append(run)
    try:
        yield
    finally:
        _interruptible.remove(run)
        if not _interruptible:
            previous = _sigint_before.pop() if _sigint_before else None
            signal.signal(
                signal.SIGINT, previous if previous is not None else signal.default_int_handler
            )


def run_batch(
    data: Any, output: str | Path, config: RunConfig, seams: Seams | None = None
) -> RunSummary:
    """Synchronous wrapper around ``run_async``; works inside a running loop (notebooks) too.

    Inside a running loop the run goes to a ``RunThread`` and this call waits for it; Ctrl-C
    (SIGINT) meanwhile stops it as on the command line (again: at once), and the interrupted
    run raises ``RunAborted`` once it has kept what is done and released OUTPUT's lock.
    """
    try:
        asyncio.get_running_loop()
        in_a_loop = True
    except RuntimeError:
        in_a_loop = False
    if not in_a_loop:
        # outside the except block: run there, every exception of the run would carry
        # "RuntimeError: no running event loop" as its context
        return _run_in_new_loop(run_async(data, output, config, seams))
    run = RunThread(data, output, config, seams)
    run.start()
    with sigint_interrupts(run, seams.handle_signals if seams is not None else True):
        while not run.done.is_set():
            try:
                run.thread.join()
            except KeyboardInterrupt:  # raised by a SIGINT handler we could not replace
                run.interrupt()
    summary = run.result()
    if run.interrupts:  # it came too late to stop the run (OUTPUT was being written)
        raise KeyboardInterrupt(f"interrupted after the run had ended; {output} is complete")
    return summary
