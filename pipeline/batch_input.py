"""Validation of OpenAI batch creates and batch input files, as the simulator does it.

This module owns the checks of ``POST /v1/batches`` bodies (required fields, endpoint,
``completion_window`` "24h", metadata of at most 16 string pairs with keys up to 64 and values
up to 512 characters) and of batch input files, which fail the batch with
``errors.data[{code, message, param, line}]`` (lines numbered from 1): ``empty_file``,
``too_many_tasks``, ``invalid_json_line``, ``url_mismatch``, ``model_mismatch``,
``duplicate_custom_id``. It does not own HTTP replies or batch state
(``pipeline.batch_service``, ``pipeline.batch_book``).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.batch_book import SimLine

ENDPOINTS = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
    }
)


def create_problem(request: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first thing wrong with a create body, as OpenAI words it."""
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(request.get(name), str):
            return name, f"Missing required parameter: '{name}'."
    if request["endpoint"] not in ENDPOINTS:
        return (
            "endpoint",
            f"Invalid endpoint '{request['endpoint']}'; use one of {sorted(ENDPOINTS)}.",
        )
    if request["completion_window"] != "24h":
        return "completion_window", "Invalid completion_window: only '24h' is supported."
    metadata = request.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata", "metadata must be an object of string keys and values."
    if len(metadata) > 16:
        return "metadata", f"metadata has {len(metadata)} pairs; at most 16 are allowed."
    for key, value in metadata.items():
        if not isinstance(value, str):
            return "metadata", f"metadata value of '{key}' must be a string."
        if len(key) > 64:
            return "metadata", f"metadata key '{key[:20]}...' is longer than 64 characters."
        if len(value) > 512:
            return "metadata", f"metadata value of '{key}' is longer than 512 characters."
    return None


def read_input(
    content: bytes, endpoint: str, max_requests: int
) -> tuple[list[SimLine], list[dict[str, Any]]]:
    """The lines of a batch input file, or the validation errors that fail the batch."""
    texts = content.decode("utf-8", errors="replace").splitlines()
    while texts and not texts[-1].strip():
        texts.pop()
    if not texts:
        return [], [line_error("empty_file", "The input file is empty.", None)]
    limit = max_requests
    if len(texts) > limit:
        message = f"The batch input file has {len(texts)} requests; the limit is {limit}."
        return [], [line_error("too_many_tasks", message, None)]
    lines: list[SimLine] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    model: str | None = None
    for number, text in enumerate(texts, start=1):
        item = json_line(text)
        if item is None:
            message = "This line is not parseable as valid JSON or lacks custom_id, url, body."
            errors.append(line_error("invalid_json_line", message, None, number))
            continue
        custom_id, body = str(item["custom_id"]), item["body"]
        if item["url"] != endpoint:
            message = f"The url '{item['url']}' does not match the batch endpoint '{endpoint}'."
            errors.append(line_error("url_mismatch", message, "url", number))
        line_model = body.get("model")
        model = line_model if model is None else model
        if line_model != model:
            message = f"The model '{line_model}' differs from the file's model '{model}'."
            errors.append(line_error("model_mismatch", message, "body.model", number))
        if custom_id in seen:
            message = (
                f"The custom_id '{custom_id}' on line {number} is a duplicate of "
                f"another request (line {seen[custom_id]})."
            )
            errors.append(line_error("duplicate_custom_id", message, "custom_id", number))
        seen.setdefault(custom_id, number)
        lines.append(SimLine(custom_id, body, text))
    return lines, errors


def line_error(
    code: str, message: str, param: str | None, line: int | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def json_line(text: str) -> dict[str, Any] | None:
    """A parsed input line with custom_id, url and an object body, else None."""
    try:
        item = json.loads(text)
    except ValueError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("body"), dict):
        return None
    if not isinstance(item.get("custom_id"), str) or not isinstance(item.get("url"), str):
        return None
    return item
