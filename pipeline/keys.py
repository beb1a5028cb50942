"""Stable 64-bit row keys, computed in one streaming pass over the input.

A row's key is what ties it to its result across runs. With ``--id-column`` it is a hash of
the id; otherwise a hash of the row's prompt-source content together with its occurrence
number among rows of equal content (the n-th row reading "hello" is ("hello", n)). So rows
appended to the input are the only new keys, and editing a row makes only that row new.
Keys live in one ``uint64`` array (8 bytes a row) so that a million rows cost 8 MB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError
from .reader import InputSource, Resume

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


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads (content ^ occurrence) over all 64 bits."""
    return _mix_in_place(values.astype(np.uint64))


def _mix_in_place(values: np.ndarray) -> np.ndarray:
    """``_mix`` of a uint64 array, computed in it a chunk at a time: no temporary as large
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


def stable_argsort(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, values[order], where a run of equal values starts) with equal values kept in
    their original order, as a stable sort would; ~4x faster than one on 1M random keys.

    numpy's default sort (SIMD quicksort) is not stable, so the members of each run of 2+
    equal values are put back in order afterwards: equal keys are few, so that sorts a
    small subset.
    """
    order = np.argsort(values)
    ordered = values[order]
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    in_run = ~starts
    in_run[:-1] |= ~starts[1:]
    if in_run.any():
        members = np.flatnonzero(in_run)
        order[members] = order[members][np.lexsort((order[members], ordered[members]))]
    return order, ordered, starts


_BUCKET_BITS = 4  # from a million rows, sorted a sixteenth at a time by their hash's top bits
BUCKETED_FROM = 1 << 20


