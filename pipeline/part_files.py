"""Checkpoint part files: their names (``part-NNNNNN-<crc32>.parquet``) and the checks that
tell a whole part of this job from a damaged or foreign one (checksum in the name, a
readable Parquet footer, the part schema, the job in its metadata). Reads only."""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import PART_SCHEMA

PART_NAME = re.compile(r"part-(\d{6,})(?:-([0-9a-f]{8}))?\.parquet")


def part_number(path: Path) -> int | None:
    """The number of a part file, or None when the name is not a part's."""
    match = PART_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def identified(metadata: dict[bytes, bytes] | None) -> bool:
    """Whether a part's metadata names its job (parts of this version do)."""
    return bool(metadata) and b"bpp.fingerprint" in (metadata or {})


def names_digest(paths: Iterable[Path]) -> str:
    return hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()


def checksum_problem(path: Path, data: bytes) -> str | None:
    match = PART_NAME.fullmatch(path.name)
    if match is None or match.group(2) is None:
        return None  # an older part: no checksum to compare
    if f"{zlib.crc32(data):08x}" != match.group(2):
        return "its bytes do not match the checksum in its name"
    return None


def part_problem(path: Path) -> tuple[str | None, dict[bytes, bytes] | None]:
    """(what is wrong with the part file, or None; its Parquet key-value metadata)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}", None
    if not data:
        return "empty file", None
    problem = checksum_problem(path, data)
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
