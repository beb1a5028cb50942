"""Final assembly: every input row, in input order, joined with its result, into one Parquet.

Streams the input again batch by batch and takes each row's result from where
``PlacesByWindow`` says it is (a checkpoint part and row, found a window of rows at a time), so
memory holds one input batch and a few checkpoint parts at a time, never the whole output.
Rows without a result yet get ``status = "pending"``. The file is written under a temporary
name, fsynced and renamed over OUTPUT: a failure here leaves the previous OUTPUT untouched.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from .checkpoint import Checkpoint, file_signature
from .config import RunConfig
from .index_join import PlacesByWindow
from .labels import load_labels, match_label
from .memory import release_memory
from .reader import InputSource
from .records import MODELS_METADATA_KEY, WIDE_SEPARATOR
from .samples import (
    PER_SAMPLE_RESULTS,
    SAMPLE_COLUMN,
    fold_samples,
    list_fields,
    stack_samples,
)
from .schema import RESULT_SCHEMA
from .scoring import make_scorer
from .structured import (
    answer_columns,
    load_schema,
    parse_answer,
    schema_columns,
)

PART_CACHE = 8
# OUTPUT's row groups: batches are gathered up to this many rows or bytes. The Parquet
# writer holds ~15 KB of metadata a row group until the file is closed: a row group per
# 8,192-row batch held 19 MB at 10M rows, 190 MB at 100M
ROW_GROUP_ROWS = 1 << 17
ROW_GROUP_BYTES = 16 << 20


class _PartCache:
    """The few most recently used checkpoint parts (results arrive roughly in input order)."""

    def __init__(self, checkpoint: Checkpoint, size: int = PART_CACHE) -> None:
        self.checkpoint = checkpoint
        self.size = size
        self.tables: OrderedDict[int, pa.Table] = OrderedDict()

    def get(self, number: int) -> pa.Table:
        table = self.tables.get(number)
        if table is None:
            table = self.checkpoint.read_part(number).drop(["key"])
            self.tables[number] = table
            if len(self.tables) > self.size:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(number)
        return table


def _pending(n: int) -> pa.Table:
    arrays = [
        pa.array(["pending"] * n, pa.string()) if f.name == "status" else pa.nulls(n, f.type)
        for f in RESULT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


def results_for(part_of: np.ndarray, row_of: np.ndarray, parts: _PartCache) -> pa.Table:
    """The result columns of one batch's rows whose results are at ``part_of`` / ``row_of``
    (part -1: no result yet, "pending"), in the same order."""
    pieces: list[pa.Table] = []
    placed: list[np.ndarray] = []
    have = part_of >= 0
    if have.any():
        rows_at = np.flatnonzero(have)
        in_part, at_row = part_of[have], row_of[have]
        for number in np.unique(in_part):
            mask = in_part == number
            pieces.append(parts.get(int(number)).take(pa.array(at_row[mask])))
            placed.append(rows_at[mask])
    missing = np.flatnonzero(~have)
    if len(missing):
        pieces.append(_pending(len(missing)))
        placed.append(missing)
    if not pieces:
        return _pending(0)
    combined = pa.concat_tables(pieces)
    where = np.concatenate(placed)
    inverse = np.empty_like(where)
    inverse[where] = np.arange(len(where))
    return combined.take(pa.array(inverse))


@dataclass(frozen=True)
class OutputSpec:
    """The shape of OUTPUT beyond the input and result columns.

    ``models``: with one model OUTPUT has one row per input row; with several, one row per
    (input row, model) and a ``model`` column, or with ``wide`` one row per input row and the result
    columns of each model as a group ``{model}__{column}``. ``schema`` / ``labels`` add the
    answer's typed columns / a ``label`` column, parsed from each ``ok`` row's completion;
    ``scorer`` with ``expected_column`` adds a ``score`` column. These derived columns are
    computed here, from the stored completion, so a new ``--score`` needs no new request.

    ``n`` samples per (row, model), whose results ``write_output`` finds in its
    ``PlacesByWindow`` at unit ``model * n + sample``: with ``samples``
    "long" each becomes its own OUTPUT row with a ``sample`` column (after ``model``), in
    order row, model, sample; with "list" they fold into one row whose per-sample columns
    (completion, finish_reason and the derived ones) are lists (see
    ``samples.fold_samples``).
    """

    models: tuple[str, ...]
    wide: bool = False
    schema: dict[str, Any] | None = None
    schema_prefix: str = ""
    labels: tuple[str, ...] | None = None
    scorer: Callable[[str | None, Any], float | None] | None = None
    expected_column: str | None = None
    n: int = 1
    samples: str = "list"

    @property
    def long_samples(self) -> bool:
        return self.n > 1 and self.samples == "long"

    def per_sample(self) -> set[str]:
        """The columns that are lists in the list layout."""
        return {*PER_SAMPLE_RESULTS, *(f.name for f in self.derived_fields())}

    def derived_fields(self) -> list[pa.Field]:
        fields: list[pa.Field] = []
        if self.schema is not None:
            fields += [pa.field(n, t) for n, t in schema_columns(self.schema, self.schema_prefix)]
        if self.labels is not None:
            fields.append(pa.field("label", pa.string()))
        if self.scorer is not None:
            fields.append(pa.field("score", pa.float64()))
        return fields

    def schema_for(self, input_schema: pa.Schema) -> pa.Schema:
        per_model = [*RESULT_SCHEMA, *self.derived_fields()]
        if self.n > 1 and not self.long_samples:
            per_model = list_fields(per_model, self.per_sample())
        base = list(input_schema.remove_metadata())
        if self.long_samples:
            base.append(pa.field(SAMPLE_COLUMN, pa.int64()))
        if len(self.models) == 1:
            fields = [*base, *per_model]
        elif self.wide:
            fields = base + [
                pa.field(f"{m}{WIDE_SEPARATOR}{f.name}", f.type)
                for m in self.models
                for f in per_model
            ]
        else:
            inputs = base[:-1] if self.long_samples else base
            model = pa.field("model", pa.string())
            fields = [*inputs, model, *base[len(inputs) :], *per_model]
        metadata = {MODELS_METADATA_KEY: json.dumps(list(self.models)).encode()}
        return pa.schema(fields, metadata=metadata)

    def results(
        self,
        places: PlacesByWindow,
        model: int,
        rows: slice,
        parts: _PartCache,
        expected: list[Any] | None,
    ) -> pa.Table:
        """Model number ``model``'s result columns (derived ones included) for one batch's
        ``rows``: one row per input row, or per (input row, sample) in the long layout."""
        tables = []
        for sample in range(self.n):
            unit = model * self.n + sample
            results = results_for(*places.locate(unit, rows), parts)
            derived = self.derived(results, expected)
            if derived:
                names = [*results.column_names, *(f.name for f in self.derived_fields())]
                results = pa.Table.from_arrays([*results.columns, *derived], names=names)
            tables.append(results)
        if self.n == 1:
            return tables[0]
        if self.long_samples:
            return stack_samples(tables)
        return fold_samples(tables, self.per_sample())

    def derived(self, results: pa.Table, expected: list[Any] | None) -> list[pa.Array]:
        """The derived columns for one model's results of one batch."""
        fields = self.derived_fields()
        if not fields:
            return []
        texts = results.column("completion").to_pylist()
        status = results.column("status").to_pylist()
        finish = results.column("finish_reason").to_pylist()
        columns: dict[str, list[Any]] = {f.name: [] for f in fields}
        for i, text in enumerate(texts):
            ok = status[i] == "ok"
            answer = text
            if self.schema is not None:
                values = (
                    answer_columns(
                        parse_answer(text, self.schema, finish_reason=finish[i]),
                        self.schema,
                        self.schema_prefix,
                    )
                    if ok
                    else {}
                )
                for name, _ in schema_columns(self.schema, self.schema_prefix):
                    columns[name].append(values.get(name))
            if self.labels is not None:
                label = match_label(text, self.labels) if ok else None
                columns["label"].append(label)
                answer = label
            if self.scorer is not None:
                value = expected[i] if expected is not None else None
                columns["score"].append(self.scorer(answer, value) if ok else None)
        return [pa.array(columns[f.name], type=f.type) for f in fields]


