"""``--input-format openai-batch``: an OpenAI Batch input file as the INPUT of a run.

Each line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``. The
run sends each line's body as it is: its ``messages`` become the row's messages, and its
model and other fields the request's; ``custom_id`` is the row's id (``--id-column
custom_id``), kept in OUTPUT so results join back. One run has one model and one set of
request fields, so every line must share them: a file that mixes them is refused, naming the
first line that differs (split it, one file per model). Reads the file; sends nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import DEFAULT_MODEL, RunConfig
from .errors import ConfigError, InputError
from .settings import validate

ENDPOINT = "/v1/chat/completions"


def batch_file_job(data: Any, config: RunConfig) -> tuple[pa.Table, RunConfig]:
    """(the rows as a table of ``custom_id`` and ``messages``, ``config`` with the file's
    model and request fields) for a run of an OpenAI Batch input file (see the docstring)."""
    if not isinstance(data, str | Path):
        raise InputError("--input-format openai-batch reads a file: give its path.")
    given = [
        name
        for name, on in (
            ("--model", config.model != DEFAULT_MODEL or bool(config.models)),
            ("--param / request options", bool(config.body_params())),
            ("--prompt-column / --template / --messages-column", _prompt_given(config)),
            ("--id-column", config.id_column is not None),
        )
        if on
    ]
    if given:
        raise ConfigError(
            f"--input-format openai-batch: each line's body says the model, messages and "
            f"request fields; drop {', '.join(given)}."
        )
    ids: list[str] = []
    messages: list[str] = []
    shared: dict[str, Any] | None = None
    first = 0
    path = Path(data)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            custom_id, body = _line(path, number, raw)
            fields = {k: v for k, v in body.items() if k != "messages"}
            if shared is None:
                shared, first = fields, number
            elif fields != shared:
                changed = sorted(k for k in {*fields, *shared} if fields.get(k) != shared.get(k))
                raise InputError(
                    f"{path}: line {number}: its body's {', '.join(changed)} differ from line "
                    f"{first}'s; one run sends one model with one set of fields: split the "
                    "file (one per model and fields)."
                )
            ids.append(custom_id)
            messages.append(json.dumps(body["messages"], ensure_ascii=False))
    if shared is None:
        raise InputError(f"{path} has no request lines.")
    params = dict(shared)
    model = params.pop("model")
    table = pa.table({"custom_id": ids, "messages": messages})
    overrides: dict[str, Any] = {
        "model": str(model),
        "messages_column": "messages",
        "id_column": "custom_id",
        "input_format": None,
    }
    for name in ("temperature", "max_tokens", "top_p", "seed", "response_format", "n"):
        if name in params:
            overrides[name] = params.pop(name)
    if "stop" in params:
        stop = params.pop("stop")
        overrides["stop"] = tuple(stop) if isinstance(stop, list) else (stop,)
    job = dataclasses.replace(config, params=params, **overrides)
    validate(job)  # the file's fields, checked as options are (a ConfigError naming them)
    return table, job


def _prompt_given(config: RunConfig) -> bool:
    sources = (config.prompt_column, config.template, config.messages_column)
    return any(value is not None for value in sources)


def _line(path: Path, number: int, raw: bytes) -> tuple[str, dict[str, Any]]:
    """(custom_id, body) of one request line, or an InputError naming the line."""
    where = f"{path}: line {number}"
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{where} is not JSON ({exc}).") from None
    if not isinstance(line, dict):
        raise InputError(f"{where} is not a JSON object.")
    custom_id, body = line.get("custom_id"), line.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError(f"{where} has no custom_id (a non-empty string).")
    if line.get("url", ENDPOINT) != ENDPOINT or line.get("method", "POST") != "POST":
        raise InputError(f"{where}: only POST {ENDPOINT} lines run (got {line.get('url')}).")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise InputError(f"{where}: body has no messages list.")
    if not isinstance(body.get("model"), str):
        raise InputError(f"{where}: body has no model.")
    if body.get("stream"):
        raise InputError(f"{where}: body asks to stream; a batch line cannot.")
    return custom_id, body
