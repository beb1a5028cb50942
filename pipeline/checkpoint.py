"""Crash-safe checkpoints beside OUTPUT: what is done, and resuming from it.

Layout of ``OUTPUT.checkpoint/``::

    manifest.json        fingerprint (and its parts), config, input, row count, output signature
    lock                 flock()ed by the live run; holds its pid and host
    parts/part-NNNNNN-CCCCCCCC.parquet   results as they complete: key + result columns;
                         CCCCCCCC is the CRC-32 of the file's bytes, and the Parquet
                         metadata names the job (fingerprint, job id). Older parts are
                         named part-NNNNNN.parquet and carry neither.
    quarantine/          parts found damaged (checksum, unreadable, empty) or foreign (another
                         job's): set aside, never read; their rows are sent again
    index.npz            a cache of the result index (row key -> part, row) and the parts it
                         covers; rebuilt from the parts when missing, damaged or stale
    input-keys.npz       a cache of the input's key pass (keys.KeyPass), keyed by the input's
                         stat and digest; recomputed when it does not match
    keys.npy             the current input's row keys, for ``pipeline status`` only
    rescued-not-used-*/  rescued answers that did not fit this checkpoint: kept, never read
    .*.tmp               a write in progress (removed by the next run)

and, only when the checkpoint could not be written (disk full, read-only), the answers that
were received but not saved, as parts under ``$TMPDIR/pipeline-rescue/<checkpoint hash>/``;
the next run of this OUTPUT moves them into ``parts/`` before it sends anything.

Every file is written through ``atomic.atomic_write`` (temporary name, fsync, rename, directory
fsync), so a crash at any instant leaves either the old or the new file, never half of one.
A row's result is the one in the highest-numbered part holding its key (``--retry-failed``
appends newer results). This module does not know how results are produced or assembled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write, fsync_dir, write_bytes
from .errors import FingerprintMismatch, LockHeld, OutputError
from .keys import KeyPass, stable_argsort
from .records import COST_CACHE, COST_DEDUP, STATUS_CODES, RowResult
from .schema import PART_SCHEMA as PART_SCHEMA
from .schema import RESULT_SCHEMA as RESULT_SCHEMA
from .schema import results_to_table, row_result, valid_text

FORMAT_VERSION = 2  # 2: parts carry cost_usd and cost_source


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoint")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes(path, data)


PART_NAME = re.compile(r"part-(\d{6,})(?:-([0-9a-f]{8}))?\.parquet")


def part_number(path: Path) -> int | None:
    """The number of a part file, or None when the name is not a part's."""
    match = PART_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def file_signature(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


LOOKUP_CHUNK = 1 << 16


@dataclass
class ResultLocations:
    """Where the latest result of every key in the checkpoint is, sorted by key.

    ``part`` and ``row`` locate the result; ``status`` holds ``STATUS_CODES``. Assembling
    OUTPUT needs less: ``places`` gives part and row aligned with the input's keys.
    """

    keys: np.ndarray
    part: np.ndarray
    row: np.ndarray
    status: np.ndarray

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Position in this index of each key, or -1 when it has no result."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        if len(keys) > 4096:
            # sorted queries walk the index in order: ~4x faster than random probes at 1M
            order = np.argsort(keys)
            pos = np.empty(len(keys), dtype=np.int64)
            pos[order] = np.searchsorted(self.keys, keys[order])
        else:
            pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos] == keys
        return np.where(found, pos, -1).astype(np.int64)

    def counts(self, among: np.ndarray | None = None) -> dict[str, int]:
        """ok / error / skipped counts, of all keys or of the index positions ``among``."""
        status = self.status if among is None else self.status[among]
        return {name: int((status == code).sum()) for name, code in STATUS_CODES.items()}

    def places(self, key_arrays: Sequence[np.ndarray]) -> RowPlaces:
        """Where the result of each of ``key_arrays``'s keys is, aligned with them (a chunk
        at a time): all that assembling OUTPUT needs, 8 bytes a key instead of 17."""
        part, row = [], []
        for keys in key_arrays:
            part.append(np.full(len(keys), -1, dtype=np.int32))
            row.append(np.zeros(len(keys), dtype=np.int32))
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                have = np.flatnonzero(pos >= 0)
                part[-1][start + have] = self.part[pos[have]]
                row[-1][start + have] = self.row[pos[have]]
        return RowPlaces(tuple(part), tuple(row))

    def counts_of(self, key_arrays: Sequence[np.ndarray]) -> tuple[dict[str, int], int]:
        """(status counts, keys without a result) over ``key_arrays``, a chunk at a time so
        that a million keys need no million-entry temporaries."""
        counts = dict.fromkeys(STATUS_CODES, 0)
        missing = 0
        for keys in key_arrays:
            for start in range(0, len(keys), LOOKUP_CHUNK):
                pos = self.lookup(keys[start : start + LOOKUP_CHUNK])
                found = pos[pos >= 0]
                missing += len(pos) - len(found)
                for name, count in self.counts(found).items():
                    counts[name] += count
        return counts, missing


