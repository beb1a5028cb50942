"""CSV / Parquet / JSONL (or an in-memory table) -> a stream of Arrow record batches.

Owns file formats, their errors and memory use: nothing here holds the whole file. CSV
columns are read as text (lossless: ``007`` stays ``007``); Parquet keeps its own types and is
read without pre-buffering whole column chunks; JSONL is parsed line by line against one
schema inferred in a first pass, so a column whose type changes half-way does not break the
read. It knows nothing of prompts or requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .csv_scan import first_bad_csv_line, first_non_utf8_line, line_at, unclosed_quote
from .errors import InputError
from .jsonl_schema import json_kind, jsonl_batch, unify_kinds
from .remote_input import is_uri, local_copy, shown

BATCH_ROWS = 8192
# pyarrow's streaming CSV reader parses ahead of its consumer, a handful of blocks: with 1 MiB
# blocks that held ~30 MB while a run wrote OUTPUT, with 256 KiB ~9 MB (and reads faster).
# A row longer than a block makes pyarrow fail ("straddling object"): the block then grows
# 4x, up to CSV_MAX_BLOCK_BYTES, and reading starts again past the rows already given.
CSV_BLOCK_BYTES = 1 << 18
CSV_MAX_BLOCK_BYTES = 1 << 30
FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
FORMATS[".ndjson"] = "jsonl"


def detect_format(path: Path, input_format: str | None) -> str:
    """The input format from ``--input-format`` or the file extension."""
    if input_format:
        return "csv" if input_format == "tsv" else input_format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'. "
            "Use .csv, .tsv, .parquet or .jsonl, or pass --input-format csv|tsv|parquet|jsonl."
        )
    return fmt


@dataclass(frozen=True, slots=True)
class Resume:
    """A row boundary of a file read before: row number ``row`` starts at byte ``byte``."""

    byte: int
    row: int


@dataclass
class InputSource:
    """A table to read in batches: a file, or an Arrow table built from a DataFrame."""

    name: str
    format: str
    path: Path | None = None
    table: pa.Table | None = None
    limit: int | None = None
    delimiter: str | None = None  # CSV: None is "," (tab for .tsv)
    _schema: pa.Schema | None = field(default=None, repr=False)
    _csv_block: int = field(default=CSV_BLOCK_BYTES, repr=False)  # grows for long rows
    _quotes_checked: set[int] = field(default_factory=set, repr=False)  # start bytes

    # -- public -------------------------------------------------------------------------

    def schema(self) -> pa.Schema:
        """Column names and types, in input order."""
        if self._schema is None:
            self._schema = self._read_schema()
        return self._schema

    def iter_batches(
        self, columns: list[str] | None = None, *, start: Resume | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Yield record batches (only ``columns`` if given), at most ``limit`` rows in all.

        ``start`` skips what lies before a row boundary known from an earlier read (CSV
        only; see ``can_resume_at``): reading then begins at that byte, that row.
        """
        remaining = self.limit
        if start is not None:
            if not self.can_resume_at:
                raise ValueError(f"{self.format} input cannot be read from a byte offset")
            if remaining is not None:
                remaining -= start.row
        for batch in self._batches(columns, start.byte if start is not None else 0):
            if remaining is not None:
                if remaining <= 0:
                    return
                if batch.num_rows > remaining:
                    batch = batch.slice(0, remaining)
                remaining -= batch.num_rows
            if batch.num_rows:
                yield batch

    def known_rows(self) -> int | None:
        """How many rows ``iter_batches`` yields, when known without reading them: a
        DataFrame's, or a Parquet file's footer (None for CSV and JSONL)."""
        if self.table is not None:
            rows = self.table.num_rows
        elif self.format == "parquet":
            rows = self._parquet_file().metadata.num_rows
        else:
            return None
        return rows if self.limit is None else min(rows, self.limit)

    @property
    def can_resume_at(self) -> bool:
        """Whether ``iter_batches(start=...)`` works: a CSV file (rows start at known bytes)."""
        return self.format == "csv" and self.path is not None

    # -- per format -----------------------------------------------------------------------

    def _read_schema(self) -> pa.Schema:
        if self.table is not None:
            return self.table.schema
        assert self.path is not None
        if self.format == "parquet":
            return self._parquet_file().schema_arrow
        if self.format == "csv":
            names = self._csv_column_names()
            return pa.schema([(n, pa.string()) for n in names])
        return self._jsonl_schema()

    def _batches(self, columns: list[str] | None, byte: int = 0) -> Iterator[pa.RecordBatch]:
        if self.table is not None:
            table = self.table.select(columns) if columns is not None else self.table
            yield from table.to_batches(max_chunksize=BATCH_ROWS)
            return
        if self.format == "parquet":
            yield from self._parquet_batches(columns)
        elif self.format == "csv":
            yield from self._csv_batches(columns, byte)
        else:
            yield from self._jsonl_batches(columns)

    # Parquet: pre_buffer=False + a bounded read buffer, so that a file written as one
    # huge row group is streamed rather than held whole.
    def _parquet_file(self) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 20)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(
                f"{self.name}: not a readable Parquet file ({exc}). "
                "Check the file, or pass --input-format if the extension is wrong."
            ) from None

    def _parquet_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        pf = self._parquet_file()
        try:
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{self.name}: cannot read Parquet data: {exc}.") from None

    # CSV: every column as text.
    def _csv_column_names(self) -> list[str]:
        assert self.path is not None
        while True:
            try:
                reader = pacsv.open_csv(
                    self.path,
                    read_options=pacsv.ReadOptions(block_size=self._csv_block),
                    convert_options=pacsv.ConvertOptions(
                        column_types={}, strings_can_be_null=True, auto_dict_encode=False
                    ),
                    parse_options=self._csv_parse_options(),
                )
                break
            except pa.ArrowInvalid as exc:
                if not self._grow_csv_block(exc, 0):
                    raise self._csv_error(exc, 0) from None
        names = list(reader.schema.names)
        self._check_last_cell(names[-1], 0)  # a header whose quote never closes
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"{self.name}: duplicate column names in the header: {dupes}.")
        return names

    def _grow_csv_block(self, exc: Exception, byte: int) -> bool:
        """After pyarrow's "straddling object" error (a row longer than a block) in a read
        from ``byte``: a 4x larger block for this and every later read, once every quoted
        cell from ``byte`` on is known to close (else InputError); False when the error is
        another one or the block is at its maximum."""
        if "straddl" not in str(exc) or self._csv_block >= CSV_MAX_BLOCK_BYTES:
            return False
        self._check_quotes_close(byte)
        self._csv_block = min(self._csv_block * 4, CSV_MAX_BLOCK_BYTES)
        return True

    def _check_quotes_close(self, byte: int) -> None:
        """Refuse a CSV with a quoted cell that never closes, scanning from ``byte`` (a row
        boundary); once per source and start."""
        assert self.path is not None
        if byte in self._quotes_checked:
            return
        quote = unclosed_quote(self.path, byte, self._csv_parse_options().delimiter)
        if quote is not None:
            raise self._unclosed_quote_error(quote)
        self._quotes_checked.add(byte)

    def _check_last_cell(self, value: str, byte: int) -> None:
        """Refuse a CSV whose last cell, as pyarrow read it, is a quote that never closes.

        pyarrow reads such a quote without an error when the text after it fits in a block
        (else it fails on the long row, and ``_grow_csv_block`` scans): the cell then holds
        the rest of the file, every row after it included. Then the file ends with a
        delimiter or line end, a quote, and the cell's text written as in a quoted cell
        (quotes doubled), with no closing quote: a test that reads only that tail. It holds
        for no valid file (a valid quoted cell ends with its closing quote) except in a
        rare coincidence, so a full scan confirms it and finds the line.
        """
        assert self.path is not None
        tail = b'"' + value.encode("utf-8", "surrogatepass").replace(b'"', b'""')
        size = self.path.stat().st_size
        if len(tail) > size:
            return
        with self.path.open("rb") as fh:
            fh.seek(max(size - len(tail) - 1, 0))
            end = fh.read()
        if not end.endswith(tail):
            return
        before = end[: len(end) - len(tail)]
        delimiter = self._csv_parse_options().delimiter.encode()
        if before and before not in (delimiter, b"\n", b"\r", b"\xbf"):  # \xbf: end of a BOM
            return
        self._check_quotes_close(byte)

    def _unclosed_quote_error(self, quote: int) -> InputError:
        assert self.path is not None
        line, text = line_at(self.path, quote)
        return InputError(
            f"{self.name}: line {line}: a quoted cell never closes (the quote in "
            f"{text!r} opens a cell that runs to the end of the file, so every row after it "
            "would be read as part of that cell). Close the quote, and write a quote inside a "
            'cell as "" within a quoted cell.'
        )

    def _csv_parse_options(self) -> pacsv.ParseOptions:
        delimiter = self.delimiter or (
            "\t" if self.path is not None and self.path.suffix.lower() == ".tsv" else ","
        )
        return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)

    def _csv_batches(self, columns: list[str] | None, byte: int = 0) -> Iterator[pa.RecordBatch]:
        """Batches of about BATCH_ROWS rows (the reader's are one block each: small)."""
        yield from _rebatched(self._csv_block_batches(columns, byte), BATCH_ROWS)

    def _csv_block_batches(self, columns: list[str] | None, byte: int) -> Iterator[pa.RecordBatch]:
        given = 0  # rows yielded: a read that starts again with a larger block skips them
        while True:
            skip = given
            try:
                for batch in self._csv_read(columns, byte):
                    if skip:
                        if batch.num_rows <= skip:
                            skip -= batch.num_rows
                            continue
                        batch, skip = batch.slice(skip), 0
                    given += batch.num_rows
                    yield batch
                return
            except _LongRow:
                continue  # _csv_read grew the block

    def _csv_read(self, columns: list[str] | None, byte: int) -> Iterator[pa.RecordBatch]:
        assert self.path is not None
        names = self.schema().names
        # from a row boundary past the header: the column names are given, no header read
        read = pacsv.ReadOptions(block_size=self._csv_block, column_names=names if byte else None)
        # the last column is read too: its last cell tells whether a quote never closed
        last = names[-1]
        include = columns if columns is None or last in columns else [*columns, last]
        convert = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            include_columns=include,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            null_values=[],
        )
        if byte and byte >= self.path.stat().st_size:
            return  # nothing after that row
        try:
            stream = pa.OSFile(str(self.path))
            if byte:
                stream.seek(byte)
            with stream:
                reader = pacsv.open_csv(
                    stream,
                    read_options=read,
                    convert_options=convert,
                    parse_options=self._csv_parse_options(),
                )
                last_cell: str | None = None
                for batch in reader:
                    if batch.num_rows:
                        last_cell = batch.column(last)[batch.num_rows - 1].as_py()
                    yield batch if include is columns else batch.select(columns)
        except pa.ArrowInvalid as exc:
            if self._grow_csv_block(exc, byte):
                raise _LongRow from None
            raise self._csv_error(exc, byte) from None
        if last_cell is not None:
            self._check_last_cell(last_cell, byte)

    def _csv_error(self, exc: Exception, byte: int) -> InputError:
        text = str(exc)
        if self.path is not None and ("Expected" in text or "Empty CSV file" in text):
            # a quote that never closes: a short row (in a column before the last), or a
            # header with no end
            quote = unclosed_quote(self.path, byte, self._csv_parse_options().delimiter)
            if quote is not None:
                return self._unclosed_quote_error(quote)
        if "Empty CSV file" in text:
            return InputError(f"{self.name} is empty: a CSV input needs a header row.")
        if "UTF8" in text or "UTF-8" in text:
            where = first_non_utf8_line(self.path) if self.path else None
            at = f" at line {where}" if where else ""
            return InputError(
                f"{self.name}: bytes that are not UTF-8{at}. Re-encode the file as UTF-8 "
                "(for example: iconv -f latin1 -t utf-8 in.csv > out.csv)."
            )
        where = (
            first_bad_csv_line(self.path, self._csv_parse_options().delimiter)
            if (self.path is not None and "Expected" in text)
            else None
        )
        at = f" at line {where}" if where else ""
        return InputError(
            f"{self.name}: malformed CSV{at}: {text}. Check quoting and the number of fields "
            "on that row."
        )

    # JSONL: parsed in Python against a schema inferred over the whole file.
    def _jsonl_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        assert self.path is not None
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(
                        f"{self.name}: line {lineno} has bytes that are not UTF-8. "
                        "Re-encode the file as UTF-8."
                    ) from None
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{self.name}: line {lineno} is not valid JSON ({exc.msg} at column "
                        f"{exc.colno}). Each line must be one JSON object."
                    ) from None
                if not isinstance(row, dict):
                    raise InputError(
                        f"{self.name}: line {lineno} is a JSON {type(row).__name__}, "
                        "not an object. Each line must be one JSON object."
                    )
                yield lineno, row

    def _jsonl_schema(self) -> pa.Schema:
        kinds: dict[str, set[str]] = {}
        rows = 0
        for _, row in self._jsonl_rows():
            rows += 1
            for key, value in row.items():
                kinds.setdefault(key, set()).add(json_kind(value))
        if rows == 0:
            raise InputError(f"{self.name} is empty: no JSON lines.")
        return pa.schema([(name, unify_kinds(k)) for name, k in kinds.items()])

    def _jsonl_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        schema = self.schema()
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        buffer: list[dict[str, Any]] = []
        for _, row in self._jsonl_rows():
            buffer.append(row)
            if len(buffer) >= BATCH_ROWS:
                yield jsonl_batch(buffer, schema)
                buffer = []
        if buffer:
            yield jsonl_batch(buffer, schema)


