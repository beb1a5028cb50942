"""Scanning a CSV file's bytes for what Arrow's parser reports badly.

Owns finding an unclosed quote (where the field that swallows the rest of the file opens),
the line and text at a byte offset, the first line Python's csv module rejects and the
first line that is not UTF-8. It does not read the input into batches or build the errors
shown to the user (pipeline.reader does both).
"""

from __future__ import annotations

import re
from pathlib import Path

# A quoted cell in CSV as pyarrow reads it (RFC 4180): a quote opens a cell only as the first
# character of a field (at the start of a line or after a delimiter; elsewhere it is a plain
# character, as in 5" screen); inside, "" is a quote and a single quote closes the cell (what
# follows it up to the delimiter is plain text). The scanner below follows this with regular
# expressions, so that its loops run in C: one findall per chunk of the file.

_QUOTE_SCAN_BYTES = 1 << 24


def _quote_patterns(delimiter: str) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """A quoted cell (group 1: its closing quote, or empty where the text scanned ends
    first), and the rest of a quoted cell already open, up to its closing quote."""
    field_start = rb"(?<![^" + re.escape(delimiter.encode()) + rb"\r\n])"
    inside = rb'[^"]*+(?:""[^"]*+)*+'  # possessive: a "" is never split to close the cell
    return re.compile(field_start + rb'"' + inside + rb'("|\Z)'), re.compile(inside + rb'"')


def unclosed_quote(
    path: Path, start: int = 0, delimiter: str = ",", *, chunk_bytes: int = _QUOTE_SCAN_BYTES
) -> int | None:
    """The byte offset of the quote that opens a cell and never closes in the CSV file
    ``path``, read from ``start`` (a row boundary); None when every quoted cell closes.

    Reads ``chunk_bytes`` at a time. A chunk is scanned up to its last byte that is not a
    quote (a quote there may pair with the next chunk's first); a cell still open at that
    point is followed into the next chunks by its own pattern.
    """
    cell, rest = _quote_patterns(delimiter)
    with path.open("rb") as fh:
        fh.seek(start)
        if start == 0 and fh.read(3) != b"\xef\xbb\xbf":  # a UTF-8 BOM is not text
            fh.seek(0)
        base = fh.tell() - 1  # the file offset of buf[0]
        buf = b"\n"  # the byte before: a row boundary, so the next byte starts a field
        open_at: int | None = None  # a quote whose cell is still open at the end of buf
        while True:
            data = fh.read(chunk_bytes)
            at_end = not data
            buf += data
            cut = len(buf)
            if not at_end:
                while cut > 1 and buf[cut - 1] == 0x22:  # hold back trailing quotes
                    cut -= 1
            pos = 1
            if open_at is not None:
                closed = rest.match(buf, pos, cut)
                if closed is not None:
                    pos, open_at = closed.end(), None
            if open_at is None:
                ends = cell.findall(buf, pos, cut)
                if ends and ends[-1] == b"":  # the last quoted cell is open at the cut
                    open_at = base + _last_odd_quote_run(buf, pos, cut)
            if at_end:
                return open_at
            buf = buf[cut - 1 :]
            base += cut - 1


def _last_odd_quote_run(buf: bytes, lo: int, hi: int) -> int:
    """Where the last run of an odd number of quotes in ``buf[lo:hi]`` starts.

    When a quoted cell is still open at ``hi``, that is its opening quote: the runs inside
    the cell are "" pairs (an odd run would close it), and the opening quote with the pairs
    right after it is an odd run.
    """
    end = hi
    while True:
        last = buf.rfind(b'"', lo, end)
        if last < 0:
            raise ValueError("no odd run of quotes")
        first = last
        while first > lo and buf[first - 1] == 0x22:
            first -= 1
        if (last + 1 - first) % 2:
            return first
        end = first


def line_at(path: Path, offset: int) -> tuple[int, str]:
    """The line number of byte ``offset`` and the start of that line (up to 60 characters)."""
    lines = 1
    line_start = 0
    with path.open("rb") as fh:
        done = 0
        while done < offset:
            data = fh.read(min(1 << 22, offset - done))
            if not data:
                break
            lines += data.count(b"\n")
            newline = data.rfind(b"\n")
            if newline >= 0:
                line_start = done + newline + 1
            done += len(data)
        fh.seek(line_start)
        text = fh.read(min(offset - line_start + 40, 240)).split(b"\n")[0].rstrip(b"\r")
    shown = text.decode("utf-8", "replace")
    return lines, shown if len(shown) <= 60 else shown[:57] + "..."


def first_bad_csv_line(path: Path, delimiter: str) -> int | None:
    """The line where the first record with the wrong number of fields ends (slow path)."""
    import csv

    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return None
        for record in reader:
            if record and len(record) != len(header):
                return reader.line_num
    return None


def first_non_utf8_line(path: Path) -> int | None:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None