@dataclass(frozen=True)
class RowPlaces:
    """Per key array given to ``ResultLocations.places`` (one per model and sample), the
    part and row of each key's result, aligned with the keys; part -1: no result."""

    part: tuple[np.ndarray, ...]
    row: tuple[np.ndarray, ...]


@dataclass
class ResultIndex(ResultLocations):
    """``ResultLocations`` plus what each key's result spent, for budgets and ``status``:
    tokens and cost, both 0 for a result that no request paid for (a dedup copy, a cached
    answer), whose OUTPUT row still shows the usage of the answer it got."""

    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    cost_usd: np.ndarray

    @classmethod
    def empty(cls) -> ResultIndex:
        z = np.zeros(0, dtype=np.int64)
        return cls(
            np.zeros(0, dtype=np.uint64),
            z,
            z,
            np.zeros(0, dtype=np.int8),
            z,
            z,
            np.zeros(0, dtype=np.float64),
        )


def _identified(metadata: dict[bytes, bytes] | None) -> bool:
    """Whether a part's metadata names its job (parts of this version do)."""
    return bool(metadata) and b"bpp.fingerprint" in (metadata or {})


def _rows_of(path: Path) -> int:
    """A part's row count; a part that cannot say is named (a run sets it aside first, but
    ``pipeline status`` reads the checkpoint as it is)."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise OutputError(
            f"checkpoint part {path} is damaged ({type(exc).__name__}); the next "
            "`pipeline run` of this OUTPUT sets it aside and sends its rows again"
        ) from None


def _names_digest(paths: Iterable[Path]) -> str:
    return hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()


def _checksum_problem(path: Path, data: bytes) -> str | None:
    match = PART_NAME.fullmatch(path.name)
    if match is None or match.group(2) is None:
        return None  # an older part: no checksum to compare
    if f"{zlib.crc32(data):08x}" != match.group(2):
        return "its bytes do not match the checksum in its name"
    return None


def _part_problem(path: Path) -> tuple[str | None, dict[bytes, bytes] | None]:
    """(what is wrong with the part file, or None; its Parquet key-value metadata)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}", None
    if not data:
        return "empty file", None
    problem = _checksum_problem(path, data)
    if problem is not None:
        return problem, None
    try:
        meta = pq.read_metadata(pa.BufferReader(data))
        names = meta.schema.to_arrow_schema().names
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        return f"not a readable Parquet file ({type(exc).__name__})", None
    if names != PART_SCHEMA.names:
        return "not a checkpoint part (other columns)", None
    return None, dict(meta.metadata or {})


