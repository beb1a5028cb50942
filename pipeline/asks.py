"""What the engine hands an executor: one ``Ask`` per (row, model) that still needs samples.

``produce`` reads the input from the plan's first row that needs anything, builds each row's
messages and puts an ``Ask`` on the ``AskStream`` for every model it needs; rows that are not
sent (``--skip-empty``, invalid) are recorded here. ``RequestShape`` holds what every request
of a model carries (body parameters, the schema or labels instruction) and how its answers are
checked. Nothing here sends a request or knows HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .config import RunConfig
from .labels import label_instruction, load_labels, parse_label
from .planning import Plan
from .prompts import add_system_text
from .records import Message, PromptRow, RowResult
from .stopping import Stop
from .structured import (
    ParsedAnswer,
    load_schema,
    parse_answer,
    plan_schema_request,
)


@dataclass(frozen=True, slots=True)
class Ask:
    """One row for one model: the request to make and the samples (result keys) it answers."""

    index: int  # the row's position in the input
    model: str
    messages: list[Message]  # as sent: any system text of the schema or labels added
    params: dict[str, Any]  # body fields besides model and messages
    samples: tuple[tuple[int, int], ...]  # (sample index, result key) still needed

    @property
    def keys(self) -> dict[int, int]:
        """Result key by sample index."""
        return dict(self.samples)


class Results(Protocol):
    """Where an executor puts each final result (``recording.Recorder``)."""

    def record(self, result: RowResult) -> None: ...

    async def flush(self) -> bool:
        """Write what was recorded to the checkpoint now; False when it cannot be."""
        ...


class AskStream:
    """A bounded stream of asks that several workers may iterate at once (``async for``)."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[Ask | None] = asyncio.Queue(maxsize=maxsize)

    async def put(self, ask: Ask) -> None:
        await self._queue.put(ask)

    async def close(self) -> None:
        """No more asks: every reader's loop ends once the stream is empty."""
        await self._queue.put(None)

    def __aiter__(self) -> AskStream:
        return self

    async def __anext__(self) -> Ask:
        ask = await self._queue.get()
        if ask is None:
            self._queue.put_nowait(None)  # for the next reader (there is room: we took one)
            raise StopAsyncIteration
        return ask


class RequestShape:
    """What every request to a model carries, and how its answers are checked."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.params = config.body_params()
        self.schema = load_schema(config.json_schema) if config.json_schema else None
        self.labels = load_labels(config.labels) if config.labels else None
        self._shapes: dict[str, tuple[dict[str, Any], str | None]] = {}

    def of(self, model: str) -> tuple[dict[str, Any], str | None]:
        """(body parameters, system text to add) for ``model``."""
        shape = self._shapes.get(model)
        if shape is None:
            params, system = dict(self.params), None
            if self.schema is not None:
                plan = plan_schema_request(self.schema, model, self.config.schema_mode)  # type: ignore[arg-type]
                params["response_format"] = plan.response_format
                system = plan.system_prompt
            elif self.labels is not None:
                system = label_instruction(self.labels)
            shape = self._shapes[model] = (params, system)
        return shape

    def ask(self, row: PromptRow, model: str) -> Ask:
        params, system = self.of(model)
        messages = row.messages or []
        if system:
            messages = add_system_text(messages, system)
        return Ask(row.index, model, messages, params, row.wanted)

    def check(self, text: str | None, finish_reason: str | None) -> ParsedAnswer | None:
        """The answer parsed against the schema or labels; None when there is nothing to check."""
        if self.schema is not None:
            return parse_answer(text, self.schema, finish_reason=finish_reason)
        if self.labels is not None:
            return parse_label(text, self.labels, finish_reason=finish_reason)
        return None


def unsent_result(row: PromptRow, key: int) -> RowResult:
    """The result of a row that is not sent: skipped, or invalid with the reason."""
    if row.skip_reason is not None:
        return RowResult(key=key, status="skipped", error_message=row.skip_reason)
    return RowResult(
        key=key, status="error", error_type="InvalidRow", error_message=row.invalid_reason
    )


async def produce(
    plan: Plan, n: int, shape: RequestShape, asks: AskStream, results: Results, stop: Stop
) -> None:
    """Put an ``Ask`` on ``asks`` for every (row, model) the plan still needs; close the
    stream at the end. Reading starts at the first row that needs a request, where its byte
    is known: a resume does not re-read what is done."""
    start = plan.resume_from
    batches = iter(plan.source.iter_batches(columns=plan.builder.columns, start=start))
    offset = start.row if start is not None else 0
    while not stop.is_set():
        batch = await asyncio.to_thread(next, batches, None)
        if batch is None:
            break
        for row, model in units(plan, n, batch, offset):
            if row.messages is None:
                for _, key in row.wanted:
                    results.record(unsent_result(row, key))
            else:
                await asks.put(shape.ask(row, model))
            if stop.is_set():
                break
        offset += batch.num_rows
    # Closed only when the producer ended by itself (the end, or a stop): after a cancel or
    # an error nobody may read the stream, and a put on a full one would never return.
    await asks.close()


def units(plan: Plan, n: int, batch: Any, offset: int) -> Iterator[tuple[PromptRow, str]]:
    """(row as sent to a model, the model) for every row of ``batch`` that needs a request,
    in input order. The batch's keys are read once, as slices (the plan's key arrays may
    be read from the checkpoint's ``keys.npy``)."""
    here = slice(offset, offset + batch.num_rows)
    need = plan.send[here]
    if not need.any():
        return
    where = np.nonzero(need.any(axis=1))[0]
    # a run of consecutive rows (the usual case) is a slice, not a take
    contiguous = where[-1] - where[0] + 1 == len(where)
    part = batch.slice(int(where[0]), len(where)) if contiguous else batch.take(where)
    rows = plan.builder.build(part, plan.keys[here][where], offset + where)
    model_keys = [keys[here] for keys in plan.model_keys] if len(plan.models) > 1 else []
    unit_keys = [keys[here] for keys in plan.unit_keys] if n > 1 else []
    for i, row in zip(where, rows, strict=True):
        for j, model in enumerate(plan.models):
            first, wanted = j * n, need[i]
            if not wanted[first : first + n].any():
                continue
            unit = row
            if model_keys:
                unit = dataclasses.replace(unit, key=int(model_keys[j][i]), model=model)
            if unit_keys:
                samples = tuple(
                    (s, int(unit_keys[first + s][i])) for s in range(n) if wanted[first + s]
                )
                unit = dataclasses.replace(unit, samples=samples)
            yield unit, model