def _repeats(
    hashes: np.ndarray, bucketed_from: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows whose hash an earlier row has (ascending), each one's occurrence number
    among the rows of its hash (1, 2, ...) and the first row of its hash.

    Sparse: a row seen for the first time (most rows) costs nothing past the sort. Equal
    hashes share their top bits, so the rows are grouped a bucket of top bits at a time:
    the sort's 26 bytes a row become ~2 (a pass over a million rows held 49 bytes a row).
    """
    if len(hashes) < max(BUCKETED_FROM if bucketed_from is None else bucketed_from, 1):
        return _repeats_among(hashes)
    top = np.uint64(64 - _BUCKET_BITS)
    pieces = []
    for bucket in range(1 << _BUCKET_BITS):
        rows = np.concatenate(
            [
                start + np.flatnonzero((hashes[start : start + (1 << 16)] >> top) == bucket)
                for start in range(0, len(hashes), 1 << 16)
            ]
        )
        repeats, occurrence, leaders = _repeats_among(hashes[rows])
        pieces.append((rows[repeats], occurrence, rows[leaders]))
    rows = np.concatenate([p[0] for p in pieces])
    by_row = np.argsort(rows)
    return (
        rows[by_row],
        np.concatenate([p[1] for p in pieces])[by_row],
        np.concatenate([p[2] for p in pieces])[by_row],
    )


def _repeats_among(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_repeats`` of ``hashes`` all at once (26 bytes a row at the sort)."""
    order, ordered, starts = stable_argsort(hashes)
    del ordered
    repeats = np.flatnonzero(~starts)  # places in sorted order that are not a group's first
    del starts
    if not len(repeats):
        return repeats, np.zeros(0, dtype=np.uint64), repeats
    # a group's repeats follow its first row in sorted order: each run of consecutive
    # places starts right after that first row
    new_run = np.ones(len(repeats), dtype=bool)
    new_run[1:] = repeats[1:] != repeats[:-1] + 1
    first_place = np.where(new_run, repeats - 1, 0)
    np.maximum.accumulate(first_place, out=first_place)
    occurrence = (repeats - first_place).astype(np.uint64)
    rows, leaders = order[repeats], order[first_place]  # stable: a group's first is its earliest
    del order
    by_row = np.argsort(rows)
    return rows[by_row], occurrence[by_row], leaders[by_row]


@dataclass(frozen=True)
class RowKeys:
    """Per input row, in input order, its key; and the rows that repeat an earlier row's
    prompt (``duplicates``, ascending) with that earlier row, the first with the prompt
    (``leaders``, aligned): ``--dedup`` sends the leader in their place. Sparse, as
    duplicates are few: 8 bytes a row in all, plus 16 a duplicate.
    ``key_pass`` is what a later run may reuse (None for in-memory inputs and ``--limit``);
    ``reused`` says how many leading rows came from the earlier pass without being read.
    """

    keys: np.ndarray
    duplicates: np.ndarray
    leaders: np.ndarray
    key_pass: KeyPass | None = None
    reused: int = 0
    pass_end: Resume | None = None  # where the pass ended, once its arrays are let go

    def __len__(self) -> int:
        return len(self.keys)

    def prompt_keys(self) -> np.ndarray:
        """Per row, the key of the first row with its prompt (its own key for most rows)."""
        keys = self.keys.copy()
        keys[self.duplicates] = self.keys[self.leaders]
        return keys

    def resume_point(self, row: int) -> Resume | None:
        """Where reading may start to reach ``row`` without the rows before the reused end."""
        end = self._pass_end()
        return None if end is None or row < end.row else end

    def _pass_end(self) -> Resume | None:
        kp = self.key_pass
        if kp is None:
            return self.pass_end
        if not kp.ends_with_newline or kp.format != "csv":
            return None
        return Resume(byte=kp.size, row=kp.rows)

    def without_pass(self) -> RowKeys:
        """These keys without the key pass's hash arrays (8 bytes a row; the run saves them
        in its checkpoint first), keeping where the pass ended."""
        return replace(self, key_pass=None, pass_end=self._pass_end())


@dataclass(frozen=True)
class KeyPass:
    """A finished key pass over an input file, kept so that a rerun skips rows it has seen.

    It holds each row's content hash (and id hash) together with what identifies the bytes
    they came from: the file's stat, and the SHA-256 of its content. A rerun reuses it whole
    when the stat is unchanged, or, for CSV, reuses the first ``rows`` rows when the file
    grew and its first ``size`` bytes still hash to ``sha256`` (rows were appended), and
    reads only the appended bytes. Anything else is a full pass.
    """

    params: dict[str, Any]  # what the hashes depend on: format, content and id columns
    stat: dict[str, int]  # size, mtime_ns, ctime_ns, ino
    sha256: str
    ends_with_newline: bool
    content: np.ndarray
    ids: np.ndarray | None

    @property
    def rows(self) -> int:
        return len(self.content)

    @property
    def size(self) -> int:
        return self.stat["size"]

    @property
    def format(self) -> str:
        return str(self.params.get("format"))


_HASH_CHUNK = 1 << 22


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
    keep: Callable[[KeyPass], None] | None = None,
) -> RowKeys:
    """Keys and duplicate groups of every input row.

    A row's key is made from its content (with its occurrence among equal rows), or with
    ``id_column`` from its id and its content: an edited prompt is a new key, so its old
    answer is never taken for the new prompt. ``ids_only`` is the older scheme (the id
    alone), kept for checkpoints made with it.

    ``previous`` is an earlier run's ``KeyPass`` of the same file: what it still describes
    is reused, not read again (see ``KeyPass``). ``keep`` is given the pass (``previous``
    when it was reused whole) as soon as it is complete; the keys are then made in its
    arrays (8 bytes a row, not 16) and the keys returned carry no pass.
    """
    params = {
        "format": source.format,
        "content_columns": list(content_columns),
        "id_column": id_column,
    }
    path = source.path if source.limit is None else None
    stat = _stat(path) if path is not None else None
    head_content: np.ndarray | None = None
    head_ids: np.ndarray | None = None
    start: Resume | None = None
    digest = hashlib.sha256()
    if path is not None and stat is not None and previous is not None:
        if previous.params == params and previous.stat == stat:
            return _row_keys(
                ids_only,
                source,
                id_column,
                previous.content,
                previous.ids,
                previous,
                reused=previous.rows,
                keep=keep,
            )
        if (
            previous.params == params
            and source.can_resume_at
            and previous.ends_with_newline
            and stat["size"] > previous.size
        ):
            _hash_bytes(path, 0, previous.size, digest)
            if digest.hexdigest() == previous.sha256:
                head_content, head_ids = previous.content, previous.ids
                start = Resume(byte=previous.size, row=previous.rows)
            else:
                digest = hashlib.sha256()
    content, ids = _key_pass(source, id_column, content_columns, start)
    if head_content is not None:
        content = np.concatenate([head_content, content])
        if ids is not None and head_ids is not None:
            ids = np.concatenate([head_ids, ids])
    key_pass = None
    if path is not None and stat is not None:
        last = _hash_bytes(path, start.byte if start else 0, stat["size"], digest)
        if _stat(path) == stat:  # not changed while it was read
            key_pass = KeyPass(
                params=params,
                stat=stat,
                sha256=digest.hexdigest(),
                ends_with_newline=last == b"\n",
                content=content,
                ids=ids,
            )
    reused = start.row if start is not None else 0
    return _row_keys(ids_only, source, id_column, content, ids, key_pass, reused=reused, keep=keep)


