"""The locks of a checkpoint: one live run per OUTPUT, or one live run per shard.

``RunLock``: an exclusive ``flock`` held for the whole run (``OUTPUT.checkpoint/lock``); the
file says who holds it (pid, host, since when), and a lock left by a run that is gone
(SIGKILL, a crash) is taken over with a note. Shards of a job hold the run lock shared (so a
run of the whole job cannot start beside them) and their own shard lock exclusively.
``WaitLock``: a short exclusive hold that shards take in turn (``setup.lock``) to start and
to finish (manifest, OUTPUT). A process that dies releases every ``flock`` it held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from .errors import LockHeld


class RunLock:
    """The lock file at ``path`` of the checkpoint of ``output``."""

    def __init__(self, path: Path, output: Path, what: str = "") -> None:
        self.path = path
        self.output = output
        self.what = what  # e.g. "shard 1/4 of": says whose lock it is in an error
        self._file: IO[str] | None = None

    def acquire_shared(self) -> bool:
        """Hold the lock shared (a shard's hold); returns True when no other run held it,
        i.e. this is the only live run of the checkpoint. Raises ``LockHeld`` when a run of
        the whole job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        alone = True
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                alone = False
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            else:
                # from exclusive to shared (not atomic: a run that slips in is refused)
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockHeld(
                f"A run of the whole job is writing {self.output} ({holder}). Wait for it "
                "to finish, or stop it; a shard beside it would send rows twice."
            ) from None
        self._file = fh
        return alone

    def acquire(self) -> str | None:
        """Take the lock. Returns a note when a dead run's lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            whose = f"{self.what} {self.output}" if self.what else str(self.output)
            raise LockHeld(
                f"Another run is writing {whose} ({holder}). Wait for it to finish, "
                "or stop it; two runs on one OUTPUT would send rows twice."
            ) from None
        fh.seek(0)
        previous = fh.read().strip()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.ctime()}\n")
        fh.flush()
        self._file = fh
        if previous:
            return f"took over the lock left by a run that is gone ({previous})"
        return None

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def lock_holder(path: Path) -> str | None:
    """Who holds the lock at ``path`` now, or None."""
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


class WaitLock:
    """An exclusive ``flock`` on ``path`` that ``hold`` waits for (shards take it in turn)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def hold(self, poll: float = 0.05) -> None:
        """Wait until the lock is free, then hold it (a no-op when held already)."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    fh.close()
                    raise
                time.sleep(poll)
        self._file = fh

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
