"""The .npz files a checkpoint keeps beside its parts: the result index (``index.npz``,
see ``result_index``) and the input's key pass (``input-keys.npz``, see ``keys.KeyPass``).
Each is arrays plus JSON metadata, written atomically; a missing or damaged one reads as
None (it is a cache: the next run rebuilds it)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .keys import KeyPass

KEY_PASS_VERSION = 1


def save_arrays(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """An .npz of ``arrays`` plus ``meta`` as JSON, written atomically (temp, fsync, rename)."""
    encoded = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_write(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, meta=encoded, **arrays)  # type: ignore[arg-type]


def load_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """What ``save_arrays`` wrote, or None when it is missing or damaged."""
    try:
        # our own handle: np.load leaks the one it opens when the zip is damaged
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return meta, arrays


def save_key_pass(path: Path, key_pass: KeyPass) -> None:
    meta = {
        "version": KEY_PASS_VERSION,
        "params": key_pass.params,
        "stat": key_pass.stat,
        "sha256": key_pass.sha256,
        "ends_with_newline": key_pass.ends_with_newline,
    }
    arrays = {"content": key_pass.content}
    if key_pass.ids is not None:
        arrays["ids"] = key_pass.ids
    save_arrays(path, meta, arrays)


def load_key_pass(path: Path) -> KeyPass | None:
    loaded = load_arrays(path)
    if loaded is None or loaded[0].get("version") != KEY_PASS_VERSION:
        return None
    meta, arrays = loaded
    content, ids = arrays.get("content"), arrays.get("ids")
    if content is None or (ids is not None and len(ids) != len(content)):
        return None
    try:
        return KeyPass(
            params=meta["params"],
            stat=meta["stat"],
            sha256=meta["sha256"],
            ends_with_newline=bool(meta["ends_with_newline"]),
            content=content.astype(np.uint64, copy=False),
            ids=None if ids is None else ids.astype(np.uint64, copy=False),
        )
    except KeyError:
        return None
