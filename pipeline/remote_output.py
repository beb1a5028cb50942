"""OUTPUT on object storage: ``-o s3://bucket/path/out.parquet`` (or any URI pyarrow's
filesystems write), with its checkpoint beside it as objects under ``out.parquet.checkpoint/``.

The run works on a local working copy (``$PIPELINE_WORK_DIR`` or
``$TMPDIR/pipeline-output-<uid>``, then a folder per URI) exactly as on a local OUTPUT, and
this module keeps the store in step using only what object stores guarantee (an object
appears whole or not at all on PUT; listing):

- ``pull`` before the run (and before a shard counts the job's results at its end): every
  checkpoint object the working copy lacks is downloaded (part files by name: a part is
  written once and never changed, its CRC-32 in its name; the manifest and the shard records,
  which are small and replaced whole), and local parts the store lacks (written by a run on
  this host killed before it uploaded them) are uploaded;
- ``publish(path)`` as each part, the manifest or a shard record is written: the file is
  PUT to the store before the write returns, so a result is recorded once its part's PUT is
  done (a run killed before that sends those rows again: they count as in flight);
- ``push_output`` at the end: OUTPUT, written locally first (atomically), is PUT whole.
  A reader of the store sees the old OUTPUT or the new one, never part of one.

What this does not do: lock. Object stores offer no lock this relies on, so two runs of the
same OUTPUT (or of the same shard) at once on different hosts are not refused as they are on
one filesystem; the scheduler (one process per shard index) must ensure it. Runs on one host
share the working copy and its locks. The ``batch`` journal and ``--engine ray`` need a
shared filesystem and are refused here. Credentials come from the store's standard variables
(for S3: ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...), read by pyarrow;
never logged, printed or written; URIs are shown with user info masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import atomic_write
from .errors import OutputError, UsageError
from .remote_input import CHUNK, is_uri
from .remote_input import shown as shown

# what a working copy shares with the store (relative to OUTPUT.checkpoint/): results and
# the records that say what they are; never locks, caches of this host or temporary files
_SHARED = ("manifest.json", "parts/", "shards/")
_NOT_SHARED_SUFFIXES = (".lock", ".tmp", ".npz", ".npy")

_mirrors: dict[Path, RemoteOutput] = {}  # local checkpoint dir -> its store
_mirrors_lock = threading.Lock()


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def is_remote(output: object) -> bool:
    """True for an OUTPUT given as a URI other than ``file://``."""
    return isinstance(output, str) and is_uri(output) and not output.startswith("file://")


def _shared(relative: str) -> bool:
    return relative.startswith(_SHARED) and not relative.endswith(_NOT_SHARED_SUFFIXES)