def _key_pass(
    source: InputSource, id_column: str | None, content_columns: list[str], start: Resume | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Content hashes (and id hashes) of the rows read from ``start`` on."""
    hashed = _hashed_batches(source, id_column, content_columns, start)
    known = source.known_rows() if start is None else None
    if known is None:
        pieces = list(hashed)
        empty = np.zeros(0, dtype=np.uint64)
        content = np.concatenate([c for c, _ in pieces]) if pieces else empty
        if id_column is None:
            return content, None
        return content, np.concatenate([i for _, i in pieces if i is not None] or [empty])
    # the row count is known (Parquet, a DataFrame): filled in place, as joining the
    # pieces would hold every hash twice
    content = np.empty(known, dtype=np.uint64)
    ids = np.empty(known, dtype=np.uint64) if id_column is not None else None
    at = 0
    for batch_content, batch_ids in hashed:
        end = at + len(batch_content)
        if end > known:
            raise InputError(f"{source.name} holds more rows than its footer says; rewrite it.")
        content[at:end] = batch_content
        if ids is not None and batch_ids is not None:
            ids[at:end] = batch_ids
        at = end
    if at != known:
        raise InputError(f"{source.name} holds fewer rows than its footer says; rewrite it.")
    return content, ids


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
    content: np.ndarray,
    ids: np.ndarray | None,
    key_pass: KeyPass | None,
    *,
    reused: int,
    keep: Callable[[KeyPass], None] | None = None,
) -> RowKeys:
    if len(content) == 0:
        empty = np.zeros(0, dtype=np.uint64)
        none = np.zeros(0, dtype=np.int64)
        return RowKeys(keys=empty, duplicates=none, leaders=none, key_pass=key_pass)
    duplicates, occurrence, leaders = _repeats(content)
    if id_column is not None and ids is not None:
        _check_unique_ids(source, id_column, ids)
    done = RowKeys(content, duplicates, leaders, key_pass=key_pass, reused=reused)
    if keep is not None:
        if key_pass is not None:
            keep(key_pass)  # saved: its arrays may become the keys
        done = done.without_pass()
    if id_column is not None and ids is not None and ids_only:
        return replace(done, keys=ids)
    keys = content if keep is not None else content.copy()
    if id_column is None or ids is None:
        keys[duplicates] ^= occurrence * _MIX  # the occurrence of a row seen first is 0
        return replace(done, keys=_mix_in_place(keys))  # _mix(content ^ (occurrence * _MIX))
    keys ^= _ID_AND_CONTENT
    _mix_in_place(keys)
    keys ^= ids
    return replace(done, keys=_mix_in_place(keys))  # _mix(ids ^ _mix(content ^ ...))


def _check_unique_ids(source: InputSource, id_column: str, ids: np.ndarray) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        dup_keys = set(unique[counts > 1].tolist())
        raise InputError(
            f"{source.name}: --id-column '{id_column}' has duplicate ids: "
            f"{_name_ids(source, id_column, ids, dup_keys)}. Ids must be unique; "
            "deduplicate the input or choose another --id-column."
        )


def _name_ids(source: InputSource, id_column: str, keys: np.ndarray, dups: set[int]) -> str:
    names: dict[int, str] = {}
    offset = 0
    for batch in source.iter_batches(columns=[id_column]):
        values = batch.column(0).to_pylist()
        for i, value in enumerate(values):
            key = int(keys[offset + i])
            if key in dups and key not in names:
                names[key] = repr(value)
        offset += batch.num_rows
        if len(names) >= min(len(dups), 10):
            break
    shown = list(names.values())[:10]
    more = f" and {len(dups) - len(shown)} more" if len(dups) > len(shown) else ""
    return ", ".join(shown) + more


def model_row_keys(keys: np.ndarray, model: str) -> np.ndarray:
    """The keys of (row, model) pairs: each row's key mixed with the model's name."""
    digest = hashlib.blake2b(model.encode("utf-8"), digest_size=8).digest()
    return _mix_in_place(keys ^ np.uint64(int.from_bytes(digest, "little")))  # one new array


def sample_row_keys(keys: np.ndarray, sample: int) -> np.ndarray:
    """The keys of sample ``sample`` of the pairs with ``keys``; sample 0 keeps them (K = 1)."""
    if sample == 0:
        return keys
    digest = hashlib.blake2b(f"sample {sample}".encode(), digest_size=8).digest()
    return _mix_in_place(keys ^ np.uint64(int.from_bytes(digest, "little")))
