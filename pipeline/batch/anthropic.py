"""The Anthropic Message Batches dialect (Anthropic), and the AI/ML API's variant of it.

Requests go inline (``POST /messages/batches`` with ``requests[{custom_id, params}]``), each
OpenAI chat body translated to Messages parameters (``to_params``: system messages become
``system``, ``stop`` becomes ``stop_sequences``, ``max_tokens`` is required). A batch cannot
carry a tag, so a create whose answer was lost cannot be found again (``finds = False``):
the executor stops there rather than guess. Results are JSONL lines ``{custom_id, result:
{type: succeeded | errored | canceled | expired}}``, read into the same ``Outcome``s as the
OpenAI dialect's.

``AimlapiDialect``: the AI/ML API's batches for Claude models (BATCH-API.md section 3) take
the same inline requests at its own paths and answer in other shapes: ``POST /batches``;
``GET /batches?batch_id=ID`` answers ``[{id, status: "generating"}]`` while the batch runs,
the batch object with ``status: "cancelled"`` after a cancel, and the result JSONL itself
once it has finished (read as JSONL first, then as JSON, as its documentation does); ``POST
/batches/cancel/{id}`` (400 once finished). It has no list endpoint and no metadata.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from ..errors import ConfigError
from ..records import Choice, Completion, Usage
from .dialect import BatchView
from .lines import Outcome, Parsed, iter_results, parse_results
from .openai import AmbiguousCreate, BatchAPIError, OpenAIBatches, TokenLimit

DEFAULT_MAX_TOKENS = 1024  # Messages needs one; an OpenAI body may leave it out
_UNSUPPORTED = ("response_format", "seed", "n", "logprobs", "tools", "tool_choice")
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


def to_params(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat body as Anthropic Messages parameters; ConfigError for what has no
    equivalent (before anything is sent)."""
    present = [name for name in _UNSUPPORTED if body.get(name) is not None]
    if present:
        raise ConfigError(
            f"--batch-dialect anthropic cannot send {', '.join(present)} (no Messages "
            "equivalent); drop those options, or use --schema-mode prompt for a schema."
        )
    system = [str(m.get("content") or "") for m in body["messages"] if m.get("role") == "system"]
    params: dict[str, Any] = {
        "model": body["model"],
        "max_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS,
        "messages": [
            {"role": m["role"], "content": m.get("content") or ""}
            for m in body["messages"]
            if m.get("role") != "system"
        ],
    }
    if system:
        params["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            params[name] = body[name]
    stop = body.get("stop")
    if stop:
        params["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return params


class AnthropicDialect:
    """See the module docstring and ``dialect.Dialect``."""

    name = "anthropic"
    uploads = False
    finds = False

    def __init__(self, base_url: str, api_key: str | None, transport: httpx.AsyncBaseTransport):
        headers = {"anthropic-version": "2023-06-01"}
        if api_key:
            headers |= {"x-api-key": api_key, "Authorization": f"Bearer {api_key}"}
        self.api = OpenAIBatches(base_url, None, transport)
        self.api.http.headers.update(headers)

    async def upload(self, path: Path) -> str:
        raise AssertionError("the anthropic dialect sends its requests inline")

    async def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> str:
        return await self._create_at("/messages/batches", path)

    async def _create_at(self, route: str, path: Path) -> str:
        requests = []
        for raw in (await asyncio.to_thread(path.read_bytes)).splitlines():
            if raw.strip():
                line = json.loads(raw)
                requests.append({"custom_id": line["custom_id"], "params": to_params(line["body"])})
        try:
            response = await self.api.http.post(route, json={"requests": requests})
        except httpx.TransportError as exc:
            raise AmbiguousCreate(f"create batch: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code in (408, 409):
            raise AmbiguousCreate(f"create batch: HTTP {response.status_code}")
        if response.status_code == 429:
            raise TokenLimit(f"create batch: HTTP 429: {response.text[:200]}", status=429)
        if response.status_code != 200:
            raise BatchAPIError(
                f"create batch: HTTP {response.status_code}: {response.text[:300]}",
                status=response.status_code,
            )
        return str(response.json()["id"])

    async def find(self, tag: dict[str, str]) -> str | None:
        return None

    def new_cycle(self, batch_ids: Iterable[str]) -> None:
        pass  # each batch is asked about alone

    async def view(self, batch_id: str) -> BatchView:
        batch = await self.api.retried(
            lambda: self.api.http.get(f"/messages/batches/{batch_id}"), "get batch", poll=True
        )
        counts = batch.get("request_counts") or {}
        remote = str(batch.get("processing_status") or "")
        failed = sum(int(counts.get(k) or 0) for k in ("errored", "canceled", "expired"))
        if remote != "ended":
            return BatchView(
                "running",
                remote,
                completed=counts.get("succeeded"),
                failed=failed,
                total=sum(int(v or 0) for v in counts.values()),
            )
        cancelled = batch.get("cancel_initiated_at") is not None
        return BatchView(
            "cancelled" if cancelled else "completed",
            remote,
            output_ref=batch.get("results_url") or f"/messages/batches/{batch_id}/results",
            completed=counts.get("succeeded"),
            failed=failed,
            total=sum(int(v or 0) for v in counts.values()),
        )

    async def fetch(self, view: BatchView, dest: Path) -> list[Path]:
        if not view.output_ref:
            return []
        path = dest.with_name(f"{dest.name}.results")
        await self.api.download_url(view.output_ref, path)
        return [path]

    def parse(self, chunks: Iterable[bytes]) -> Parsed:
        return parse_results(chunks, _read_line)

    def outcomes(self, chunks: Iterable[bytes]) -> Iterator[tuple[int, Outcome]]:
        return iter_results(chunks, _read_line)

    async def cancel(self, batch_id: str) -> None:
        await self.api.retried(
            lambda: self.api.http.post(f"/messages/batches/{batch_id}/cancel"), "cancel batch"
        )

    async def aclose(self) -> None:
        await self.api.aclose()


class AimlapiDialect(AnthropicDialect):
    """See the module docstring."""

    name = "aimlapi"

    async def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> str:
        return await self._create_at("/batches", path)

    async def view(self, batch_id: str) -> BatchView:
        url = f"/batches?batch_id={batch_id}"
        response = await self.api.retried_response(
            lambda: self.api.http.get("/batches", params={"batch_id": batch_id}),
            "get batch",
            poll=True,
        )
        raw = response.content
        try:
            data: Any = json.loads(raw)
        except ValueError:  # result JSONL of several lines: the batch has finished
            return _finished(raw, url)
        if isinstance(data, list):  # [{"id", "status": "generating"}] while it runs
            first = data[0] if data and isinstance(data[0], dict) else {}
            return BatchView("running", str(first.get("status") or "running"))
        if isinstance(data, dict) and "custom_id" in data:  # a result file of one line
            return _finished(raw, url)
        if isinstance(data, dict) and str(data.get("status")).lower() in ("cancelled", "canceled"):
            return BatchView("cancelled", "cancelled", output_ref=data.get("results_url"))
        if isinstance(data, dict) and data.get("processing_status") == "ended":
            # Anthropic's own shape, in case the service answers with it
            return BatchView("completed", "ended", output_ref=data.get("results_url") or url)
        if isinstance(data, dict) and data.get("processing_status"):
            return BatchView("running", str(data["processing_status"]))
        raise BatchAPIError(f"get batch {batch_id}: an answer of unknown shape: {raw[:200]!r}")

    async def cancel(self, batch_id: str) -> None:
        await self.api.retried(
            lambda: self.api.http.post(f"/batches/cancel/{batch_id}"), "cancel batch"
        )


def _finished(raw: bytes, url: str) -> BatchView:
    """A finished AI/ML API batch, from its result JSONL (fetched again from ``url``)."""
    kinds = []
    for line in raw.splitlines():
        if line.strip():
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None  # counted as not answered; the merge reports the line
            result = parsed.get("result") if isinstance(parsed, dict) else None
            kinds.append(result.get("type") if isinstance(result, dict) else None)
    done = sum(kind == "succeeded" for kind in kinds)
    return BatchView(
        "completed", "ended", url, completed=done, failed=len(kinds) - done, total=len(kinds)
    )


def _read_line(key: int, line: dict[str, Any]) -> Outcome:
    return outcome(key, line.get("result") or {})


def outcome(key: int, result: dict[str, Any]) -> Outcome:
    """One result line's ``result`` as an ``Outcome``."""
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") or {}
        text = "".join(
            block.get("text", "")
            for block in message.get("content") or []
            if isinstance(block, dict) and block.get("type") == "text"
        )
        usage = message.get("usage") or {}
        prompt, answer = usage.get("input_tokens"), usage.get("output_tokens")
        completion = Completion(
            choices=(Choice(text, _FINISH.get(str(message.get("stop_reason")), "stop")),),
            usage=Usage(
                prompt_tokens=prompt,
                completion_tokens=answer,
                total_tokens=(prompt or 0) + (answer or 0) if prompt is not None else None,
                cached_tokens=usage.get("cache_read_input_tokens"),
            ),
            model=message.get("model"),
            response_id=message.get("id"),
        )
        return Outcome(key, completion=completion, status=200)
    if kind == "errored":
        error = (result.get("error") or {}).get("error") or result.get("error") or {}
        return Outcome(
            key,
            error_type=str(error.get("type") or "errored"),
            message=str(error.get("message") or "errored"),
        )
    # canceled (by the provider) or expired: it never ran; it may be sent again
    return Outcome(key, error_type=f"batch_{kind}", message=f"the line was {kind}", retryable=True)
