"""Planning: everything decided before the first request, and every usage error found then.

``plan_run`` opens the input and checks the prompt source and the columns the options name,
resolves the API key and proxies, locks OUTPUT's checkpoint, checks its fingerprint, computes
every row's key and finds which (row, model, sample) units still need a result and which of
them are sent (``--dedup`` sends one row per distinct prompt). It sends nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint
from .config import RunConfig
from .credentials import resolve_api_key
from .errors import ConfigError, OutputError
from .fingerprint import FINGERPRINT_DEFAULTS, fingerprint, fingerprint_parts
from .followers import Followers
from .index_join import WindowedPlaces
from .keys import RowKeys, compute_keys
from .memory import release_memory
from .opening import open_job
from .pricing import BATCH_PRICE_FACTOR as BATCH_PRICE_FACTOR
from .pricing import PriceTable
from .prompts import PromptBuilder
from .proxy import ProxySettings, settings_from
from .reader import InputSource, Resume
from .result_index import SUPERSEDED, KeyArray, ResultIndex
from .row_bits import RowBits, RowMask
from .saved_arrays import staged_key_pass
from .shards import Shard
from .todo import Work, marked, what_to_send
from .unit_keys import UnitKeys

DIGEST_KEYS = 1 << 20  # keys read at once for the plan's digest


@dataclass
class Plan:
    """What a run works on, decided before any request."""

    source: InputSource
    builder: PromptBuilder
    checkpoint: Checkpoint
    keys: KeyArray  # per input row
    resume_from: Resume | None  # where reading may start: the rows before need nothing
    models: tuple[str, ...]
    model_keys: Sequence[KeyArray]  # per model: the key of (row, model), i.e. of sample 0
    # per unit u = model * n + sample: the key of (row, model, sample); one unit per model
    # when n == 1
    unit_keys: Sequence[KeyArray]
    pending: int  # units (of the rows in scope) that need a result
    send: RowBits  # [row, unit]: needs a request (needs a result, not a duplicate)
    index: ResultIndex
    prices: PriceTable
    followers: Followers  # under --dedup, the keys of the duplicates that follow a request
    copy_from: np.ndarray  # index positions of done leaders whose duplicates need a copy
    copy_to: np.ndarray  # the duplicates' keys, aligned with copy_from
    resumed: int
    removed: int
    ids_only: bool  # --id-column rows keyed by id alone (a checkpoint of key scheme 1)
    api_key: str | None
    notes: list[str] = field(default_factory=list)
    proxies: ProxySettings = field(default_factory=ProxySettings)
    shard: Shard | None = None  # --shard: the rows of this shard only are sent
    # per row: the key its shard follows (the key of its prompt's first row, so that rows
    # with the same prompt go together), and whether it is this shard's (None: all rows)
    shard_keys: KeyArray | None = None
    shard_rows: RowMask | None = None
    rows: int = -1  # input rows (len(keys) until the keys are let go of)
    units: int = -1  # (model, sample) pairs per row (len(unit_keys) likewise)

    keys_digest: str = ""  # of the row keys in input order: a reordered input is new

    def __post_init__(self) -> None:
        if not self.keys_digest:
            digest = hashlib.blake2b(digest_size=16)
            for start in range(0, len(self.keys), DIGEST_KEYS):
                keys = self.keys[start : start + DIGEST_KEYS]
                digest.update(np.ascontiguousarray(keys, dtype=np.uint64).data)
            self.keys_digest = digest.hexdigest()
        if self.rows < 0:
            self.rows = len(self.keys)
        if self.units < 0:
            self.units = len(self.unit_keys)

    def rows_in_scope(self) -> int:
        """How many input rows this run answers for: its shard's, or every row."""
        return self.rows if self.shard_rows is None else self.shard_rows.count()

    def results_in_scope(self) -> int:
        """How many results this run answers for: its shard's rows', or every row's."""
        return self.rows_in_scope() * self.units

    def read_keys_from(self, recorded: Sequence[KeyArray]) -> None:
        """From now on read the keys from ``keys.npy`` a slice at a time (sending: a batch
        at a time). The row keys become model 0's: with one model they are the same, with
        more each model's key replaces the row's."""
        n = len(recorded) // len(self.models)
        self.unit_keys = recorded
        self.model_keys = tuple(recorded[m * n] for m in range(len(self.models)))
        self.keys = recorded[0]

    def let_go_of_keys(self) -> None:
        """Free the per-row arrays (the send bits) once nothing more is sent."""
        self.keys, self.model_keys, self.unit_keys = np.zeros(0, dtype=np.uint64), (), ()
        self.send = RowBits(0, 0)


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


KEY_SCHEME = 2  # 2: with --id-column a row's key is made of its id and its content


