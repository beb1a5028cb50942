"""A response cache on disk, shared across runs and outputs: request -> the 200 body received.

Owns the cache directory (``--cache DIR``): the key of a request, the entry format, atomic
writes, corrupt-entry handling, ``stats`` and ``prune``. It does not decide when to use the
cache; the runner does.

Key. ``sha256("bpp-cache-v1" NUL base-url NUL canonical-body)`` in hex, where

- *base-url* is normalised: scheme and host lower-cased, user:password@ and the default port
  dropped, trailing ``/`` of the path dropped, query kept;
- *canonical-body* is the body parsed as JSON and dumped with sorted object keys, no
  whitespace and UTF-8 text (so key order and spacing do not matter, while list order, every
  value and number spelling such as ``1`` vs ``1.0`` do); a body that is not JSON is used as
  is.

The API key is not an input of ``key`` (and credentials in the URL are dropped), so a cache
works with any key and no entry or file name is derived from one.

Layout::

    DIR/CACHEDIR.TAG          marks the directory as a cache for backup tools
    DIR/ab/abcdef....bin      one entry per key, in 256 shards by the first two hex digits
    DIR/ab/.abcdef....<pid>.<random>.tmp   a write in progress

An entry is ``BPPCACHE1\\n`` + one line of JSON (model, host, created, size, sha256 of the
body) + the response body exactly as received. Nothing else is stored: no request, no
headers, never the Authorization header. Writes go to a temporary file in the shard, are
fsynced and ``os.replace``-d into place, so concurrent runs putting the same key leave one
whole entry (the last), and a reader sees a whole entry or none. An entry that is truncated or
fails its checksum reads as a miss. An entry's age is the time since it was last written or
served (``get`` refreshes its mtime), so ``prune`` drops the least recently used first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .atomic import atomic_write

KEY_VERSION = b"bpp-cache-v1"
MAGIC = b"BPPCACHE1\n"
SUFFIX = ".bin"
# Meta fields an entry may carry (besides the ones the cache sets itself). An allow-list, so
# that nothing secret can be stored by accident.
META_FIELDS = frozenset({"model", "host", "response_id"})
STALE_TEMP_SECONDS = 3600.0  # a temp file this old belongs to a writer that died
_HEX = frozenset("0123456789abcdef")
_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file marks a batch-prompt-pipeline response cache (pipeline cache stats|prune).\n"
)


@functools.lru_cache(maxsize=64)
def normalise_base_url(base_url: str) -> str:
    """``HTTPS://User:Key@API.example.com:443/v1/`` -> ``https://api.example.com/v1``."""
    split = urlsplit(base_url.strip())
    scheme = split.scheme.lower()
    host = (split.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = split.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, split.path.rstrip("/"), split.query, ""))


def canonical_json(data: Any) -> bytes:
    """``data`` as canonical JSON bytes: sorted keys, no whitespace, UTF-8 text.

    A request body built with this is already canonical: pass ``canonical=True`` to
    ``request_key`` and the body is hashed without being parsed again.
    """
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )


