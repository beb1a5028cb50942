"""The OpenAI Files + Batches dialect (OpenAI, Azure, Groq, DeepInfra, the simulator).

``upload`` (``POST /files``, purpose ``batch``), ``create`` (``POST /batches`` with our
metadata tag), ``find`` (``GET /batches`` pages: the batch a create made even when its answer
was lost), ``get``, ``download`` (``GET /files/{id}/content``) and ``cancel``. Reads and
uploads are retried (an upload sent twice leaves an orphan file, nothing worse); a create is
never retried blindly: an answer that may hide a created batch (a timeout, a reset, a 5xx)
raises ``AmbiguousCreate``, and the executor looks for the batch by its tag first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from ..atomic import atomic_write
from ..errors import FatalError
from .dialect import TERMINAL, BatchView
from .lines import Outcome, Parsed, iter_results, parse_results

Sleep = Callable[[float], Awaitable[None]]
TRANSIENT = (httpx.TransportError,)


class BatchAPIError(FatalError):
    """The Batch API refused a call, or kept failing it."""


class AmbiguousCreate(BatchAPIError):
    """A create whose outcome is unknown: the batch may exist."""


class TokenLimit(BatchAPIError):
    """The provider's enqueued-token limit: wait for running batches, then create again."""


class PollLater(Exception):
    """A poll answered 429/5xx with Retry-After: poll again after ``wait`` seconds (the
    executor waits that long before its next cycle; nothing fails)."""

    def __init__(self, message: str, wait: float) -> None:
        super().__init__(message)
        self.wait = wait


class OpenAIBatches:
    """One provider's Files + Batches endpoints under ``base_url`` (``.../v1``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport,
        *,
        timeout: float = 600.0,
        sleep: Sleep = asyncio.sleep,
        attempts: int = 5,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, transport=transport, timeout=timeout
        )
        self.sleep = sleep
        self.attempts = attempts

    async def aclose(self) -> None:
        await self.http.aclose()

    async def upload(self, path: Path) -> str:
        """The id of ``path`` uploaded as a batch input file."""

        async def call() -> httpx.Response:
            # streamed from the file in chunks (a part of 200 MB is never held whole)
            fh = await asyncio.to_thread(open, path, "rb")
            try:
                files = {"file": (path.name, fh, "application/jsonl")}
                return await self.http.post("/files", data={"purpose": "batch"}, files=files)
            finally:
                fh.close()

        data = await self.retried(call, f"upload {path.name}")
        return str(data["id"])

    async def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }
        try:
            response = await self.http.post("/batches", json=body)
        except httpx.TransportError as exc:
            raise AmbiguousCreate(f"create batch: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code in (408, 409):
            raise AmbiguousCreate(f"create batch: HTTP {response.status_code}")
        if response.status_code != 200:
            message = _message(response)
            if "enqueued token limit" in message.lower() or "token_limit" in message.lower():
                raise TokenLimit(f"create batch: {message}", status=response.status_code)
            raise BatchAPIError(
                f"create batch: HTTP {response.status_code}: {message}",
                status=response.status_code,
            )
        return _json(response, "create batch")

    async def find(self, metadata: dict[str, str]) -> dict[str, Any] | None:
        """The batch whose metadata holds every pair of ``metadata``, or None."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = await self.retried(partial(self.http.get, "/batches", params=params), "list")
            for batch in page.get("data") or []:
                tags = batch.get("metadata") or {}
                if all(tags.get(k) == v for k, v in metadata.items()):
                    return dict(batch)
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page.get("last_id") or page["data"][-1]["id"]

    async def listed(self, wanted: set[str], pages: int = 5) -> dict[str, dict[str, Any]]:
        """The batches of ``wanted`` that the newest ``pages`` pages of the list show."""
        found: dict[str, dict[str, Any]] = {}
        after: str | None = None
        for _ in range(pages):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = await self.retried(
                partial(self.http.get, "/batches", params=params), "list", poll=True
            )
            for batch in page.get("data") or []:
                if batch.get("id") in wanted:
                    found[str(batch["id"])] = dict(batch)
            if len(found) == len(wanted) or not page.get("has_more") or not page.get("data"):
                break
            after = page.get("last_id") or page["data"][-1]["id"]
        return found

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self.retried(
            lambda: self.http.get(f"/batches/{batch_id}"), "get batch", poll=True
        )

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self.retried(
            lambda: self.http.post(f"/batches/{batch_id}/cancel"), "cancel batch"
        )

    async def download(self, file_id: str, dest: Path) -> None:
        """``file_id``'s content to ``dest`` (written atomically)."""
        await self.download_url(f"/files/{file_id}/content", dest)

    async def download_url(self, url: str, dest: Path) -> None:
        """The body of ``GET url`` (under ``base_url``, or absolute) to ``dest``."""
        for attempt in range(self.attempts):
            try:
                async with self.http.stream("GET", url) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise _status_error(response, f"download {url}")
                    with atomic_write(dest) as tmp:
                        fh = await asyncio.to_thread(open, tmp, "wb")
                        try:
                            async for chunk in response.aiter_bytes():
                                fh.write(chunk)
                        finally:
                            fh.close()
                    return
            except (httpx.TransportError, _Transient) as exc:
                if attempt + 1 == self.attempts:
                    raise BatchAPIError(f"download {url}: {exc}") from exc
                await self.sleep(2.0**attempt)

    async def retried(
        self, call: Callable[[], Awaitable[httpx.Response]], what: str, *, poll: bool = False
    ) -> dict[str, Any]:
        """``call``'s JSON answer, retried on transport errors, 429 and 5xx; a ``poll``
        answered with Retry-After raises ``PollLater`` instead of waiting here."""
        return _json(await self.retried_response(call, what, poll=poll), what)

    async def retried_response(
        self, call: Callable[[], Awaitable[httpx.Response]], what: str, *, poll: bool = False
    ) -> httpx.Response:
        """``call``'s 200 answer, whatever its body, retried as ``retried`` says."""
        for attempt in range(self.attempts):
            try:
                response = await call()
                if response.status_code == 200:
                    return response
                raise _status_error(response, what)
            except (httpx.TransportError, _Transient) as exc:
                asked = getattr(exc, "retry_after", None)
                if poll and asked is not None:
                    raise PollLater(str(exc), asked) from exc
                if attempt + 1 == self.attempts:
                    raise BatchAPIError(f"{what}: {exc}") from exc
                wait = getattr(exc, "retry_after", None) or 2.0**attempt
                await self.sleep(min(wait, 60.0))
        raise AssertionError("unreachable")


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _status_error(response: httpx.Response, what: str) -> Exception:
    message = f"{what}: HTTP {response.status_code}: {_message(response)}"
    if response.status_code == 429 or response.status_code >= 500:
        try:
            retry_after: float | None = float(response.headers.get("retry-after", ""))
        except ValueError:
            retry_after = None
        return _Transient(message, retry_after)
    return BatchAPIError(message, status=response.status_code)


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(data)[:300]


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise BatchAPIError(f"{what}: the answer is not JSON") from exc
    if not isinstance(data, dict):
        raise BatchAPIError(f"{what}: the answer is not a JSON object")
    return data