class RemoteOutput:
    """One OUTPUT URI and its local working copy (see the module docstring)."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri
        try:
            self.fs, self.path = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"-o {shown(uri)}: cannot be opened: {_reason(exc)}") from None
        if not self.path.lower().endswith((".parquet", ".pq", ".parq")):
            raise UsageError(
                f"-o {shown(uri)}: OUTPUT is always a Parquet file; name it ending in .parquet."
            )
        base = os.environ.get("PIPELINE_WORK_DIR") or os.path.join(
            tempfile.gettempdir(), f"pipeline-output-{os.getuid()}"
        )
        folder = Path(base).absolute() / hashlib.sha256(uri.encode()).hexdigest()[:16]
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.local = folder / PurePosixPath(self.path).name
        self.checkpoint = Path(str(self.local) + ".checkpoint")
        self.remote_checkpoint = self.path + ".checkpoint"

    # -- the store ------------------------------------------------------------------------

    def _listing(self) -> dict[str, int]:
        """relative name -> size of every shared object under the remote checkpoint (one
        listing call per 1,000 objects)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.remote_checkpoint, recursive=True, allow_not_found=True)
        found: dict[str, int] = {}
        for info in self._call(self.fs.get_file_info, selector):
            if info.type == pafs.FileType.File:
                relative = info.path[len(self.remote_checkpoint) + 1 :]
                if _shared(relative):
                    found[relative] = info.size
        return found

    def _download(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if not local.name.startswith("part-"):  # replaced by other hosts: read as one version
            data = self._read_whole(remote)
            with atomic_write(local) as tmp:
                tmp.write_bytes(data)
            return
        with (
            self._call(self.fs.open_input_stream, remote) as source,
            atomic_write(local) as tmp,
            tmp.open("wb") as sink,
        ):
            while chunk := source.read(CHUNK):
                sink.write(chunk)

    def _read_whole(self, remote: str) -> bytes:
        """A small JSON object other hosts replace (the manifest, a shard record), read as
        one version. A read is a size lookup and then ranged requests: one that crosses a
        replace gets the new object cut at the old one's size (a shard once failed to start
        on such a manifest). Read again until the bytes parse and the size agrees."""
        for attempt in range(20):
            with self._call(self.fs.open_input_stream, remote) as source:
                data = source.read()
            if len(data) == self._call(self.fs.get_file_info, remote).size and _parses(data):
                return bytes(data)
            time.sleep(0.01 * (attempt + 1))
        raise OutputError(
            f"OUTPUT {shown(self.uri)}: {remote} keeps changing or is not JSON; is a run "
            "writing it, or is the store's checkpoint damaged?"
        )

    def _upload(self, local: Path, remote: str) -> None:
        with local.open("rb") as source, self._call(self.fs.open_output_stream, remote) as sink:
            while chunk := source.read(CHUNK):
                sink.write(chunk)

    def _call(self, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except (OSError, ValueError) as exc:  # pyarrow's errors: OSError / ArrowInvalid
            raise OutputError(
                f"OUTPUT {shown(self.uri)}: the store failed: {_reason(exc)}"
            ) from None

    # -- what a run calls -----------------------------------------------------------------

    def pull(self, *, overwrite: bool = False) -> None:
        """Bring the working copy up to date with the store, and the store with the parts
        only the working copy has. Refuses (``UsageError``) an OUTPUT object that no
        checkpoint in the store claims, unless ``overwrite``."""
        import pyarrow.fs as pafs

        bucket = self.path.split("/", 1)[0]
        if self._call(self.fs.get_file_info, bucket).type == pafs.FileType.NotFound:
            raise UsageError(
                f"-o {shown(self.uri)}: the bucket {bucket} does not exist (or these "
                "credentials cannot see it). Create it, or check AWS_ENDPOINT_URL and the keys."
            )
        remote = self._listing()
        self._set_aside_other_incarnation("manifest.json" in remote)
        if "manifest.json" not in remote and not overwrite:
            info = self._call(self.fs.get_file_info, self.path)
            if info.type == pafs.FileType.File:
                raise UsageError(
                    f"OUTPUT {shown(self.uri)} exists and no checkpoint in the store says a run "
                    "of ours wrote it. Refusing to replace it: pass --overwrite, or choose "
                    "another -o."
                )
        for relative in sorted(remote):
            local = self.checkpoint / relative
            if relative.startswith("parts/"):  # immutable, its CRC-32 in its name
                aside = self.checkpoint / "quarantine" / local.name  # found damaged here
                if local.exists() or aside.exists():
                    continue
            # the manifest and shard records: small, replaced whole; the store's is the latest
            self._download(f"{self.remote_checkpoint}/{relative}", local)
        if self.checkpoint.exists():
            for local in sorted(self.checkpoint.glob("parts/part-*.parquet")):
                relative = local.relative_to(self.checkpoint).as_posix()
                if relative not in remote:  # written here by a run killed before its PUT
                    self._upload(local, f"{self.remote_checkpoint}/{relative}")
        self._drop_stale_output()

    def _read_remote_manifest(self) -> dict[str, Any]:
        import json

        data = json.loads(self._read_whole(f"{self.remote_checkpoint}/manifest.json"))
        return data if isinstance(data, dict) else {}

    def _set_aside_other_incarnation(self, stored: bool) -> None:
        """A working copy is kept only while it is a copy of the store's checkpoint: same job
        id and creation time in both manifests. Otherwise (the store's checkpoint was deleted
        to start over, or another host created the job first) it is renamed aside, kept and
        never read, and rebuilt from the store: its results of another incarnation must
        neither be read here nor uploaded there. Not while a run on this host holds it."""
        from .checkpoint import Checkpoint
        from .shards import shard_holders

        local = Checkpoint(self.local).read_manifest() if self.checkpoint.exists() else {}
        if not local:
            return
        if stored:
            remote = self._read_remote_manifest()
            same = all(local.get(k) == remote.get(k) for k in ("job_id", "created_at"))
            if same:
                return
        if Checkpoint.lock_holder(self.local) or shard_holders(self.checkpoint):
            return  # a run here has it open: its next pull decides
        aside = self.checkpoint.with_name(f"{self.checkpoint.name}.aside-{time.time_ns()}")
        os.replace(self.checkpoint, aside)
        if self.local.exists():
            self.local.unlink()

    def _drop_stale_output(self) -> None:
        """The working copy's OUTPUT is a cache of the store's: one the (pulled) manifest
        does not know is removed, so it is neither taken for the user's file nor kept."""
        from .checkpoint import Checkpoint

        if self.local.exists() and not Checkpoint(self.local).output_is_ours():
            self.local.unlink()

    def publish(self, path: Path) -> None:
        """PUT one file of the working copy's checkpoint (a part, the manifest, a record)."""
        relative = path.relative_to(self.checkpoint).as_posix()
        if _shared(relative):
            self._upload(path, f"{self.remote_checkpoint}/{relative}")

    def output_stored(self) -> bool:
        """True when the store holds OUTPUT and a checkpoint there (ours, as ``pull`` checks)."""
        import pyarrow.fs as pafs

        found = self._call(
            self.fs.get_file_info, [self.path, self.remote_checkpoint + "/manifest.json"]
        )
        return all(info.type == pafs.FileType.File for info in found)

    def push_output(self, before: dict[str, int] | None) -> None:
        """PUT OUTPUT when this run wrote it (its size or mtime changed since ``before``),
        or when the store lacks it (an earlier PUT failed)."""
        import pyarrow.fs as pafs

        from .checkpoint import file_signature

        now = file_signature(self.local)
        if now is None:
            return
        if now != before or (
            self._call(self.fs.get_file_info, self.path).type == pafs.FileType.NotFound
        ):
            self._upload(self.local, self.path)


def check_supported(config: Any, uri: str) -> None:
    """Refuse (``UsageError``) what needs OUTPUT on a filesystem."""
    what = None
    if config.batch:
        what = "--batch (its journal is appended to)"
    elif config.restart:
        what = (
            "--restart (it sets aside a folder; to start over on object storage, delete the "
            "prefix OUTPUT.checkpoint/)"
        )
    elif config.engine == "ray":
        what = "--engine ray (its actors share one checkpoint folder)"
    if what is not None:
        raise UsageError(
            f"-o {shown(uri)}: {what} needs OUTPUT on a filesystem: use a local or shared -o."
        )


def shown_output(output: Path) -> str:
    """How messages name OUTPUT: the URI of a working copy, else the path."""
    mirror = _mirrors.get(Path(str(output) + ".checkpoint"))
    return shown(mirror.uri) if mirror is not None else str(output)


def job_id_for(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The job id of a new job on object storage: the same on every host (from the URI and
    the fingerprint), so that shards that create the job at once on several hosts agree on
    it; None for a local checkpoint (a random id there)."""
    mirror = _mirrors.get(checkpoint_dir)
    if mirror is None:
        return None
    return hashlib.sha256(f"{mirror.uri}\n{fingerprint}".encode()).hexdigest()[:32]


def mirror_of(checkpoint_dir: Path) -> RemoteOutput | None:
    """The store a working copy's checkpoint mirrors to, if it is one."""
    return _mirrors.get(checkpoint_dir)


def publish(path: Path, checkpoint_dir: Path) -> None:
    """Called after a checkpoint file is written: PUT it when its checkpoint is mirrored."""
    mirror = _mirrors.get(checkpoint_dir)
    if mirror is not None:
        mirror.publish(path)


def pull(checkpoint_dir: Path) -> None:
    """Fetch what other hosts' runs recorded since (before results are counted)."""
    mirror = _mirrors.get(checkpoint_dir)
    if mirror is not None:
        mirror.pull(overwrite=True)


@contextlib.contextmanager
def working_copy(
    uri: str, *, overwrite: bool = False, publish_output: bool = True
) -> Iterator[Path]:
    """The local OUTPUT path to run on, mirrored to ``uri`` while the block runs; OUTPUT is
    PUT at the end (also when the block raises: a stopped run's OUTPUT has what is done)."""
    mirror = RemoteOutput(uri)
    with _mirrors_lock:
        if mirror.checkpoint in _mirrors:
            raise UsageError(f"OUTPUT {shown(uri)} is already open in this process.")
        _mirrors[mirror.checkpoint] = mirror
    try:
        mirror.pull(overwrite=overwrite)
        from .checkpoint import file_signature

        before = file_signature(mirror.local)
        try:
            yield mirror.local
        finally:
            if publish_output:
                mirror.push_output(before)
    finally:
        with _mirrors_lock:
            _mirrors.pop(mirror.checkpoint, None)


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