def write_output(
    source: InputSource,
    spec: OutputSpec,
    places: PlacesByWindow,
    checkpoint: Checkpoint,
    output: Path,
    before_replace: Callable[[dict[str, int] | None], None] | None = None,
) -> None:
    """Write OUTPUT atomically: input columns in input order + result columns (see OutputSpec).

    ``places`` has the (part, row) of each input row's result per unit, model * n +
    sample, aligned with the input. ``before_replace`` gets the new file's signature just
    before it replaces OUTPUT (the rename keeps size and mtime), so that the caller can
    record it first.
    """
    schema = spec.schema_for(source.schema())
    parts = _PartCache(checkpoint)
    offset = 0
    models = spec.models
    hook = None if before_replace is None else lambda tmp: before_replace(file_signature(tmp))
    with (
        atomic_write(output, before_replace=hook) as tmp,
        pq.ParquetWriter(tmp, schema, compression="zstd") as parquet,
    ):
        writer = _RowGroups(parquet)
        for batch in source.iter_batches():
            if offset:
                # each batch's temporaries (parts read, takes, encoders: ~15 MB) stay
                # with the allocators when freed: hand them back, keep the footprint
                # flat (measured on 1M CSV rows: peak 269 -> 253 MB for +0.7 s)
                release_memory()
            n = batch.num_rows
            expected = (
                batch.column(spec.expected_column).to_pylist()
                if spec.expected_column is not None
                else None
            )
            rows = slice(offset, offset + n)
            groups = [
                spec.results(places, m, rows, parts, expected).columns for m in range(len(models))
            ]
            offset += n
            inputs: list[Any] = list(batch.columns)
            per_row = spec.n if spec.long_samples else 1
            if per_row > 1:
                # each input row once per sample, then the sample number
                repeat = pa.array(np.repeat(np.arange(n), per_row))
                inputs = [column.take(repeat) for column in inputs]
                inputs.append(pa.array(np.tile(np.arange(per_row, dtype=np.int64), n)))
            if len(models) == 1:
                columns = [*inputs, *groups[0]]
                out = _table(columns, schema)
            elif spec.wide:
                out = _table(inputs + [c for g in groups for c in g], schema)
            else:
                # one row per (input row, model[, sample]), row-major
                lead, tail = (inputs[:-1], inputs[-1:]) if per_row > 1 else (inputs, [])
                rows = n * per_row
                pieces = [
                    _table([*lead, pa.array([m] * rows, pa.string()), *tail, *g], schema)
                    for m, g in zip(models, groups, strict=True)
                ]
                stacked = pa.concat_tables(pieces)
                order = np.arange(rows * len(models)).reshape(len(models), n, per_row)
                out = stacked.take(pa.array(order.transpose(1, 0, 2).ravel()))
            writer.add(out)
        writer.flush()


class _RowGroups:
    """Tables written as row groups of up to ``ROW_GROUP_ROWS`` rows or
    ``ROW_GROUP_BYTES`` bytes, gathered until then."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer = writer
        self.held: list[pa.Table] = []
        self.rows = self.bytes = 0

    def add(self, table: pa.Table) -> None:
        self.held.append(table)
        self.rows += table.num_rows
        self.bytes += table.nbytes
        if self.rows >= ROW_GROUP_ROWS or self.bytes >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.held:
            table = pa.concat_tables(self.held)
            self.held, self.rows, self.bytes = [], 0, 0
            self.writer.write_table(table, row_group_size=max(1, table.num_rows))


def _table(columns: list[Any], schema: pa.Schema) -> pa.Table:
    arrays = [c if isinstance(c, pa.ChunkedArray) else pa.chunked_array([c]) for c in columns]
    return pa.Table.from_arrays(arrays, names=schema.names).cast(schema)


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