def _ids_only_keys(checkpoint: Checkpoint, config: RunConfig) -> bool:
    """Whether this checkpoint keys --id-column rows by their id alone (made before key
    scheme 2): it keeps that scheme, or every row would be sent again."""
    if config.id_column is None or config.restart:
        return False
    manifest = checkpoint.read_manifest()
    return bool(manifest) and manifest.get("key_scheme", 1) < KEY_SCHEME


def _removed_since_last_run(
    checkpoint: Checkpoint, index: ResultIndex, work: Work, unit_keys: Sequence[KeyArray]
) -> int:
    """Results whose rows left the input since the last run (not those that left before:
    their results stay in the checkpoint, and counting them again said "8 left" for 5):
    the results of the keys the last run recorded that are not this input's, looked up a
    window at a time (none when the keys are the same as the last run's)."""
    # each key's latest result is one that a later one did not supersede; ``found`` of
    # them are this input's
    status, step = index.status, DIGEST_KEYS
    live = sum(
        np.count_nonzero(status[i : i + step] != SUPERSEDED) for i in range(0, len(status), step)
    )
    if int(live) - work.found <= 0:
        return 0  # the usual resume: nothing to compare
    recorded = checkpoint.recorded_keys()
    if recorded is None:
        return int(live) - work.found
    if _same_keys(recorded, unit_keys):
        return 0  # (the results that left did so before the last run)
    removed = 0
    found = WindowedPlaces(index, [recorded], step)  # the index read once
    for start in found.starts():
        at = found.at(start).at[0]
        removed += int((~marked(work.present, at[at != np.iinfo(at.dtype).max])).sum())
    found.close()
    return removed


def _same_keys(recorded: KeyArray, unit_keys: Sequence[KeyArray]) -> bool:
    """Whether ``recorded`` holds ``unit_keys``, one after another (read in slices)."""
    rows = len(unit_keys[0]) if unit_keys else 0
    if len(recorded) != rows * len(unit_keys):
        return False
    for unit, keys in enumerate(unit_keys):
        for start in range(0, rows, DIGEST_KEYS):
            at = unit * rows + start
            here = keys[start : start + DIGEST_KEYS]
            if not np.array_equal(recorded[at : at + len(here)], here):
                return False
    return True


def plan_run(
    data: Any,
    output: Path,
    config: RunConfig,
    environ: dict[str, str] | None,
    *,
    sends: bool = True,
) -> Plan:
    """Everything that can fail before a request is sent (raises UsageError / LockHeld).
    ``sends=False`` (an executor that sends nothing, e.g. an import) needs no API key."""
    source, builder = open_job(data, config)
    api_key = resolve_api_key(config, environ) if sends else None
    proxies = settings_from(config.proxy, os.environ if environ is None else environ)
    proxies.check(config.base_url)
    checkpoint = Checkpoint(output)
    # The key pass reads the whole input: a malformed row, bad bytes or a duplicate id is
    # found here, before the checkpoint is touched and before any request. What an earlier
    # run's pass saw of the same bytes is reused rather than read again.
    ids_only = _ids_only_keys(checkpoint, config)
    row_keys, staged = _run_keys(source, builder, config, checkpoint, ids_only)
    try:
        return _plan(
            source, builder, config, checkpoint, row_keys, ids_only, staged, api_key, proxies
        )
    finally:
        for path in staged:  # not taken in: the run stopped before the checkpoint
            path.unlink(missing_ok=True)


def _run_keys(
    source: InputSource,
    builder: PromptBuilder,
    config: RunConfig,
    checkpoint: Checkpoint,
    ids_only: bool,
) -> tuple[RowKeys, list[Path]]:
    """Every row's keys, in files: a new key pass is written beside OUTPUT (returned, for
    the checkpoint to take in), the rest to unnamed temporary files there."""
    stage = staged_key_pass(checkpoint.output)
    new = False
    try:
        row_keys = compute_keys(
            source,
            id_column=config.id_column,
            content_columns=builder.columns,
            previous=checkpoint.load_key_pass(),
            ids_only=ids_only,
            stage=stage,
        )
        new = row_keys.key_pass is not None and row_keys.key_pass.path == stage
    finally:
        if stage is not None and not new:  # (an earlier pass reused, or bad input found)
            stage.unlink(missing_ok=True)
    release_memory()  # the pass's read buffers and sort temporaries
    return row_keys, [stage] if new and stage is not None else []


