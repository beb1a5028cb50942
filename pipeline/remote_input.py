"""INPUT given as a URI: ``s3://``, ``gs://``, ``hdfs://``, ``file://`` or any other scheme
pyarrow's filesystems read (``pyarrow.fs.FileSystem.from_uri``).

Owns turning such a URI into a local file the reader can scan: it is copied once, whole,
into a private cache (``$TMPDIR/pipeline-input-<uid>/<hash of the URI>/``) and used again by
the next run while the object's size and modification time are unchanged, so a resume asks
the store for those two only and downloads nothing. ``file://`` URIs need no copy. Endpoint,
region and credentials come from the store's standard variables (for S3:
``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, or the AWS config files), read by pyarrow; this module never
logs, prints or writes them, and names a URI with its user info masked. It parses no rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from .atomic import atomic_write, write_bytes
from .errors import InputError
from .proxy import mask_credentials

URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
CHUNK = 8 << 20


def is_uri(text: object) -> bool:
    """True for ``scheme://...`` (a Windows drive letter or a plain path is not one)."""
    return isinstance(text, str) and URI.match(text) is not None


def shown(uri: str) -> str:
    """The URI as messages and the manifest name it: any user info masked."""
    return mask_credentials(uri)


def local_copy(uri: str) -> Path:
    """The local file holding ``uri``'s bytes (see the module docstring). Raises
    ``InputError`` naming the URI when it cannot be read."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError, TypeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"Input {shown(uri)} cannot be opened: {_reason(exc)}") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"Input {shown(uri)} does not exist.")
    if info.type != pafs.FileType.File:
        raise InputError(f"Input {shown(uri)} is a directory; give one .csv/.parquet/.jsonl.")
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    place = Path(tempfile.gettempdir()) / f"pipeline-input-{os.getuid()}"
    place.mkdir(mode=0o700, exist_ok=True)
    folder = place / hashlib.sha256(uri.encode()).hexdigest()[:16]
    folder.mkdir(mode=0o700, exist_ok=True)
    local = folder / (Path(path).name or "input")
    stamp = {"size": info.size, "mtime_ns": info.mtime_ns}
    stamp_path = folder / "stamp.json"
    try:
        if local.exists() and json.loads(stamp_path.read_text()) == stamp:
            return local
    except (OSError, ValueError):
        pass
    try:
        with (
            fs.open_input_stream(path) as source,
            atomic_write(local) as tmp,
            tmp.open("wb") as sink,
        ):
            while chunk := source.read(CHUNK):
                sink.write(chunk)
    except (OSError, ValueError) as exc:
        raise InputError(f"Input {shown(uri)} cannot be read: {_reason(exc)}") from None
    write_bytes(stamp_path, json.dumps(stamp).encode())
    return local


def _reason(exc: BaseException) -> str:
    """pyarrow's message, on one line, without user info."""
    return mask_credentials(" ".join(str(exc).split()))[:300]
