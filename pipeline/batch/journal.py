"""The batch journal: ``batches.jsonl`` in the checkpoint directory, one JSON event a line,
appended and fsynced before the step it announces (intent) or right after it (result).

Replaying it gives each part's state, so a run killed at any instant resumes where it was:

    part (file written) -> upload -> uploaded(file_id) -> create(attempt, t0)
      -> created(batch_id) -> ended(status, files) -> merged

(``polled`` when a poll saw a new provider status or new request counts, for ``pipeline
status``; ``requeue`` after a batch refused for the enqueued-token limit: it is created again;
``cancelled`` when the user cancels the part, written before the provider is asked, and
``kept`` when the provider refused because the batch had ended: collected as usual.)

An ``upload`` without ``uploaded`` is uploaded again (an orphan file costs nothing). A
``create`` without ``created`` is the window where a batch may exist without us knowing its
id: the executor looks for it by its metadata tag before creating again. A torn last line
(a kill during the append) is ignored: its step had not happened yet.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_NAME = "batches.jsonl"


@dataclass
class PartState:
    """What the journal says of one part."""

    part: int
    model: str = ""
    file: str = ""  # the part's input file, in the batch directory
    lines: int = 0
    round: int = 1  # 1 for asks; n for lines sent again the (n-1)th time
    attempt: int = 0  # the create attempt last announced
    file_id: str | None = None
    uploading: bool = False  # an upload announced and not confirmed
    creating: float | None = None  # t0 of a create announced and not confirmed
    batch_id: str | None = None
    status: str | None = None  # the batch's terminal status, once ended
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[Any] = field(default_factory=list)
    merged: bool = False
    cancelled: bool = False  # by the user (pipeline batch cancel): never resubmitted
    created_at: float | None = None  # when the batch was created (time.time())
    dialect: str | None = None  # the Batch API that holds it (openai, anthropic, aimlapi)
    remote_status: str | None = None  # the provider's word for it when last polled
    completed: int | None = None  # its request counts when last polled
    failed: int | None = None
    total: int | None = None

    @property
    def stage(self) -> str:
        """Where the part is, in a word: the batch's terminal status once it ended."""
        if self.merged:
            return "merged"
        if self.status is not None:
            return self.status
        if self.batch_id is not None:
            return "submitted"
        if self.creating is not None:
            return "creating"
        if self.file_id is not None or self.uploading:
            return "uploading"
        return "written"

    @property
    def open(self) -> bool:
        """Its lines still wait for an answer from this part."""
        return not self.merged


class Journal:
    """Appends events and replays them (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME

    def append(self, event: str, part: int, **fields: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"event": event, "part": part, "t": time.time(), **fields})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def replay(self) -> dict[int, PartState]:
        parts: dict[int, PartState] = {}
        if not self.path.exists():
            return parts
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a torn last line: its step never happened
            state = parts.setdefault(event["part"], PartState(event["part"]))
            _apply(state, event)
        return parts

    def next_part(self) -> int:
        parts = self.replay()
        return max(parts, default=0) + 1


def _apply(state: PartState, event: dict[str, Any]) -> None:
    kind = event["event"]
    if kind == "part":
        state.model, state.file, state.lines = event["model"], event["file"], event["lines"]
        state.round = event.get("round", 1)
    elif kind == "upload":
        state.uploading = True
    elif kind == "uploaded":
        state.uploading, state.file_id = False, event["file_id"]
    elif kind == "create":
        state.attempt, state.creating = event["attempt"], event["t0"]
    elif kind == "created":
        state.creating, state.batch_id = None, event["batch_id"]
        state.created_at, state.dialect = event.get("t"), event.get("dialect")
        state.remote_status = state.completed = state.failed = state.total = None
    elif kind == "polled":  # a poll saw a new status or new counts (for pipeline status)
        _progress(state, event)
    elif kind == "ended":
        _progress(state, event)
        state.status = event["status"]
        state.output_file_id = event.get("output_file_id")
        state.error_file_id = event.get("error_file_id")
        state.errors = event.get("errors") or []
    elif kind == "refused":  # a create refused outright: nothing was created
        state.creating = None
    elif kind == "requeue":  # refused for the enqueued-token limit: create again
        state.batch_id, state.status, state.creating = None, None, None
    elif kind == "merged":
        state.merged = True
    elif kind == "cancelled":
        state.cancelled = True
    elif kind == "kept":  # the cancel came too late: the batch had ended
        state.cancelled = False


def batch_tag(job: str, part: int, attempt: int) -> dict[str, str]:
    """The metadata a create carries, by which its batch is found again (``GET /batches``)."""
    return {"bpp_job": job, "bpp_part": str(part), "bpp_attempt": str(attempt)}


def _progress(state: PartState, event: dict[str, Any]) -> None:
    state.remote_status = event.get("remote") or event.get("status")
    state.completed, state.failed = event.get("completed"), event.get("failed")
    state.total = event.get("total")


def batches_of(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Each part of a batch-mode run as the journal in ``checkpoint_dir/batch`` has it, for
    ``pipeline status``: part, model, lines, round, batch id, stage, age (seconds since
    its batch was created), dialect, and the provider's status and request counts when it
    was last polled. Reads the journal only (no network)."""
    now = time.time()
    return [
        {
            "part": state.part,
            "model": state.model,
            "lines": state.lines,
            "round": state.round,
            "batch_id": state.batch_id,
            "stage": state.stage,
            "age_s": None if state.created_at is None else round(now - state.created_at, 1),
            "dialect": state.dialect,
            "provider_status": state.remote_status,
            "completed": state.completed,
            "failed": state.failed,
            "total": state.total,
        }
        for state in Journal(checkpoint_dir / "batch").replay().values()
    ]
