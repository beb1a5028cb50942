"""Stable 64-bit row keys, computed in one streaming pass over the input.

A row's key is what ties it to its result across runs. With ``--id-column`` it is a hash of
the id; otherwise a hash of the row's prompt-source content together with its occurrence
number among rows of equal content (the n-th row reading "hello" is ("hello", n)). So rows
appended to the input are the only new keys, and editing a row makes only that row new.
Hashes and keys are written to files as they are made and read back a slice at a time
(``array_file.Column``): a pass over 100M rows holds no per-row array.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .array_file import ArrayFile, ArrayWriter, Column, take
from .errors import InputError
from .reader import InputSource, Resume
from .repeats import repeats
from .spill import write_spilled

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _texts(column: pa.Array) -> list[str | None]:
    # Hash the text form so that the same value hashes the same in CSV, Parquet and JSONL.
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        try:
            column = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
    values: list[str | None] = column.to_pylist()
    return values


def _hash_utf8(column: pa.Array) -> np.ndarray | None:
    """The single-column hash straight from Arrow's UTF-8 buffers (no Python strings).

    Same digests as the general path (BLAKE2b of b"s" + the UTF-8 bytes); None when the
    column is not a plain string array without nulls.
    """
    if column.type != pa.string() or column.null_count:
        return None
    _, offsets_buffer, data_buffer = column.buffers()
    start = column.offset
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[start : start + len(column) + 1]
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    bounds = offsets.tolist()
    blake = hashlib.blake2b
    out = np.empty(len(column), dtype=np.uint64)
    for i in range(len(column)):
        h = blake(b"s", digest_size=8)
        h.update(data[bounds[i] : bounds[i + 1]])
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def _hash_batch(batch: pa.RecordBatch) -> np.ndarray:
    """64-bit BLAKE2b of each row's values (null and "" differ; column order matters)."""
    if batch.num_columns == 1:
        fast = _hash_utf8(batch.column(0))
        if fast is not None:
            return fast
    blake = hashlib.blake2b
    columns = [_texts(batch.column(i)) for i in range(batch.num_columns)]
    out = np.empty(batch.num_rows, dtype=np.uint64)
    if len(columns) == 1:
        for i, value in enumerate(columns[0]):
            data = b"\x00" if value is None else b"s" + value.encode("utf-8", "surrogatepass")
            out[i] = int.from_bytes(blake(data, digest_size=8).digest(), "little")
        return out
    for i, values in enumerate(zip(*columns, strict=True)):
        h = blake(digest_size=8)
        for value in values:
            if value is None:
                h.update(b"\x00")
            else:
                encoded = value.encode("utf-8", "surrogatepass")
                h.update(b"s%d:" % len(encoded))
                h.update(encoded)
        out[i] = int.from_bytes(h.digest(), "little")
    return out


_ID_AND_CONTENT = np.uint64(0x6A09E667F3BCC908)  # sets id+content keys apart from the rest