def canonical_body(body: bytes) -> bytes:
    """The body as canonical JSON (see ``canonical_json``); non-JSON bytes unchanged."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    return canonical_json(data)


def request_key(base_url: str, body: bytes, *, canonical: bool = False) -> str:
    """The cache key of a request (see the module docstring); also fit for deduplication.

    ``canonical=True`` promises that ``body`` came from ``canonical_json`` and skips the
    re-parse (about three times faster); a wrong promise only costs cache hits.
    """
    digest = hashlib.sha256(KEY_VERSION)
    digest.update(b"\0" + normalise_base_url(base_url).encode("utf-8") + b"\0")
    digest.update(body if canonical else canonical_body(body))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    size: int
    mtime: float


class ResponseCache:
    """The response cache in directory ``root`` (created on the first ``put``).

    ``clock`` gives the current time in seconds since the epoch (injectable for tests).
    """

    def __init__(self, root: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock

    key = staticmethod(request_key)

    def path_for(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        if len(key) != 64 or not _HEX.issuperset(key):
            raise ValueError(f"not a cache key (64 lower-case hex digits): {key!r}")
        return self.root / key[:2] / (key + SUFFIX)

    def contains(self, key: str) -> bool:
        """True when an entry file exists (cheap: a corrupt entry still counts)."""
        return self.path_for(key).is_file()

    def keys(self) -> set[str]:
        """Every key with an entry file now: a snapshot for fast membership tests (estimates)."""
        return {f.path.name[: -len(SUFFIX)] for f in self._scan()[0]}

    def get(self, key: str) -> bytes | None:
        """The response body stored for ``key``, or None (missing, partial or corrupt)."""
        found = self.get_entry(key)
        return None if found is None else found[0]

    def get_entry(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        """(body, meta) stored for ``key``, or None; a hit refreshes the entry's age."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        parsed = _parse_entry(data)
        if parsed is not None:
            now = self.clock()
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
        return parsed

    def put(self, key: str, content: bytes, meta: Mapping[str, Any] | None = None) -> None:
        """Store ``content`` (a 200 response body) for ``key``, atomically.

        ``meta`` may hold only ``model``, ``host`` and ``response_id`` (short strings);
        ``base_url`` is accepted and stored as its host name only. Anything else is a
        ValueError, so that no header or key can end up in the cache.
        """
        created = self.clock()
        header = {
            "v": 1,
            "created": created,
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            **_clean_meta(meta or {}),
        }
        data = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + content
        path = self.path_for(key)
        self._ensure_root()
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # No directory fsync: after a power cut an entry may be missing, never half there.
        with atomic_write(path, temp=tmp, sync_dir=False):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.utime(tmp, (created, created))  # an entry's age runs on the cache's clock

    def stats(self) -> dict[str, Any]:
        """entries, bytes, oldest/newest (last use, epoch seconds) and temporary files."""
        files, temps = self._scan()
        mtimes = [f.mtime for f in files]
        return {
            "root": str(self.root),
            "entries": len(files),
            "bytes": sum(f.size for f in files),
            "oldest": min(mtimes) if mtimes else None,
            "newest": max(mtimes) if mtimes else None,
            "temp_files": len(temps),
        }

    def prune(
        self, older_than_seconds: float | None = None, max_bytes: int | None = None
    ) -> dict[str, int]:
        """Remove entries unused for ``older_than_seconds``, then the least recently used
        until the rest fit in ``max_bytes``; also temp files of writers that died.

        Returns removed / removed_bytes / entries / bytes (what is left) / temp_removed.
        """
        if older_than_seconds is not None and older_than_seconds < 0:
            raise ValueError("older_than_seconds must be 0 or more")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be 0 or more")
        now = self.clock()
        files, temps = self._scan()
        files.sort(key=lambda f: (f.mtime, f.path.name))
        doomed: list[_File] = []
        if older_than_seconds is not None:
            cutoff = now - older_than_seconds
            doomed = [f for f in files if f.mtime < cutoff]
            files = files[len(doomed) :]  # sorted by mtime, so the old ones lead
        if max_bytes is not None:
            total = sum(f.size for f in files)
            while files and total > max_bytes:
                oldest = files.pop(0)
                doomed.append(oldest)
                total -= oldest.size
        removed = removed_bytes = 0
        for entry in doomed:
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
                removed += 1
                removed_bytes += entry.size
        temp_removed = 0
        for temp in temps:
            if now - temp.mtime > STALE_TEMP_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    temp.path.unlink()
                    temp_removed += 1
        return {
            "removed": removed,
            "removed_bytes": removed_bytes,
            "entries": len(files),
            "bytes": sum(f.size for f in files),
            "temp_removed": temp_removed,
        }

    # -- internals ------------------------------------------------------------------------

    def _ensure_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            with contextlib.suppress(OSError):
                tag.write_bytes(_CACHEDIR_TAG)

    def _scan(self) -> tuple[list[_File], list[_File]]:
        """(entries, temporary files) with size and mtime; vanishing files are skipped."""
        files: list[_File] = []
        temps: list[_File] = []
        for shard in _scandir(self.root):
            if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                continue
            for item in _scandir(Path(shard.path)):
                is_temp = item.name.startswith(".") and item.name.endswith(".tmp")
                if not is_temp and not item.name.endswith(SUFFIX):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                (temps if is_temp else files).append(
                    _File(Path(item.path), st.st_size, st.st_mtime)
                )
        return files, temps


def _scandir(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


def _clean_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in meta.items():
        if name == "base_url":
            name, value = "host", urlsplit(str(value)).hostname
        if name not in META_FIELDS:
            raise ValueError(
                f"cache meta field {name!r} is not stored; allowed: "
                f"{', '.join(sorted(META_FIELDS | {'base_url'}))}"
            )
        if value is not None and not isinstance(value, str):
            raise ValueError(f"cache meta field {name!r} must be a string or None")
        out[name] = None if value is None else value[:200]
    return out


def _parse_entry(data: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """(body, meta) of a stored entry, or None when it is not a whole, intact entry."""
    if not data.startswith(MAGIC):
        return None
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        return None
    try:
        meta = json.loads(data[len(MAGIC) : end])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    body = data[end + 1 :]
    if meta.get("size") != len(body) or meta.get("sha256") != hashlib.sha256(body).hexdigest():
        return None
    return body, meta
