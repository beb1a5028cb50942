"""``pipeline batch cancel OUTPUT``: cancel the open batches of a batch-mode run.

Reads the run's settings from OUTPUT's checkpoint manifest (the API key from the
environment, as a run does), takes the run lock (a run driving the batches must be stopped
first), asks the provider to cancel each batch that is still running, and journals each part
as ``cancelled``. The next run of the same command collects what the cancelled batches
answered before they stopped, and does not send their other rows again unless
``--resubmit-cancelled`` is given. It writes no result itself.

``cancelled`` is journaled before the provider is asked: a cancel killed after its request
went out still keeps the rows from being sent again (``kept`` undoes it when the provider
says the batch had already ended). A part whose create went out without its id being
saved is looked for by its tag first (openai dialect); where it cannot be looked for, the
batch may exist: ``unknown`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from ..checkpoint import Checkpoint
from ..credentials import resolve_api_key
from ..errors import OutputError
from ..merging import manifest_config
from .dialect import TERMINAL, Dialect
from .journal import Journal, PartState, batch_tag
from .openai import BatchAPIError, PollLater
from .providers import make_dialect


@dataclass(frozen=True)
class Cancelled:
    """What ``cancel_batches`` did to one part: ``outcome`` is cancelled (its batch was asked
    to stop), withdrawn (never created: nothing to stop) or finished (it had ended, or
    could not be cancelled: collected as usual; ``reason`` says why)."""

    part: int
    batch_id: str | None
    outcome: str  # or unknown: created perhaps, its id never saved (see the module docstring)
    reason: str = ""


async def cancel_batches(
    output: Path | str,
    environ: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[Cancelled]:
    """Cancel every open batch of OUTPUT's batch-mode run (see the module docstring).

    Raises ``OutputError`` when OUTPUT has no batch-mode checkpoint, ``LockHeld`` while a
    run holds it, ``ConfigError`` when the API key is missing.
    """
    checkpoint = Checkpoint(Path(output))
    journal = Journal(checkpoint.dir / "batch")
    manifest = checkpoint.read_manifest()
    if not manifest or not journal.path.exists():
        raise OutputError(f"{output} has no batch-mode checkpoint: nothing to cancel.")
    config = manifest_config(manifest)
    checkpoint.acquire_lock()
    try:
        # a part cancelled by a cancel that was killed may not have been asked yet: again
        parts = [
            p
            for p in journal.replay().values()
            if p.open and (not p.cancelled or (p.batch_id is not None and p.status is None))
        ]
        if not parts:
            return []
        dialect = make_dialect(config, resolve_api_key(config, environ), transport)
        done: list[Cancelled] = []
        try:
            for state in parts:
                if state.batch_id is None and state.creating is not None and dialect.finds:
                    tag = batch_tag(str(manifest.get("job_id") or ""), state.part, state.attempt)
                    found = await dialect.find(tag)
                    if found is not None:  # the create went out: its batch exists
                        journal.append("created", state.part, batch_id=found, dialect=dialect.name)
                        state.batch_id, state.creating = found, None
                done.append(await _cancel_part(state, dialect, journal))
        finally:
            await dialect.aclose()
    finally:
        checkpoint.release_lock()
    return done


async def _cancel_part(state: PartState, dialect: Dialect, journal: Journal) -> Cancelled:
    if state.status is not None:
        return Cancelled(state.part, state.batch_id, "finished", "it ended")
    journal.append("cancelled", state.part)  # first: a kill after the request holds its rows
    if state.batch_id is None:
        if state.creating is not None:
            why = (
                "its create was sent and its id never saved, and this provider's batches "
                "cannot be looked up: it may exist; check the provider's console"
            )
            return Cancelled(state.part, None, "unknown", why)
        return Cancelled(state.part, None, "withdrawn")
    try:
        await dialect.cancel(state.batch_id)
    except BatchAPIError as exc:
        try:
            ended = (await dialect.view(state.batch_id)).status in TERMINAL - {"cancelled"}
        except PollLater:
            ended = False  # cannot tell now: it stays cancelled, its rows are not sent again
        if ended:
            journal.append("kept", state.part)  # it had ended: collected as usual
            return Cancelled(state.part, state.batch_id, "finished", exc.message)
        # cancelled or cancelling already (an earlier cancel got through)
    return Cancelled(state.part, state.batch_id, "cancelled")
