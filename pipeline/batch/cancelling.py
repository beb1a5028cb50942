"""``pipeline batch cancel OUTPUT``: cancel the open batches of a batch-mode run.

Reads the run's settings from OUTPUT's checkpoint manifest (the API key from the
environment, as a run does), takes the run lock (a run driving the batches must be stopped
first), asks the provider to cancel each batch that is still running, and journals each part
as ``cancelled``. The next run of the same command collects what the cancelled batches
answered before they stopped, and does not send their other rows again unless
``--resubmit-cancelled`` is given. It writes no result itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from ..checkpoint import Checkpoint
from ..credentials import resolve_api_key
from ..errors import OutputError
from ..merging import manifest_config
from .journal import Journal
from .openai import BatchAPIError
from .providers import make_dialect


@dataclass(frozen=True)
class Cancelled:
    """What ``cancel_batches`` did to one part: ``outcome`` is cancelled (its batch was asked
    to stop), withdrawn (never created: nothing to stop) or finished (it had ended, or
    could not be cancelled: collected as usual; ``reason`` says why)."""

    part: int
    batch_id: str | None
    outcome: str
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
        parts = [p for p in journal.replay().values() if p.open and not p.cancelled]
        if not parts:
            return []
        dialect = make_dialect(config, resolve_api_key(config, environ), transport)
        done: list[Cancelled] = []
        try:
            for state in parts:
                if state.batch_id is None:
                    done.append(Cancelled(state.part, None, "withdrawn"))
                elif state.status is not None:
                    done.append(Cancelled(state.part, state.batch_id, "finished", "it ended"))
                    continue
                else:
                    try:
                        await dialect.cancel(state.batch_id)
                    except BatchAPIError as exc:
                        done.append(Cancelled(state.part, state.batch_id, "finished", exc.message))
                        continue
                    done.append(Cancelled(state.part, state.batch_id, "cancelled"))
                journal.append("cancelled", state.part)
        finally:
            await dialect.aclose()
    finally:
        checkpoint.release_lock()
    return done