def _plan(
    source: InputSource,
    builder: PromptBuilder,
    config: RunConfig,
    checkpoint: Checkpoint,
    row_keys: RowKeys,
    ids_only: bool,
    staged: list[Path],
    api_key: str | None,
    proxies: ProxySettings,
) -> Plan:
    keys = row_keys.keys
    models = config.all_models
    shard = Shard.parse(config.shard) if config.shard else None
    unit_keys: Sequence[KeyArray] = UnitKeys(keys, models, config.n)  # read a slice at a time
    model_keys = [unit_keys[m * config.n] for m in range(len(models))] if shard else []
    prices = PriceTable.load(config.prices)
    for model in models:
        if config.max_cost is not None and prices.price(model) is None:
            raise ConfigError(
                f"--max-cost needs a price for model '{model}', and the price table has "
                "none. Add it in a file given with --prices (see configs/prices.toml), or use "
                "--max-total-tokens."
            )
    _check_output_path(checkpoint.output, config, checkpoint)
    scratch = checkpoint.output.parent if checkpoint.output.parent.is_dir() else None
    shard_keys = row_keys.prompt_keys(scratch) if shard else None
    rows = shard.rows(shard_keys) if shard and shard_keys is not None else None
    index, notes = _open_checkpoint(checkpoint, config, ids_only, staged, shard)
    work = what_to_send(index, row_keys, unit_keys, config, rows)
    copy_from, copy_to = work.copies()
    first_needed = work.send.first_row()
    release_memory()  # the lookups' temporaries
    return Plan(
        source=source,
        builder=builder,
        checkpoint=checkpoint,
        keys=keys,
        resume_from=None if first_needed is None else row_keys.resume_point(first_needed),
        models=models,
        model_keys=model_keys,
        unit_keys=unit_keys,
        pending=work.todo,
        send=work.send,
        index=index,
        prices=prices,
        followers=work.followers(),
        copy_from=copy_from,
        copy_to=copy_to,
        resumed=work.done,
        removed=_removed_since_last_run(checkpoint, index, work, unit_keys),
        ids_only=ids_only,
        api_key=api_key,
        notes=[*notes, *filter(None, [proxies.describe(config.base_url)])],
        proxies=proxies,
        shard=shard,
        shard_keys=shard_keys,
        shard_rows=rows,
    )


def read_plan(data: Any, config: RunConfig, output: Path | None = None) -> Plan:
    """The plan of a run of ``config`` over ``data`` without running it: nothing is locked
    or written, OUTPUT's checkpoint (when given and present) is only read. For exports."""
    source, builder = open_job(data, config)
    checkpoint = Checkpoint(output if output is not None else Path(source.name + ".unused"))
    known = output is not None and checkpoint.exists()
    row_keys = read_keys(source, builder, config, checkpoint if known else None)
    keys = row_keys.keys  # in a file of this plan's own, read a slice at a time
    models = config.all_models
    unit_keys = UnitKeys(keys, models, config.n)
    model_keys = [unit_keys[m * config.n] for m in range(len(models))]
    index = checkpoint.load_index() if known else ResultIndex.empty()
    work = what_to_send(index, row_keys, unit_keys, config)
    copy_from, copy_to = work.copies()
    return Plan(
        source=source,
        builder=builder,
        checkpoint=checkpoint,
        keys=keys,
        resume_from=None,
        models=models,
        model_keys=tuple(model_keys),
        unit_keys=unit_keys,
        pending=work.todo,
        send=work.send,
        index=index,
        prices=PriceTable.load(config.prices),
        followers=work.followers(),
        copy_from=copy_from,
        copy_to=copy_to,
        resumed=work.done,
        removed=0,
        ids_only=False,
        api_key=None,
    )


def read_keys(
    source: InputSource, builder: PromptBuilder, config: RunConfig, checkpoint: Checkpoint | None
) -> RowKeys:
    """The keys of a plan that only reads OUTPUT's checkpoint (an export, an estimate)."""
    return compute_keys(
        source,
        id_column=config.id_column,
        content_columns=builder.columns,
        previous=checkpoint.load_key_pass() if checkpoint is not None else None,
        ids_only=checkpoint is not None and _ids_only_keys(checkpoint, config),
    )


def _open_checkpoint(
    checkpoint: Checkpoint,
    config: RunConfig,
    ids_only: bool,
    staged: list[Path],
    shard: Shard | None = None,
) -> tuple[ResultIndex, list[str]]:
    """Lock the checkpoint (a shard's locks), set it aside on --restart, check its
    fingerprint, take what an earlier run left (rescued parts), take in the input's new key
    pass (``staged``, emptied), load its index."""
    notes: list[str] = []
    note = checkpoint.acquire_lock(shard)
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
            checkpoint.check_fingerprint(fingerprint_parts(config), FINGERPRINT_DEFAULTS)
        notes.extend(checkpoint.prepare(fingerprint(config), spare=staged))
        while staged:
            checkpoint.save_key_pass(staged.pop())
        index = checkpoint.load_index()
        release_memory()
    except BaseException:
        checkpoint.release_lock()
        raise
    return index, notes
