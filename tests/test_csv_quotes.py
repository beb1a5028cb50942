"""A CSV quote that never closes is an error naming its line, whatever the file's size.

pyarrow reads such a quote as one cell holding the rest of the file, rows and all, without
an error when that rest is short. The reader finds it (a tail test on every read, a scan
where a row grows long) and refuses the file; valid files, including quotes inside unquoted
cells (``5" screen``), are read as pyarrow reads them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError
from pipeline.reader import open_input, unclosed_quote


def open_quote_by_hand(data: bytes, delimiter: bytes = b",") -> int | None:
    """Where a cell that never closes opens, one byte at a time (the reference): a quote
    opens a cell at the start of a field only, "" inside is a quote, a lone quote closes."""
    field_start, open_at, i = True, None, 0
    while i < len(data):
        byte = data[i : i + 1]
        if open_at is not None:
            if byte == b'"':
                if data[i + 1 : i + 2] == b'"':
                    i += 2
                    continue
                open_at, field_start = None, False
        elif byte == b'"' and field_start:
            open_at = i
        else:
            field_start = byte in (delimiter, b"\n", b"\r")
        i += 1
    return open_at


def read_all(path: Path, block: int | None = None) -> list[dict[str, str]]:
    source = open_input(path)
    if block is not None:
        source._csv_block = block  # tiny blocks: every row is a long row
    rows: list[dict[str, str]] = []
    for batch in source.iter_batches():
        rows.extend(batch.to_pylist())
    return rows


CSV_BYTES = st.lists(st.sampled_from([b'"', b'"', b",", b"\n", b"\r", b"x", b"y"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b'"', b'"', b",", b"\n", b"\r\n", b"x", b"5"]), max_size=60))
def test_the_scanner_finds_the_quote_that_never_closes_across_chunk_edges(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[bytes]
) -> None:
    data = b"".join(pieces)
    path = tmp_path_factory.mktemp("scan") / "in.csv"
    path.write_bytes(data)
    expected = open_quote_by_hand(data)
    for chunk_bytes in (1, 2, 3, 5, 1 << 20):
        assert unclosed_quote(path, 0, ",", chunk_bytes=chunk_bytes) == expected


@settings(max_examples=300, deadline=None)
@given(CSV_BYTES, st.sampled_from([None, 16]))
def test_any_csv_either_reads_as_pyarrow_reads_it_or_is_refused_for_its_open_quote(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[bytes], block: int | None
) -> None:
    data = b"a,b\n" + b"".join(pieces)
    path = tmp_path_factory.mktemp("csv") / "in.csv"
    path.write_bytes(data)
    open_at = open_quote_by_hand(data)
    try:
        rows = read_all(path, block)
    except InputError as exc:
        if open_at is not None:
            line = data[:open_at].count(b"\n") + 1
            assert f"line {line}: a quoted cell never closes" in str(exc)
        else:
            assert "never closes" not in str(exc)
        return
    assert open_at is None, f"{data!r}: read {rows} although the quote at {open_at} never closes"
    options = pacsv.ParseOptions(newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        strings_can_be_null=False, column_types={"a": "string", "b": "string"}
    )
    assert rows == pacsv.read_csv(path, parse_options=options, convert_options=convert).to_pylist()


def test_a_small_csv_with_an_open_quote_in_the_middle_is_refused_naming_the_line(
    tmp_path: Path,
) -> None:
    """The case from the issue: 1,000 rows, row 6 reads 5,"oops: not 6 rows, the last
    holding rows 6-999."""
    lines = [b"id,prompt"] + [b"%d,row %d" % (i, i) for i in range(1000)]
    lines[6] = b'5,"oops'
    path = tmp_path / "in.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(InputError) as info:
        read_all(path)

    message = str(info.value)
    assert message.startswith(f"{path}: line 7: a quoted cell never closes")
    assert '5,"oops' in message


def test_an_open_quote_in_a_column_before_the_last_is_named_by_its_line(tmp_path: Path) -> None:
    lines = [b"id,prompt,tag"] + [b"%d,row %d,t" % (i, i) for i in range(50)]
    lines[31] = b'30,"oops,t'
    path = tmp_path / "in.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(InputError, match=r"line 32: a quoted cell never closes"):
        read_all(path)


def test_a_header_whose_quote_never_closes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,"prompt\n1,a\n2,b\n')

    with pytest.raises(InputError, match=r"line 1: a quoted cell never closes"):
        open_input(path)


def test_quotes_inside_unquoted_cells_do_not_stop_a_file_with_a_long_row(tmp_path: Path) -> None:
    """A quote inside an unquoted cell (5" screen) is a plain character: a file with one
    such cell is valid, also when another row is longer than a read block (the check
    made there once counted quotes and refused it)."""
    long_text = "word " * 300_000  # 1.5 MB: more than a few 256 KiB blocks
    lines = ["id,prompt", '1,a 5" screen', f'2,"{long_text}"', "3,after"]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    rows = read_all(path)

    assert [r["prompt"] for r in rows] == ['a 5" screen', long_text, "after"]