class Checkpoint:
    """The checkpoint directory of one OUTPUT."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.dir = checkpoint_dir(output)
        self.parts_dir = self.dir / "parts"
        self.manifest_path = self.dir / "manifest.json"
        self._lock_file: IO[str] | None = None
        self._next_part = 1
        self._write_lock = threading.Lock()  # a part number is taken by one write only
        self._paths: dict[int, Path] = {}  # part number -> file
        # what every part written carries: {"fingerprint": ..., "job": ...} (set by the run)
        self.identity: dict[str, str] | None = None
        self.job_id: str | None = None  # the job the parts prove when manifest.json is gone
        self.legacy_upto = 0  # parts of the older format are taken up to this number
        self.parts_read = 0  # parts the last load_index read beyond the saved index

    # -- manifest -------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise OutputError(
                f"Checkpoint manifest {self.manifest_path} is unreadable ({exc}). "
                "Move the checkpoint directory aside, or run with --restart."
            ) from None
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "format_version": FORMAT_VERSION, "updated_at": time.time()}
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        atomic_write_bytes(self.manifest_path, data.encode())

    def output_is_ours(self) -> bool:
        """True when OUTPUT is the file the last run of this checkpoint wrote."""
        manifest = self.read_manifest()
        current = file_signature(self.output)
        if current is None:
            return False
        # "output_signatures" covers a crash between replacing OUTPUT and recording it
        known = [manifest.get("output_signature"), *manifest.get("output_signatures", [])]
        return current in known

    # -- lock -----------------------------------------------------------------------------

    def acquire_lock(self) -> str | None:
        """Take the run lock. Returns a note when a dead run's lock was taken over."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = (self.dir / "lock").open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise LockHeld(
                f"Another run is writing {self.output} ({holder}). Wait for it to finish, "
                "or stop it; two runs on one OUTPUT would send rows twice."
            ) from None
        fh.seek(0)
        previous = fh.read().strip()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.ctime()}\n")
        fh.flush()
        self._lock_file = fh
        if previous:
            return f"took over the lock left by a run that is gone ({previous})"
        return None

    def release_lock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self._lock_file.seek(0)
                self._lock_file.truncate()
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @staticmethod
    def lock_holder(output: Path) -> str | None:
        """Who holds the lock of OUTPUT's checkpoint now, or None."""
        path = checkpoint_dir(output) / "lock"
        if not path.exists():
            return None
        with path.open("a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                return fh.read().strip() or "unknown process"
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None

    # -- starting -------------------------------------------------------------------------

    def check_fingerprint(
        self, parts: dict[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse to resume results made under settings that change responses.

        ``defaults`` gives the value of a part that is left out of ``parts`` (or of the
        stored ones) when it has that value, so that a part added or dropped is compared
        and named like any other.
        """
        manifest = self.read_manifest()
        version = manifest.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise OutputError(
                f"{self.dir} was written by another version of this tool (checkpoint format "
                f"{version}, this version reads {FORMAT_VERSION}). Rerun with that version, or "
                "add --restart to start over (the old checkpoint is kept as a backup)."
            )
        old = manifest.get("fingerprint_parts")
        if old is None or old == parts:
            return
        defaults = defaults or {}

        def value(of: dict[str, Any], name: str) -> Any:
            return of.get(name, defaults.get(name))

        names = list(dict.fromkeys([*parts, *old]))
        changed = [name for name in names if value(old, name) != value(parts, name)]
        if not changed:
            return
        lines = [f"  {name}: {value(old, name)!r} -> {value(parts, name)!r}" for name in changed]
        raise FingerprintMismatch(
            f"{self.output}: the checkpoint was made with other settings that change "
            f"responses, so its results cannot be mixed with this run's:\n"
            + "\n".join(lines)
            + "\nRun with the old settings to resume, or add --restart to start over "
            "(the old checkpoint is kept as a backup), or choose another -o OUTPUT."
        )

    def set_aside(self) -> Path | None:
        """--restart: move the old checkpoint to a backup name; returns it."""
        if not self.dir.exists():
            return None
        backup = self.dir.with_name(f"{self.dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while backup.exists():
            n += 1
            backup = backup.with_name(f"{backup.name}-{n}")
        os.replace(self.dir, backup)
        rescued = self.rescue_dir()
        if rescued.exists():  # answers of the old settings go with the old checkpoint
            shutil.move(str(rescued), str(backup / "rescued"))
        return backup

    def prepare(self, fingerprint: str | None = None) -> list[str]:
        """Under the run lock: create the directories, drop temp files of crashed runs,
        set aside damaged or foreign parts, find the next part, and take in the parts a run
        could only save to the rescue place. Returns notes for the user.

        ``fingerprint`` is this run's: without ``manifest.json`` the parts must prove it.
        """
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for tmp in [
            *self.parts_dir.glob(".*.tmp"),
            *self.dir.glob(".*.tmp"),
            *self.output.parent.glob(f".{self.output.name}.*.tmp"),  # OUTPUT's, if killed
        ]:
            tmp.unlink(missing_ok=True)
        notes = self._verify_parts(fingerprint)
        # never a number used before, not even by a part set aside: a saved index or a
        # rescue names parts by number
        used = [part_number(p) for p in (self.dir / "quarantine").glob("part-*.parquet")]
        self._next_part = max([*self._paths, *(n for n in used if n is not None)], default=0) + 1
        return notes + self._adopt_rescued()

    # -- integrity: every part is checked before a run uses it ----------------------------

    def _verify_parts(self, fingerprint: str | None) -> list[str]:
        """Set aside every part that is damaged or not this job's (see ``quarantine/``)."""
        manifest = self.read_manifest()
        found: list[tuple[Path, str | None, dict[bytes, bytes] | None]] = []
        for path in self._part_paths():
            problem, metadata = _part_problem(path)
            found.append((path, problem, metadata))
        strays = [p.name for p in self.parts_dir.glob("*.parquet") if part_number(p) is None]
        if manifest:
            expected = (manifest.get("fingerprint"), manifest.get("job_id"))
        else:
            expected = self._job_from_parts(found, fingerprint)
        # parts of the older format (no checksum, no job) are taken unverified only up to
        # the last one the checkpoint had when this version first ran it
        if manifest and not manifest.get("job_id"):
            self.legacy_upto = max(
                (part_number(path) or 0 for path, _, meta in found if not _identified(meta)),
                default=0,
            )
        else:
            self.legacy_upto = int(manifest.get("legacy_upto", 0))
        bad: list[tuple[Path, str]] = []
        for path, problem, metadata in found:
            if problem is None and _identified(metadata):
                assert metadata is not None
                part_fp = metadata[b"bpp.fingerprint"].decode()
                part_job = metadata.get(b"bpp.job", b"").decode()
                if part_fp != expected[0] or (expected[1] and part_job != expected[1]):
                    problem = "another job's part (other settings or another run's job id)"
            elif problem is None and manifest and (part_number(path) or 0) > self.legacy_upto:
                problem = "a part of the older format added after this checkpoint was upgraded"
            if problem is not None:
                bad.append((path, problem))
        notes = [f"ignored files in {self.parts_dir} that are not parts: {', '.join(strays)}"]
        notes = notes if strays else []
        if bad:
            aside = self.dir / "quarantine"
            aside.mkdir(exist_ok=True)
            for path, _ in bad:
                os.replace(path, aside / path.name)
            fsync_dir(self.parts_dir)
            listed = "; ".join(f"{path.name}: {problem}" for path, problem in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            notes.append(
                f"set aside {len(bad)} checkpoint part(s) in {aside} ({listed}{more}); "
                "their rows are sent again"
            )
            self._part_paths()  # forget them
        return notes

    def _job_from_parts(
        self,
        found: list[tuple[Path, str | None, dict[bytes, bytes] | None]],
        fingerprint: str | None,
    ) -> tuple[str | None, str | None]:
        """Without manifest.json, the job is the one the newest sound part names, and its
        settings must be this run's; parts that cannot say (older format) refuse the run."""
        sound = [(path, meta) for path, problem, meta in found if problem is None]
        if not sound or fingerprint is None:  # nothing to prove, or no run to prove it to
            return (fingerprint, None)
        legacy = [path for path, meta in sound if meta is None or b"bpp.fingerprint" not in meta]
        if legacy:
            raise OutputError(
                f"{self.manifest_path} is missing and {len(legacy)} checkpoint part(s) of an "
                "older format cannot prove the settings they were made with. Restore "
                "manifest.json, or add --restart to start over (the old checkpoint is kept)."
            )
        meta = sound[-1][1]
        assert meta is not None
        part_fp = meta[b"bpp.fingerprint"].decode()
        if part_fp != fingerprint:
            raise FingerprintMismatch(
                f"{self.output}: manifest.json is missing, and the checkpoint's parts were "
                f"made with other settings that change responses (fingerprint {part_fp}, "
                f"this run {fingerprint}). Run with the old settings to resume, or add "
                "--restart to start over (the old checkpoint is kept as a backup)."
            )
        self.job_id = meta.get(b"bpp.job", b"").decode() or None
        return (part_fp, self.job_id)

    # -- parts ----------------------------------------------------------------------------

    def _part_paths(self) -> list[Path]:
        """The part files in number order (strays with other names are not parts)."""
        paths: dict[int, Path] = {}
        if self.parts_dir.exists():
            for path in self.parts_dir.glob("part-*.parquet"):
                number = part_number(path)
                if number is not None:
                    paths[number] = path
        self._paths = dict(sorted(paths.items()))
        return list(self._paths.values())

    def write_part(self, results: Sequence[RowResult]) -> Path:
        """Persist results crash-safely as the next part (thread-safe); the file's name
        carries the CRC-32 of its bytes."""
        return self._store_part(self._encode(results))

    def _store_part(self, data: bytes) -> Path:
        """Write a part's bytes under the next number (taken by this write only)."""
        with self._write_lock:
            number = self._next_part
            path = self.parts_dir / f"part-{number:06d}-{zlib.crc32(data):08x}.parquet"
            atomic_write_bytes(path, data)
            self._paths[number] = path
            self._next_part += 1
        return path

    def _encode(self, results: Sequence[RowResult]) -> bytes:
        """A part's bytes: the results, and the job's identity in the Parquet metadata."""
        try:
            table = results_to_table(results)
        except UnicodeEncodeError:  # half a surrogate pair in an answer ("\\ud83d" in JSON)
            table = results_to_table([valid_text(r) for r in results])
        if self.identity:
            table = table.replace_schema_metadata(
                {f"bpp.{name}": value for name, value in self.identity.items()}
            )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return bytes(sink.getvalue())

    # -- rescue: answers the checkpoint could not take -------------------------------------

    def holds_results(self) -> bool:
        """Whether any result was saved here (in a part or the rescue place)."""
        return bool(self._part_paths()) or any(self.rescue_dir().glob("rescued-*.parquet"))

    def rescue_dir(self) -> Path:
        """Where answers go when the checkpoint cannot be written: most often another
        filesystem; private to this user, and the same place for every run of this OUTPUT."""
        tag = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"pipeline-rescue-{os.getuid()}" / tag

    def rescue_part(self, results: Sequence[RowResult]) -> Path:
        """Save results that ``write_part`` could not write; returns the file. Beside it,
        what proves whose they are: this checkpoint, its job (fingerprint and creation
        time in the manifest) and the last part written before them."""
        where = self.rescue_dir()
        where.parent.mkdir(mode=0o700, exist_ok=True)
        where.mkdir(mode=0o700, exist_ok=True)
        path = where / f"rescued-{time.time_ns()}-{os.getpid()}.parquet"
        atomic_write_bytes(path, self._encode(results))
        manifest = self.read_manifest()
        identity = {
            "checkpoint": str(self.dir.resolve()),
            "fingerprint": manifest.get("fingerprint"),
            "created_at": manifest.get("created_at"),
            "after_part": self._next_part - 1,
        }
        atomic_write_bytes(where / "identity.json", json.dumps(identity).encode())
        return path

    def _adopt_rescued(self) -> list[str]:
        """Move rescued parts into ``parts/`` when they are provably this job's and nothing
        was written since; otherwise set them aside in the checkpoint. Returns notes."""
        where = self.rescue_dir()
        rescued = sorted(where.glob("rescued-*.parquet"))
        if not rescued:
            return []
        problem = self._rescue_problem(where)
        if problem is not None:
            aside = self.dir / f"rescued-not-used-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(str(where), str(aside))
            return [f"answers rescued earlier were not used ({problem}); kept in {aside}"]
        for part in rescued:
            self._store_part(part.read_bytes())
            part.unlink()
        shutil.rmtree(where, ignore_errors=True)
        return [f"took in {len(rescued)} part(s) of answers rescued when the disk failed"]

    def _rescue_problem(self, where: Path) -> str | None:
        info = where.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return f"{where} is not private to this user"
        try:
            identity = json.loads((where / "identity.json").read_text())
        except (OSError, ValueError):
            return "no readable identity.json beside them"
        manifest = self.read_manifest()
        if identity.get("checkpoint") != str(self.dir.resolve()):
            return "they belong to another checkpoint"
        if not manifest or any(
            identity.get(name) != manifest.get(name) for name in ("fingerprint", "created_at")
        ):
            return "they belong to another job: the checkpoint was started again since"
        if self._next_part - 1 != identity.get("after_part"):
            return "parts were written since, so they are older than what is here"
        return None

    def part_paths(self) -> list[Path]:
        return self._part_paths()

    def read_part(self, number: int) -> pa.Table:
        """Part ``number``, its checksum verified."""
        if number not in self._paths:
            self._part_paths()
        path = self._paths[number]
        data = path.read_bytes()
        problem = _checksum_problem(path, data)
        if problem is not None:
            raise OutputError(
                f"checkpoint part {path} is damaged ({problem}) since this run started; "
                "rerun: the part is set aside and its rows are sent again"
            )
        return pq.read_table(pa.BufferReader(data), schema=PART_SCHEMA)

    def write_keys(self, keys: np.ndarray) -> None:
        """Record the current input's row keys, for ``pipeline status``."""
        path = self.dir / "keys.npy"
        with atomic_write(path) as tmp, tmp.open("wb") as fh:
            np.save(fh, keys.astype(np.uint64), allow_pickle=False)

    def read_keys(self) -> np.ndarray | None:
        try:
            return np.load(self.dir / "keys.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None

    def results_at(self, index: ResultIndex, positions: np.ndarray) -> list[RowResult]:
        """The stored results at ``positions`` of ``index`` (a rare path: reads whole parts)."""
        out: list[RowResult] = []
        for number in np.unique(index.part[positions]):
            part = self.read_part(int(number))
            for pos in positions[index.part[positions] == number]:
                out.append(row_result(part.slice(int(index.row[pos]), 1).to_pylist()[0]))
        return out

    # -- saved key pass and index: a resume starts from them -----------------------------

    def save_key_pass(self, key_pass: KeyPass) -> None:
        """Keep the input's key pass (see ``keys.KeyPass``) for the next run."""
        meta = {
            "version": KEY_PASS_VERSION,
            "params": key_pass.params,
            "stat": key_pass.stat,
            "sha256": key_pass.sha256,
            "ends_with_newline": key_pass.ends_with_newline,
        }
        arrays = {"content": key_pass.content}
        if key_pass.ids is not None:
            arrays["ids"] = key_pass.ids
        _save_arrays(self.dir / "input-keys.npz", meta, arrays)

    def load_key_pass(self) -> KeyPass | None:
        """The saved key pass, or None when there is none or it is unreadable."""
        loaded = _load_arrays(self.dir / "input-keys.npz")
        if loaded is None or loaded[0].get("version") != KEY_PASS_VERSION:
            return None
        meta, arrays = loaded
        content, ids = arrays.get("content"), arrays.get("ids")
        if content is None or (ids is not None and len(ids) != len(content)):
            return None
        try:
            return KeyPass(
                params=meta["params"],
                stat=meta["stat"],
                sha256=meta["sha256"],
                ends_with_newline=bool(meta["ends_with_newline"]),
                content=content.astype(np.uint64, copy=False),
                ids=None if ids is None else ids.astype(np.uint64, copy=False),
            )
        except KeyError:
            return None

    def load_index(self) -> ResultIndex:
        """The latest result per key over all parts.

        Starts from the saved index (``save_index``) when it is valid for the parts it
        covers, and reads only the parts written after it: a resume does not re-read every
        part of a long run.

        Memory: one array per column (25 bytes a result) is allocated up front and filled
        part by part, so no per-part pieces are held and nothing is concatenated; a result's
        part and row follow from its position and need no array until the end.
        """
        paths = self._part_paths()
        numbers = list(self._paths)
        base = self._saved_index()
        covered = base.covers if base is not None else 0
        new = [
            (path, number) for path, number in zip(paths, numbers, strict=True) if number > covered
        ]
        self.parts_read = len(new)
        if not new:
            return ResultIndex.empty() if base is None else ResultIndex(**base.arrays)
        sizes = np.array([_rows_of(path) for path, _ in new], dtype=np.int64)
        n_base = 0 if base is None else len(base.arrays["keys"])
        total = n_base + int(sizes.sum())
        columns = {name: np.empty(total, dtype=dtype) for name, dtype in _FILLED.items()}
        base_part = base_row = None
        if base is not None:
            for name, column in columns.items():
                column[:n_base] = base.arrays.pop(name)
            base_part, base_row = base.arrays["part"], base.arrays["row"]
        del base
        codes = pa.array(list(STATUS_CODES))
        at = n_base
        for (path, _), size in zip(new, sizes, strict=True):
            table = pq.read_table(path, columns=list(INDEX_COLUMNS))
            if table.num_rows != size:
                raise OutputError(
                    f"Checkpoint part {path} changed while it was read. Parts are written once; "
                    "is another process writing this checkpoint?"
                )
            end = at + int(size)
            columns["keys"][at:end] = table.column("key").to_numpy()
            status = pa.compute.index_in(table.column("status"), value_set=codes)
            columns["status"][at:end] = status.to_numpy(zero_copy_only=False)
            # a copy (dedup) or a cached answer spent nothing: its tokens are not counted
            copied = pa.compute.is_in(table.column("cost_source"), value_set=_NOT_SPENT)
            for name in ("prompt_tokens", "completion_tokens"):
                spent = pa.compute.if_else(copied, 0, table.column(name).fill_null(0))
                columns[name][at:end] = spent.to_numpy()
            columns["cost_usd"][at:end] = table.column("cost_usd").fill_null(0.0).to_numpy()
            at = end
        del table
        # latest result wins: the rows are in (part, row) order already, so a stable sort by
        # key keeps each key's results in that order; keep the last of each key
        order, sorted_keys, starts = stable_argsort(columns.pop("keys"))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = starts[1:]
        del starts
        everyone = bool(last.all())
        pick = order if everyone else order[last]
        picked = {"keys": sorted_keys if everyone else sorted_keys[last]}
        del order, sorted_keys, last
        picked["part"], picked["row"] = _locate(
            pick, n_base, base_part, base_row, np.array([n for _, n in new]), sizes
        )
        for name in _FILLED:
            if name != "keys":
                picked[name] = columns.pop(name)[pick]
        return ResultIndex(**picked)

    def save_index(self, index: ResultIndex) -> None:
        """Keep ``index`` (built from every part there is now) for the next ``load_index``."""
        self._part_paths()
        numbers = list(self._paths)
        if not numbers:
            return
        meta = {
            "version": FORMAT_VERSION,
            "covers": max(numbers),
            "parts": len(numbers),
            "names": _names_digest(self._paths.values()),
        }
        arrays = {name: getattr(index, name) for name in _INDEX_ARRAYS}
        _save_arrays(self.dir / "index.npz", meta, arrays)

    def _saved_index(self) -> _SavedIndex | None:
        """The saved index, if it covers exactly the parts numbered up to its ``covers``."""
        loaded = _load_arrays(self.dir / "index.npz")
        if loaded is None:
            return None
        meta, arrays = loaded
        if set(arrays) != set(_INDEX_ARRAYS):
            return None
        covers = meta.get("covers")
        if meta.get("version") != FORMAT_VERSION or not isinstance(covers, int):
            return None
        # the very files it was built from: a part set aside (quarantine/) or one written
        # since under another name makes it stale (a part number is never used twice, and
        # the name carries the part's checksum)
        covered = [path for n, path in self._paths.items() if n <= covers]
        if len(covered) != meta.get("parts") or _names_digest(covered) != meta.get("names"):
            return None
        if len({len(a) for a in arrays.values()}) != 1:
            return None
        return _SavedIndex(covers=covers, arrays=arrays)


INDEX_COLUMNS = ("key", "status", "prompt_tokens", "completion_tokens", "cost_usd", "cost_source")
_NOT_SPENT = pa.array([COST_DEDUP, COST_CACHE])  # cost sources of results that no request paid for
_INDEX_ARRAYS = ("keys", "part", "row", "status", "prompt_tokens", "completion_tokens", "cost_usd")
# the columns load_index fills from the parts, and their types (a request's tokens fit int32)
_FILLED = {
    "keys": np.uint64,
    "status": np.int8,
    "prompt_tokens": np.int32,
    "completion_tokens": np.int32,
    "cost_usd": np.float64,
}


def _locate(
    pick: np.ndarray,
    n_base: int,
    base_part: np.ndarray | None,
    base_row: np.ndarray | None,
    numbers: np.ndarray,
    sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(part, row) of each picked position: the first ``n_base`` positions are the saved
    index's (which has them); the rest are the new parts' rows, one part after another."""
    part = np.empty(len(pick), dtype=np.int32)
    row = np.empty(len(pick), dtype=np.int32)
    firsts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + n_base
    for start in range(0, len(pick), LOOKUP_CHUNK):
        chunk = pick[start : start + LOOKUP_CHUNK]
        old = chunk < n_base
        which = np.searchsorted(firsts, chunk, side="right") - 1
        which[old] = 0
        part[start : start + len(chunk)] = numbers[which]
        row[start : start + len(chunk)] = chunk - firsts[which]
        if old.any() and base_part is not None and base_row is not None:
            part[start : start + len(chunk)][old] = base_part[chunk[old]]
            row[start : start + len(chunk)][old] = base_row[chunk[old]]
    return part, row


@dataclass(frozen=True)
class _SavedIndex:
    covers: int  # the highest part number it includes
    arrays: dict[str, np.ndarray]


KEY_PASS_VERSION = 1


def _save_arrays(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """An .npz of ``arrays`` plus ``meta`` as JSON, written atomically (temp, fsync, rename)."""
    encoded = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_write(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, meta=encoded, **arrays)  # type: ignore[arg-type]


def _load_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """What ``_save_arrays`` wrote, or None when it is missing or damaged."""
    try:
        # our own handle: np.load leaks the one it opens when the zip is damaged
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return meta, arrays
