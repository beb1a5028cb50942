"""Crash-safe checkpoints beside OUTPUT: what is done, and resuming from it.

Layout of ``OUTPUT.checkpoint/``::

    manifest.json        fingerprint (and its parts), config, input, row count, output signature
    lock                 flock()ed by the live run; holds its pid and host (shared by shards)
    setup.lock, shards/  shards (--shard) start and finish in turn; their locks and records
    parts/part-NNNNNN-CCCCCCCC.parquet   results as they complete: key + result columns;
                         CCCCCCCC is the CRC-32 of the file's bytes, and the Parquet
                         metadata names the job (fingerprint, job id). Older parts are
                         named part-NNNNNN.parquet and carry neither.
    quarantine/          parts found damaged (checksum, unreadable, empty) or foreign (another
                         job's): set aside, never read; their rows are sent again
    index.arrays         a cache of the result index (row key -> result's part and row),
                         rebuilt from the parts when missing, damaged, stale or older
    input-keys.arrays    a cache of the input's key pass (keys.KeyPass), for its stat and
                         digest; made again when it does not match
    keys.npy             the current input's unit keys, for ``pipeline status`` and the
                         run's end (OUTPUT is assembled reading them back)
    rescued-not-used-*/  rescued answers that did not fit this checkpoint: kept, never read
    batch/               batch mode only: batches.jsonl (the journal) and part files, results
    .*.tmp               a write in progress, the index a run reads, beside OUTPUT the key
                         pass it is about to take in (a crashed run's: removed by the next)

and, only when the checkpoint could not be written (disk full, read-only), the answers that
were received but not saved, as parts under ``$TMPDIR/pipeline-rescue-<uid>/<hash>/``;
the next run of this OUTPUT moves them into ``parts/`` before it sends anything.

Every file is written through ``atomic.atomic_write`` (temporary name, fsync, rename, directory
fsync), so a crash at any instant leaves either the old or the new file, never half of one.
A row's result is the one in the highest-numbered part holding its key (``--retry-failed``
appends newer results). Helpers: ``part_files``, ``lock``, ``index_build``, ``saved_arrays``.
It does not know how results are produced or assembled.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import remote_output
from .atomic import fsync_dir, write_bytes
from .errors import FingerprintMismatch, OutputError
from .index_build import index_of
from .keys import KeyPass
from .lock import RunLock, lock_holder
from .part_files import checksum_problem, identified, job_from_parts, part_problem
from .part_files import part_number as part_number
from .records import RowResult
from .rescue import RescuePlace
from .result_index import KeyArray, ResultIndex
from .saved_arrays import NpyRange, in_use, take_in, write_key_arrays
from .saved_arrays import load_key_pass as read_key_pass
from .schema import FORMAT_VERSION, results_to_table, row_result, valid_text
from .schema import PART_SCHEMA as PART_SCHEMA
from .schema import RESULT_SCHEMA as RESULT_SCHEMA
from .shards import Shard, ShardLocks, first_part, part_step

INDEX_FILE = "index.arrays"  # the result index as of the end of the last run
_INDEX_BUILDS = itertools.count()  # numbers the index files this process writes


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoint")


def file_signature(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Checkpoint:
    """The checkpoint directory of one OUTPUT."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.dir = checkpoint_dir(output)
        self.parts_dir = self.dir / "parts"
        self.manifest_path = self.dir / "manifest.json"
        self._lock = RunLock(self.dir / "lock", output)
        self.shard: Shard | None = None  # a shard run (``--shard``): see shards.py
        self._shard_locks: ShardLocks | None = None
        self.alone = True  # no other run of this checkpoint is alive (shards may be)
        self.locked = False  # this object holds the run lock (or its shard's)
        self._next_part = 1
        self._write_lock = threading.Lock()  # a part number is taken by one write only
        self._paths: dict[int, Path] = {}  # part number -> file
        self._step = 1  # between the numbers of this run's parts (see shards.part_step)
        self._indexed: dict[int, Path] = {}  # the parts the last load_index read
        self.identity: dict[str, str] | None = None  # each part's fingerprint and job (run's)
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
        write_bytes(self.manifest_path, data.encode())
        remote_output.publish(self.manifest_path, self.dir)

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

    def acquire_lock(self, shard: Shard | None = None) -> str | None:
        """Take the run lock, or a shard's locks (see ``shards.ShardLocks``; its setup turn
        is held until ``end_setup``). Returns a note when a dead run's lock was taken over."""
        if shard is None:
            note = self._lock.acquire()
            self.locked = True
            return note
        self.shard = shard
        self._shard_locks = ShardLocks(self.dir, self.output, shard, self._lock)
        self.alone = self._shard_locks.acquire()
        self.locked = True
        return None

    def end_setup(self) -> None:
        """A shard has started (manifest written): other shards may start or finish."""
        if self._shard_locks is not None:
            self._shard_locks.setup.release()

    def hold_setup(self) -> None:
        """A shard finishes (manifest, OUTPUT) in turn with the others (waits for its turn)."""
        if self._shard_locks is not None:
            self._shard_locks.setup.hold()

    def release_lock(self) -> None:
        self.locked = False
        if self._shard_locks is not None:
            self._shard_locks.release()
        else:
            self._lock.release()

    @staticmethod
    def lock_holder(output: Path) -> str | None:
        """Who holds the lock of OUTPUT's checkpoint now, or None."""
        return lock_holder(checkpoint_dir(output) / "lock")

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

    def prepare(self, fingerprint: str | None = None, spare: Sequence[Path] = ()) -> list[str]:
        """Under the run lock: create the directories, drop temp files of crashed runs,
        set aside damaged or foreign parts, find the next part, and take in the parts a run
        could only save to the rescue place. Returns notes for the user.

        ``fingerprint`` is this run's: without ``manifest.json`` the parts must prove it;
        ``spare``: this run's own temporary files (its staged key pass)
        """
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        # a temporary file is a crashed run's only when no other run is alive
        for tmp in (
            [
                *self.parts_dir.glob(".*.tmp"),
                *self.dir.glob(".*.tmp"),
                *self.output.parent.glob(f".{self.output.name}.*.tmp"),  # OUTPUT's, if killed
            ]
            if self.alone
            else []
        ):
            if tmp.is_dir():  # a lookup's spread keys (result_index)
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp not in spare and not in_use(tmp):  # (a key pass being written)
                tmp.unlink(missing_ok=True)
        notes = self._verify_parts(fingerprint)
        # never a number used before, not even by a part set aside: a saved index or a
        # rescue names parts by number; a shard takes numbers in its own slot
        used = [part_number(p) for p in (self.dir / "quarantine").glob("part-*.parquet")]
        highest = max([*self._paths, *(n for n in used if n is not None)], default=0)
        slot = None if self.shard is None else self.shard.index
        self._next_part = first_part(highest, slot)
        self._step = part_step(slot)
        return notes + self._adopt_rescued()

    # -- integrity: every part is checked before a run uses it ----------------------------

    def _verify_parts(self, fingerprint: str | None) -> list[str]:
        """Set aside every part that is damaged or not this job's (see ``quarantine/``)."""
        manifest = self.read_manifest()
        found: list[tuple[Path, str | None, dict[bytes, bytes] | None]] = []
        for path in self._part_paths():
            problem, metadata = part_problem(path)
            found.append((path, problem, metadata))
        strays = [p.name for p in self.parts_dir.glob("*.parquet") if part_number(p) is None]
        if manifest:
            expected = (manifest.get("fingerprint"), manifest.get("job_id"))
        else:
            expected = job_from_parts(found, fingerprint, self.manifest_path, self.output)
            self.job_id = expected[1]
        # parts of the older format (no checksum, no job) are taken unverified only up to
        # the last one the checkpoint had when this version first ran it
        if manifest and not manifest.get("job_id"):
            self.legacy_upto = max(
                (part_number(path) or 0 for path, _, meta in found if not identified(meta)),
                default=0,
            )
        else:
            self.legacy_upto = int(manifest.get("legacy_upto", 0))
        bad: list[tuple[Path, str]] = []
        for path, problem, metadata in found:
            if problem is None and identified(metadata):
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
            write_bytes(path, data)
            self._paths[number] = path
            self._next_part += self._step
        remote_output.publish(path, self.dir)  # recorded once the store has it too
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

    # -- rescue: answers the checkpoint could not take (see rescue.py) -----------------------

    def holds_results(self) -> bool:
        """Whether any result was saved here (in a part or the rescue place)."""
        return bool(self._part_paths()) or bool(self._rescue().parts())

    def _rescue(self) -> RescuePlace:
        return RescuePlace(self.dir, self.shard.name if self.shard else None)

    def rescue_dir(self) -> Path:
        """Where answers go when the checkpoint cannot be written (see ``RescuePlace``)."""
        return self._rescue().path

    def rescue_part(self, results: Sequence[RowResult]) -> Path:
        """Save results that ``write_part`` could not write; returns the file. Beside it,
        what proves whose they are: this checkpoint, its job (fingerprint and creation
        time in the manifest) and the last part written before them."""
        manifest = self.read_manifest()
        identity = {
            "fingerprint": manifest.get("fingerprint"),
            "created_at": manifest.get("created_at"),
            "after_part": self._next_part - self._step,
        }
        return self._rescue().save(self._encode(results), identity)

    def _adopt_rescued(self) -> list[str]:
        """Move rescued parts into ``parts/`` when they are provably this job's and nothing
        was written since; otherwise set them aside in the checkpoint. Returns notes."""
        place = self._rescue()
        rescued = place.parts()
        if not rescued:
            return []
        problem = place.problem(self.read_manifest(), self._next_part - self._step)
        if problem is not None:
            aside = self.dir / f"rescued-not-used-{time.strftime('%Y%m%d-%H%M%S')}"
            place.move_to(aside)
            return [f"answers rescued earlier were not used ({problem}); kept in {aside}"]
        for part in rescued:
            self._store_part(part.read_bytes())
            part.unlink()
        place.clear()
        return [f"took in {len(rescued)} part(s) of answers rescued when the disk failed"]

    def part_paths(self) -> list[Path]:
        return self._part_paths()

    def read_part(self, number: int) -> pa.Table:
        """Part ``number``, its checksum verified."""
        if number not in self._paths:
            self._part_paths()
        path = self._paths[number]
        data = path.read_bytes()
        problem = checksum_problem(path, data)
        if problem is not None:
            raise OutputError(
                f"checkpoint part {path} is damaged ({problem}) since this run started; "
                "rerun: the part is set aside and its rows are sent again"
            )
        return pq.read_table(pa.BufferReader(data), schema=PART_SCHEMA)

    def write_keys(self, arrays: Sequence[KeyArray], rows: int) -> None:
        """Record the input's unit keys (``rows`` each), for ``status`` and the run's end."""
        write_key_arrays(self.dir / "keys.npy", arrays, rows)

    def recorded_unit_keys(self, units: int, rows: int) -> tuple[NpyRange, ...]:
        """The unit keys ``write_keys`` recorded (``units`` arrays of ``rows`` keys), each
        read from the file a slice at a time."""
        path = self.dir / "keys.npy"
        try:
            return tuple(NpyRange(path, unit * rows, rows) for unit in range(units))
        except (OSError, ValueError) as exc:
            raise OutputError(
                f"{path} (this run's keys) cannot be read ({exc}); rerun to write OUTPUT: "
                "every result is in the checkpoint"
            ) from None

    def recorded_keys(self) -> NpyRange | None:
        """Every unit key ``write_keys`` recorded, read a slice at a time (None: none)."""
        try:
            return NpyRange.whole(self.dir / "keys.npy")
        except (OSError, ValueError):
            return None

    def results_at(self, index: ResultIndex, positions: np.ndarray) -> list[RowResult]:
        """The stored results at ``positions`` of ``index``, in the order of ``positions``
        (a rare path: reads whole parts, each once)."""
        out: list[RowResult | None] = [None] * len(positions)
        parts, rows = index.locate(positions)
        for number in np.unique(parts):
            part = self.read_part(int(number))
            for i in np.flatnonzero(parts == number):
                out[i] = row_result(part.slice(int(rows[i]), 1).to_pylist()[0])
        return [result for result in out if result is not None]

    # -- saved key pass and index: a resume starts from them -----------------------------

    def save_key_pass(self, staged: Path) -> None:
        """Keep the key pass written at ``staged`` (``saved_arrays.staged_key_pass``)."""
        take_in(staged, self.dir / "input-keys.arrays")
        (self.dir / "input-keys.npz").unlink(missing_ok=True)  # an older layout's

    def load_key_pass(self) -> KeyPass | None:
        """The saved key pass, or None when there is none or it is unreadable."""
        return read_key_pass(self.dir / "input-keys.arrays")

    def load_index(self) -> ResultIndex:
        """The latest result per key over all parts: the saved index (``save_index``)
        plus the parts written after it (a resume does not re-read every part), in a file
        (``result_index``) written beside the parts under a temporary name, removed when
        the index is let go of unless ``save_index`` keeps it. Memory: see ``index_build``."""
        self._part_paths()
        self._indexed = dict(self._paths)  # what save_index may claim (shards add parts)
        index, self.parts_read = index_of(self._indexed, self.dir / INDEX_FILE, self._index_temp)
        index.scratch = self._scratch()
        return index

    def _scratch(self) -> Path | None:
        """Where an index and a lookup's temporary files go: beside the parts while locked
        (a run keeps its index by a rename), else $TMPDIR (None: for ``status``, whose files
        beside the parts a run starting meanwhile would remove)."""
        return self.dir if self.locked and os.access(self.dir, os.W_OK) else None

    def _index_temp(self) -> Path:
        name = f".index.{os.getpid()}.{next(_INDEX_BUILDS)}.tmp"
        return (self._scratch() or Path(tempfile.gettempdir())) / name

    def save_index(self, index: ResultIndex) -> None:
        """Keep ``index`` (built by the last ``load_index``) for the next one: it covers the
        parts that load read, not a part another shard wrote since."""
        if index.file is not None and index.temporary:
            index.keep_as(self.dir / INDEX_FILE)
            fsync_dir(self.dir)
            (self.dir / "index.npz").unlink(missing_ok=True)  # an older layout's
