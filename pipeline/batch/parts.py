"""Asks -> batch part files: JSONL input files of the OpenAI Batch format, one model each,
cut by request count and bytes (``PartCaps``).

A line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``; the body
is exactly what an online run sends for the same row. ``custom_id`` is the result key in the
form the online run sends as ``X-Client-Request-Id`` (``bpp-`` + 16 hex digits): it matches
every provider's rule (``^[A-Za-z0-9_-]{1,64}$``) and is unique by construction (one line per
result key). A part file is complete on disk (``atomic.atomic_write``) before the journal names it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..asks import Ask
from ..atomic import atomic_write
from ..records import Message, request_id_of
from ..samples import plan_requests

ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000  # OpenAI's cap per batch
MAX_BYTES = 190_000_000  # under the 200 MB cap however it is counted (BATCH-API.md 1.3)


@dataclass(frozen=True, slots=True)
class PartCaps:
    """Where a part is cut."""

    requests: int = MAX_REQUESTS
    bytes: int = MAX_BYTES


def custom_id(key: int) -> str:
    return request_id_of(key)


def key_of(custom_id: str) -> int | None:
    """The result key a ``custom_id`` names; None for one that is not ours."""
    if not custom_id.startswith("bpp-") or len(custom_id) != 20:
        return None
    try:
        return int(custom_id[4:], 16)
    except ValueError:
        return None


def request_line(key: int, model: str, messages: list[Message], params: dict[str, Any]) -> bytes:
    body = {"model": model, "messages": messages, **params}
    line = {"custom_id": custom_id(key), "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


def ask_lines(ask: Ask, n: int, base_seed: int) -> list[tuple[int, bytes]]:
    """(result key, request line) of every sample ``ask`` needs: one line each, seeded as
    ``--n-mode seeds`` sends them when ``n`` > 1 (a batch cannot find out whether the
    server honours ``n``)."""
    keys = ask.keys
    if n == 1:
        return [(keys[0], request_line(keys[0], ask.model, ask.messages, ask.params))]
    samples = [sample for sample, _ in ask.samples]
    lines = []
    for request in plan_requests(samples, n=n, native=False, base_seed=base_seed):
        key = keys[request.samples[0]]
        params = {**ask.params, **request.params}
        lines.append((key, request_line(key, ask.model, ask.messages, params)))
    return lines


@dataclass
class WrittenPart:
    """A part file on disk, not yet in the journal."""

    name: str
    model: str
    lines: int


class PartWriter:
    """Writes lines into one open file per model and cuts a part at the caps."""

    def __init__(self, directory: Path, first_part: int, caps: PartCaps) -> None:
        self.directory = directory
        self.caps = caps
        self.next_part = first_part
        self.written: list[WrittenPart] = []
        self._open: dict[str, tuple[IO[bytes], Path, int, int]] = {}  # model -> (fh, tmp, n, size)
        self._numbers: dict[str, int] = {}  # model -> number of its open part

    def add(self, model: str, line: bytes) -> None:
        entry = self._open.get(model)
        if entry is not None:
            _, _, count, size = entry
            if count + 1 > self.caps.requests or size + len(line) > self.caps.bytes:
                self._close(model)
                entry = None
        if entry is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".part-{self.next_part:06d}.jsonl.tmp"
            entry = (open(tmp, "wb"), tmp, 0, 0)  # noqa: SIM115 (closed in _close)
            self._open[model] = entry
            self._numbers[model] = self.next_part
            self.next_part += 1
        fh, tmp, count, size = entry
        fh.write(line)
        self._open[model] = (fh, tmp, count + 1, size + len(line))

    def finish(self) -> list[WrittenPart]:
        for model in list(self._open):
            self._close(model)
        return self.written

    def _close(self, model: str) -> None:
        fh, tmp, count, _ = self._open.pop(model)
        fh.close()
        name = f"part-{self._numbers[model]:06d}.jsonl"
        with atomic_write(self.directory / name, temp=tmp):
            pass  # written line by line already: fsync, rename, fsync the directory
        self.written.append(WrittenPart(name, model, count))


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(result key, line) of every line of a part file."""
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            key = _line_key(line)
            if key is not None:
                yield key, line


_OURS = b'{"custom_id": "'  # how request_line begins each line it writes


def _line_key(line: bytes) -> int | None:
    """The result key of a part file's line: read from where request_line puts it, or from
    the parsed line when it is written otherwise."""
    start = len(_OURS)
    if line.startswith(_OURS) and line[start + 20 : start + 21] == b'"':
        return key_of(line[start : start + 20].decode("ascii", "replace"))
    data = json.loads(line)
    return key_of(str(data.get("custom_id", ""))) if isinstance(data, dict) else None