class OpenAIDialect:
    """The executor's view of ``OpenAIBatches`` (see ``dialect.Dialect``)."""

    name = "openai"
    uploads = True
    finds = True

    def __init__(self, api: OpenAIBatches, endpoint: str) -> None:
        self.api = api
        self.endpoint = endpoint
        self._polling: set[str] = set()  # the batches this poll cycle asks about
        self._listed: asyncio.Future[dict[str, dict[str, Any]]] | None = None

    def new_cycle(self, batch_ids: Iterable[str]) -> None:
        """A poll cycle begins that asks about ``batch_ids``: with two or more, one list
        call (``GET /batches``, newest first, pages until every one is seen) answers for
        all; a batch the pages did not show is asked about alone."""
        self._polling = set(batch_ids)
        self._listed = None

    async def _batch(self, batch_id: str) -> dict[str, Any]:
        if len(self._polling) >= 2 and batch_id in self._polling:
            if self._listed is None:
                self._listed = asyncio.ensure_future(self.api.listed(self._polling))
            listed = await asyncio.shield(self._listed)
            if batch_id in listed:
                return listed[batch_id]
        return await self.api.get(batch_id)

    async def upload(self, path: Path) -> str:
        return await self.api.upload(path)

    async def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> str:
        batch = await self.api.create(file_id or "", self.endpoint, tag)
        return str(batch["id"])

    async def find(self, tag: dict[str, str]) -> str | None:
        found = await self.api.find(tag)
        return None if found is None else str(found["id"])

    async def view(self, batch_id: str) -> BatchView:
        batch = await self._batch(batch_id)
        status = str(batch.get("status", "")).lower()
        errors = list(((batch.get("errors") or {}).get("data") or [])[:100])
        counts = batch.get("request_counts") or {}
        return BatchView(
            status=status if status in TERMINAL else "running",
            remote=status,
            output_ref=batch.get("output_file_id"),
            error_ref=batch.get("error_file_id"),
            errors=errors,
            completed=counts.get("completed"),
            failed=counts.get("failed"),
            total=counts.get("total"),
            token_limited=any(
                isinstance(e, dict) and e.get("code") == "token_limit_exceeded" for e in errors
            ),
        )

    async def fetch(self, view: BatchView, dest: Path) -> list[Path]:
        paths = []
        for suffix, ref in (("output", view.output_ref), ("errors", view.error_ref)):
            if ref:
                path = dest.with_name(f"{dest.name}.{suffix}")
                await self.api.download(ref, path)
                paths.append(path)
        return paths

    def parse(self, chunks: Iterable[bytes]) -> Parsed:
        return parse_results(chunks)

    def outcomes(self, chunks: Iterable[bytes]) -> Iterator[tuple[int, Outcome]]:
        return iter_results(chunks)

    async def cancel(self, batch_id: str) -> None:
        await self.api.cancel(batch_id)

    async def aclose(self) -> None:
        await self.api.aclose()
