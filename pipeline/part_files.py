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

from .errors import FingerprintMismatch, OutputError
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


def job_from_parts(
    found: list[tuple[Path, str | None, dict[bytes, bytes] | None]],
    fingerprint: str | None,
    manifest_path: Path,
    output: Path,
) -> tuple[str | None, str | None]:
    """(fingerprint, job id) of a checkpoint without manifest.json: the job is the one the
    newest sound part of ``found`` ((path, problem, metadata)) names, and its settings must
    be this run's (``fingerprint``); parts that cannot say (older format) refuse the run."""
    sound = [(path, meta) for path, problem, meta in found if problem is None]
    if not sound or fingerprint is None:  # nothing to prove, or no run to prove it to
        return (fingerprint, None)
    legacy = [path for path, meta in sound if meta is None or b"bpp.fingerprint" not in meta]
    if legacy:
        raise OutputError(
            f"{manifest_path} is missing and {len(legacy)} checkpoint part(s) of an "
            "older format cannot prove the settings they were made with. Restore "
            "manifest.json, or add --restart to start over (the old checkpoint is kept)."
        )
    meta = sound[-1][1]
    assert meta is not None
    part_fp = meta[b"bpp.fingerprint"].decode()
    if part_fp != fingerprint:
        raise FingerprintMismatch(
            f"{output}: manifest.json is missing, and the checkpoint's parts were "
            f"made with other settings that change responses (fingerprint {part_fp}, "
            f"this run {fingerprint}). Run with the old settings to resume, or add "
            "--restart to start over (the old checkpoint is kept as a backup)."
        )
    return (part_fp, meta.get(b"bpp.job", b"").decode() or None)
