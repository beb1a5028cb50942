"""The rescue place: answers received when the checkpoint could not be written (disk full,
read-only), kept outside it until the next run of the same OUTPUT takes them in.

``RescuePlace`` owns where that is (``$TMPDIR/pipeline-rescue-<uid>/<hash of the checkpoint
and shard>/``, private to the user: most often another filesystem), how a rescued part and its
identity (checkpoint, job, last part written before it) are saved, and whether a later run may
use them. It does not encode parts nor number them: ``checkpoint`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .atomic import write_bytes


class RescuePlace:
    """The rescue place of the checkpoint at ``checkpoint_dir`` (of one shard, if named)."""

    def __init__(self, checkpoint_dir: Path, shard_name: str | None = None) -> None:
        self.checkpoint = str(checkpoint_dir.resolve())
        place = self.checkpoint + (f"#{shard_name}" if shard_name else "")
        tag = hashlib.sha256(place.encode()).hexdigest()[:16]
        self.path = Path(tempfile.gettempdir()) / f"pipeline-rescue-{os.getuid()}" / tag

    def parts(self) -> list[Path]:
        """The rescued parts, oldest first."""
        return sorted(self.path.glob("rescued-*.parquet"))

    def save(self, data: bytes, identity: dict[str, Any]) -> Path:
        """Keep a part's bytes, and beside them what proves whose they are."""
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        path = self.path / f"rescued-{time.time_ns()}-{os.getpid()}.parquet"
        write_bytes(path, data)
        identity = {"checkpoint": self.checkpoint, **identity}
        write_bytes(self.path / "identity.json", json.dumps(identity).encode())
        return path

    def problem(self, manifest: dict[str, Any], after_part: int) -> str | None:
        """Why the rescued parts may not be taken in by the job of ``manifest`` whose last
        part is ``after_part`` (None: they may)."""
        info = self.path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return f"{self.path} is not private to this user"
        try:
            identity = json.loads((self.path / "identity.json").read_text())
        except (OSError, ValueError):
            return "no readable identity.json beside them"
        if identity.get("checkpoint") != self.checkpoint:
            return "they belong to another checkpoint"
        if not manifest or any(
            identity.get(name) != manifest.get(name) for name in ("fingerprint", "created_at")
        ):
            return "they belong to another job: the checkpoint was started again since"
        if after_part != identity.get("after_part"):
            return "parts were written since, so they are older than what is here"
        return None

    def move_to(self, target: Path) -> None:
        """Move the whole place (parts and identity) to ``target``."""
        shutil.move(str(self.path), str(target))

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