def _mix_in_place(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (it spreads content ^ occurrence over all 64 bits) of a
    uint64 array, computed in it a chunk at a time: no temporary as large
    as the array (six of them held ~400 MB in a planning pass over 10M rows)."""
    shifted = np.empty(min(len(values), 1 << 16), dtype=np.uint64)
    for start in range(0, len(values), 1 << 16):
        z = values[start : start + (1 << 16)]
        tmp = shifted[: len(z)]
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(z, np.uint64(shift), out=tmp)
            z ^= tmp
            z *= np.uint64(factor)
        np.right_shift(z, np.uint64(31), out=tmp)
        z ^= tmp
    return values


@dataclass(frozen=True)
class RowKeys:
    """Per input row, in input order, its key (``keys``: in a file, read in slices); and
    the rows that repeat an earlier row's prompt (``duplicates``, ascending) with that
    earlier row, the first with the prompt (``leaders``, aligned): ``--dedup`` sends the
    leader in their place. Sparse, as duplicates are few: 16 bytes a duplicate in memory.
    ``key_pass`` is what a later run may reuse (None for in-memory inputs and ``--limit``);
    ``reused`` says how many leading rows came from the earlier pass without being read.
    """

    keys: Any  # array_file.Column (or an array)
    duplicates: np.ndarray
    leaders: np.ndarray
    key_pass: KeyPass | None = None
    reused: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def prompt_keys(self, scratch: Path | None = None) -> Column:
        """Per row, the key of the first row with its prompt (its own key for most rows),
        written to an unnamed file in ``scratch`` a chunk at a time (a shard's)."""

        def fill(writer: ArrayWriter) -> dict[str, Any]:
            writer.declare("keys", np.uint64)
            for start in range(0, len(self.keys), CHUNK):
                keys = np.array(self.keys[start : start + CHUNK], dtype=np.uint64)
                lo, hi = np.searchsorted(self.duplicates, [start, start + len(keys)])
                keys[self.duplicates[lo:hi] - start] = take(self.keys, self.leaders[lo:hi])
                writer.append("keys", keys)
            return {}

        return Column(write_spilled(fill, None, scratch), "keys")

    def resume_point(self, row: int) -> Resume | None:
        """Where reading may start to reach ``row`` without the rows before the reused end."""
        kp = self.key_pass
        if kp is None or not kp.ends_with_newline or kp.format != "csv" or row < kp.rows:
            return None
        return Resume(byte=kp.size, row=kp.rows)


@dataclass(frozen=True)
class KeyPass:
    """A finished key pass over an input file, kept so that a rerun skips rows it has seen.

    It holds each row's content hash (and id hash) together with what identifies the bytes
    they came from: the file's stat, and the SHA-256 of its content. A rerun reuses it whole
    when the stat is unchanged, or, for CSV, reuses the first ``rows`` rows when the file
    grew and its first ``size`` bytes still hash to ``sha256`` (rows were appended), and
    reads only the appended bytes. Anything else is a full pass. The hashes are columns of
    an array file (``array_file.Column``), read in slices; ``path`` is the file this run
    wrote them to (staged beside OUTPUT, for the checkpoint to take in), if any.
    """

    params: dict[str, Any]  # what the hashes depend on: format, content and id columns
    stat: dict[str, int]  # size, mtime_ns, ctime_ns, ino
    sha256: str
    ends_with_newline: bool
    content: Any  # array_file.Column (or an array)
    ids: Any
    path: Path | None = None

    @property
    def rows(self) -> int:
        return len(self.content)

    @property
    def size(self) -> int:
        return self.stat["size"]

    @property
    def format(self) -> str:
        return str(self.params.get("format"))

    def meta(self) -> dict[str, Any]:
        """What the pass's file says about it, beside its hashes."""
        return {"version": KEY_PASS_VERSION, **{name: getattr(self, name) for name in _META}}

    @classmethod
    def of(cls, file: ArrayFile) -> KeyPass | None:
        """The pass in ``file`` (None when it holds hashes that are not a reusable pass)."""
        meta = file.meta
        names = file.names()
        if meta.get("version") != KEY_PASS_VERSION or "content" not in names:
            return None
        ids = Column(file, "ids") if "ids" in names else None
        content = Column(file, "content")
        if ids is not None and len(ids) != len(content):
            return None
        if any(name not in meta for name in _META):
            return None
        return cls(**{name: meta[name] for name in _META}, content=content, ids=ids, path=file.path)


KEY_PASS_VERSION = 2  # 2: an array file (1: an .npz, read whole)
_META = ("params", "stat", "sha256", "ends_with_newline")  # a pass's, in its file's footer
_HASH_CHUNK = 1 << 22
CHUNK = 1 << 18  # rows of keys made at once


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
    }


def _hash_bytes(path: Path, start: int, end: int, h: Any) -> bytes:
    """Feed bytes [start, end) of ``path`` to ``h``; returns the last byte read (or b"")."""
    last = b""
    with path.open("rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            chunk = fh.read(min(_HASH_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            last = chunk[-1:]
            left -= len(chunk)
    return last


def compute_keys(
    source: InputSource,
    *,
    id_column: str | None,
    content_columns: list[str],
    previous: KeyPass | None = None,
    ids_only: bool = False,
    stage: Path | None = None,
    scratch: Path | None = None,
) -> RowKeys:
    """Keys and duplicate groups of every input row, in memory that does not grow with
    the rows: the hashes are written to a file as they are made, the duplicates found a
    bucket at a time (``repeats``), and the keys written to an unnamed file and read back
    in slices.

    A row's key is made from its content (with its occurrence among equal rows), or with
    ``id_column`` from its id and its content: an edited prompt is a new key, so its old
    answer is never taken for the new prompt. ``ids_only`` is the older scheme (the id
    alone), kept for checkpoints made with it.

    ``previous`` is an earlier run's ``KeyPass`` of the same file: what it still describes
    is reused, not read again (see ``KeyPass``). A new pass is written at ``stage`` (the
    run takes it into its checkpoint: ``KeyPass.path``), else to an unnamed file; the
    temporary files go to ``scratch`` (beside ``stage``, or $TMPDIR, when None).
    """
    params = {
        "format": source.format,
        "content_columns": list(content_columns),
        "id_column": id_column,
    }
    path = source.path if source.limit is None else None
    stat = _stat(path) if path is not None else None
    scratch = stage.parent if scratch is None and stage is not None else scratch
    head: KeyPass | None = None
    digest = hashlib.sha256()
    if path is not None and stat is not None and previous is not None:
        if previous.params == params and previous.stat == stat:
            return _row_keys(ids_only, source, id_column, previous, previous.rows, scratch)
        if (
            previous.params == params
            and source.can_resume_at
            and previous.ends_with_newline
            and stat["size"] > previous.size
        ):
            _hash_bytes(path, 0, previous.size, digest)
            if digest.hexdigest() == previous.sha256:
                head = previous
            else:
                digest = hashlib.sha256()
    start = Resume(byte=head.size, row=head.rows) if head is not None else None

    def fill(writer: ArrayWriter) -> dict[str, Any]:
        writer.declare("content", np.uint64)
        if id_column is not None:
            writer.declare("ids", np.uint64)
        if head is not None:
            _copy_pass(head, writer)
        _key_pass(source, id_column, content_columns, start, writer)
        if path is None or stat is None:
            return {}
        h = digest.copy()  # (filled again in memory when the disk is full)
        last = _hash_bytes(path, start.byte if start else 0, stat["size"], h)
        if _stat(path) != stat:  # changed while it was read: not a pass to reuse
            return {}
        return KeyPass(params, stat, h.hexdigest(), last == b"\n", None, None).meta()

    file = write_spilled(fill, stage if path is not None else None, scratch)
    key_pass = KeyPass.of(file)
    content = Column(file, "content")
    ids = Column(file, "ids") if id_column is not None else None
    if key_pass is None and file.path is not None:
        file.path.unlink(missing_ok=True)  # not a pass to keep (the file stays readable)
    reused = start.row if start is not None else 0
    if key_pass is None:
        return _row_keys(ids_only, source, id_column, (content, ids), reused, scratch, None)
    return _row_keys(ids_only, source, id_column, key_pass, reused, scratch)


def _copy_pass(head: KeyPass, writer: ArrayWriter) -> None:
    """The earlier pass's hashes, copied a chunk at a time: the head of the new pass."""
    for start in range(0, head.rows, CHUNK):
        writer.append("content", head.content[start : start + CHUNK])
        if head.ids is not None:
            writer.append("ids", head.ids[start : start + CHUNK])


def _key_pass(
    source: InputSource,
    id_column: str | None,
    content_columns: list[str],
    start: Resume | None,
    writer: ArrayWriter,
) -> None:
    """Write the content hashes (and id hashes) of the rows read from ``start`` on."""
    known = source.known_rows() if start is None else None
    rows = 0
    for content, ids in _hashed_batches(source, id_column, content_columns, start):
        rows += len(content)
        if known is not None and rows > known:
            raise InputError(f"{source.name} holds more rows than its footer says; rewrite it.")
        writer.append("content", content)
        if ids is not None:
            writer.append("ids", ids)
    if known is not None and rows != known:
        raise InputError(f"{source.name} holds fewer rows than its footer says; rewrite it.")


def _hashed_batches(
    source: InputSource, id_column: str | None, content_columns: list[str], start: Resume | None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(content hashes, id hashes or None) of each batch read from ``start`` on."""
    # CSV: read every column so that bad bytes anywhere are found now, not at output time
    wanted = [*content_columns, *([id_column] if id_column else [])]
    read = None if source.format == "csv" else list(dict.fromkeys(wanted))
    offset = start.row if start is not None else 0
    for batch in source.iter_batches(columns=read, start=start):
        ids = None
        if id_column is not None:
            column = batch.column(id_column)
            if column.null_count:
                first_null = offset + column.is_null().to_pylist().index(True)
                raise InputError(
                    f"{source.name}: --id-column '{id_column}' is empty on data row "
                    f"{first_null + 1}. Every row needs an id; fill it in or drop --id-column."
                )
            ids = _hash_batch(batch.select([id_column]))
        offset += batch.num_rows
        yield _hash_batch(batch.select(content_columns)), ids


def _row_keys(
    ids_only: bool,
    source: InputSource,
    id_column: str | None,
    hashes: KeyPass | tuple[Any, Any],
    reused: int,
    scratch: Path | None,
    key_pass: KeyPass | None = None,
) -> RowKeys:
    """The keys of the rows with ``hashes`` (a pass, or (content, ids) columns)."""
    if isinstance(hashes, KeyPass):
        key_pass, (content, ids) = hashes, (hashes.content, hashes.ids)
    else:
        content, ids = hashes
    if id_column is None:
        ids = None
    none = np.zeros(0, dtype=np.int64)
    if len(content) == 0:
        return RowKeys(np.zeros(0, dtype=np.uint64), none, none, key_pass)
    duplicates, occurrence, leaders = repeats(content, scratch)
    if id_column is not None and ids is not None:
        _check_unique_ids(source, id_column, ids, scratch)
        if ids_only:
            return RowKeys(ids, duplicates, leaders, key_pass, reused)

    def fill(writer: ArrayWriter) -> dict[str, Any]:
        writer.declare("keys", np.uint64)
        for start in range(0, len(content), CHUNK):
            keys = np.array(content[start : start + CHUNK], dtype=np.uint64)
            if ids is None:  # mix(content ^ (occurrence * _MIX)); a first row's is 0
                lo, hi = np.searchsorted(duplicates, [start, start + len(keys)])
                keys[duplicates[lo:hi] - start] ^= occurrence[lo:hi].astype(np.uint64) * _MIX
            else:  # mix(ids ^ mix(content ^ _ID_AND_CONTENT))
                keys ^= _ID_AND_CONTENT
                _mix_in_place(keys)
                keys ^= ids[start : start + CHUNK]
            writer.append("keys", _mix_in_place(keys))
        return {}

    keys = Column(write_spilled(fill, None, scratch), "keys")
    return RowKeys(keys, duplicates, leaders, key_pass, reused)


def _check_unique_ids(source: InputSource, id_column: str, ids: Any, scratch: Path | None) -> None:
    repeated, _, _ = repeats(ids, scratch)
    if len(repeated):
        dup_keys = set(take(ids, repeated).tolist())
        raise InputError(
            f"{source.name}: --id-column '{id_column}' has duplicate ids: "
            f"{_name_ids(source, id_column, ids, dup_keys)}. Ids must be unique; "
            "deduplicate the input or choose another --id-column."
        )


def _name_ids(source: InputSource, id_column: str, keys: Any, dups: set[int]) -> str:
    names: dict[int, str] = {}
    offset = 0
    for batch in source.iter_batches(columns=[id_column]):
        values = batch.column(0).to_pylist()
        here = keys[offset : offset + batch.num_rows]
        for i, value in enumerate(values):
            key = int(here[i])
            if key in dups and key not in names:
                names[key] = repr(value)
        offset += batch.num_rows
        if len(names) >= min(len(dups), 10):
            break
    shown = list(names.values())[:10]
    more = f" and {len(dups) - len(shown)} more" if len(dups) > len(shown) else ""
    return ", ".join(shown) + more


def key_salt(text: str) -> np.uint64:
    """What a model's name or a sample's number mixes into the keys of its units."""
    return np.uint64(
        int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    )


def salted(keys: np.ndarray, salt: np.uint64) -> np.ndarray:
    """``keys`` mixed with ``salt``, in place (a uint64 array of the caller's)."""
    keys ^= salt
    return _mix_in_place(keys)
