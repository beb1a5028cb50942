"""The one atomic write: all or nothing, no temp file left, the directory fsynced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_write_replaces_the_file_and_syncs_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)
    seen: list[bytes] = []
    target = tmp_path / "f.bin"
    with atomic.atomic_write(target, before_replace=lambda t: seen.append(t.read_bytes())) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and seen == [b"new"]
    assert synced == [tmp_path]
    atomic.write_bytes(target, b"newer")
    assert target.read_bytes() == b"newer" and synced == [tmp_path, tmp_path]
    assert os.listdir(tmp_path) == ["f.bin"]


def test_sync_dir_false_skips_the_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)
    with atomic.atomic_write(tmp_path / "f", sync_dir=False) as tmp:
        tmp.write_bytes(b"x")
    assert synced == []
