"""The run lock of a checkpoint (``OUTPUT.checkpoint/lock``): one live run per OUTPUT.

An exclusive ``flock`` held for the whole run; the file says who holds it (pid, host, since
when), and a lock left by a run that is gone (SIGKILL, a crash) is taken over with a note.
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

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self.output = output
        self._file: IO[str] | None = None

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