class _LongRow(Exception):
    """A CSV row was longer than the block; the block has grown, read again."""


def _rebatched(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The same rows, in order, in batches of at least ``rows`` (the last may be smaller)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if batch.num_columns == 0:  # nothing to combine (and combining would lose rows)
            yield batch
            continue
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield from _combined(pending)
            pending, count = [], 0
    if pending:
        yield from _combined(pending)


def _combined(batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    """``batches`` as one batch, or as they are where they do not fit in one (a string
    column over 2 GiB)."""
    if len(batches) == 1:
        return batches
    try:
        chunks = pa.Table.from_batches(batches).combine_chunks().to_batches()
    except pa.ArrowInvalid:
        return batches
    return (
        chunks if sum(c.num_rows for c in chunks) == sum(b.num_rows for b in batches) else (batches)
    )


def delimiter_hint(columns: list[str], delimiter: str | None) -> str:
    """A hint when a CSV header read as one column looks separated by ';' or a tab."""
    if delimiter is not None or len(columns) != 1:
        return ""
    for char, name, option in (
        (";", "';'", "--delimiter ';'"),
        ("\t", "tab", "--delimiter tab (or --input-format tsv)"),
        ("|", "'|'", "--delimiter '|'"),
    ):
        if char in columns[0]:
            return (
                f"The header is one column holding {name} characters: the file looks "
                f"{name}-separated; pass {option}."
            )
    return ""


def open_input(
    source: str | Path | Any,
    *,
    input_format: str | None = None,
    limit: int | None = None,
    delimiter: str | None = None,
) -> InputSource:
    """A path (str/Path), a URI pyarrow's filesystems read (``s3://...``), a pandas
    DataFrame or a pyarrow Table -> InputSource."""
    if isinstance(source, pa.Table):
        return InputSource(name="<table>", format="table", table=source, limit=limit)
    if not isinstance(source, str | Path):
        import pandas as pd

        if isinstance(source, pd.DataFrame):
            bad = [c for c in source.columns if not isinstance(c, str)]
            if bad:
                raise InputError(f"DataFrame column names must be strings; got {bad[:5]}.")
            table = pa.Table.from_pandas(source, preserve_index=False)
            return InputSource(name="<DataFrame>", format="table", table=table, limit=limit)
        raise InputError(
            f"Cannot read input of type {type(source).__name__}: "
            "give a path, a pandas DataFrame or a pyarrow Table."
        )
    name = str(source)
    if is_uri(source):  # s3://, gs://, hdfs://, file://: a local copy (see remote_input)
        name, source = shown(str(source)), local_copy(str(source))
    path = Path(source)
    if not path.exists():
        raise InputError(f"Input file {path} does not exist.")
    if path.is_dir():
        raise InputError(f"Input {path} is a directory; give a .csv, .parquet or .jsonl file.")
    fmt = detect_format(path, input_format)
    if path.stat().st_size == 0:
        raise InputError(f"Input file {path} is empty (0 bytes).")
    if input_format == "tsv" and delimiter is None:
        delimiter = "\t"
    src = InputSource(name=name, format=fmt, path=path, limit=limit, delimiter=delimiter)
    src.schema()  # fail early on a malformed header / file
    return src
