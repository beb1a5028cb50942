"""One chat-completion attempt: build the body, POST it, parse, map status -> error.

Owns what is said on the wire: URL, headers, response and error-body parsing (OpenAI's
``{"error": {...}}`` and the AI/ML API's flat ``{message, statusCode, ...}``), the HTTP
status -> error mapping and Retry-After. It does not retry or pace: it raises a typed
``RequestError`` and lets ``retry.py`` and ``limits.py`` decide. It does not hold
connections or know a backend's exceptions: ``make_transport`` builds the pool, and
``ChatClient`` sends through the one ``transport.Route`` interface (an adapter per backend
that raises only our errors), so ``send`` has one path whatever the backend.

Speed: ``httpx.AsyncClient.send`` costs more CPU per request than the whole rest of the
pipeline, so it is never used. The default transport, ``http11.Http11Transport`` (one
keep-alive pool sized to ``--concurrency``), takes a pre-encoded request template for our
one URL: a request is then the body, two headers and one write, with no ``httpx.Request``
or ``httpx.Response`` built. ``http_backend = "aiohttp"`` uses
``aiohttp_transport.AiohttpTransport`` (an aiohttp pool, fed ``httpx.Request`` objects),
``"httpx"`` httpx's own ``AsyncHTTPTransport``. Tests inject any ``httpx.AsyncBaseTransport``
(for example ``httpx.MockTransport``) or a ``transport.Route`` of their own.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx

from .aiohttp_transport import AiohttpTransport
from .errors import (
    AuthenticationError,
    BadRequest,
    MalformedResponse,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    RequestError,
    ServerError,
)
from .http11 import DEFAULT_MAX_RESPONSE_BYTES, Http11Transport
from .pricing import reported_cost
from .proxy import HttpxProxyRouter, ProxySettings, mask_credentials
from .records import Choice, Completion, Usage
from .transport import Route, route_to

USER_AGENT = "batch-prompt-pipeline/0.1"
# Response headers worth keeping: rate-limit state and the AI/ML API's cost accounting.
KEPT_HEADER_PREFIXES = (b"x-ratelimit-", b"x-aimlapi-")
QUOTA_WORDS = ("insufficient_quota", "quota", "billing", "credit")


def make_transport(
    backend: str,
    concurrency: int,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    proxies: ProxySettings | None = None,
) -> httpx.AsyncBaseTransport:
    """A pooled keep-alive transport whose pool fits ``concurrency`` requests in flight,
    going through ``proxies`` (``proxy.settings_from``) where they say so.

    ``max_response_bytes`` caps one response body in http11 and aiohttp; httpx's own
    transport is capped by ``ChatClient`` as it reads the body.
    """
    if backend == "httpx":
        limits = httpx.Limits(
            max_connections=concurrency,
            max_keepalive_connections=concurrency,
            keepalive_expiry=30.0,
        )
        if proxies is not None and (proxies.http or proxies.https):
            return HttpxProxyRouter(proxies, httpx.AsyncHTTPTransport, limits=limits, retries=0)
        return httpx.AsyncHTTPTransport(limits=limits, retries=0)
    if backend == "aiohttp":
        return AiohttpTransport(
            max_connections=concurrency, max_response_bytes=max_response_bytes, proxies=proxies
        )
    if backend == "http11":
        return Http11Transport(
            max_connections=concurrency, max_response_bytes=max_response_bytes, proxies=proxies
        )
    raise ValueError(f"unknown http_backend {backend!r}: http11, aiohttp or httpx")


class ChatClient:
    """Sends one chat-completion request per call to ``send``; safe to share across tasks."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float,
        transport: httpx.AsyncBaseTransport | Route,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        self.timeout = timeout
        self.transport = transport
        self._api_key = api_key
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("User-Agent", USER_AGENT),
        ]
        if api_key:
            headers.append(("Authorization", f"Bearer {api_key}"))
        fixed = [(b"Host", self.url.netloc)] + [
            (k.encode("ascii"), v.encode("latin-1")) for k, v in headers
        ]
        # one adapter, chosen once: send has one path whatever the backend
        self.route = route_to(transport, self.url, fixed, max_response_bytes=max_response_bytes)

    async def aclose(self) -> None:
        await self.route.aclose()

    def redact(self, text: str) -> str:
        """Remove the API key and any URL's credentials (a proxy's) from text that came
        from the server or a library."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return mask_credentials(text)

    async def send(self, body: bytes, request_id: str) -> Completion:
        """One attempt. Returns the parsed completion or raises a ``RequestError``."""
        try:
            response = await self.route.post(
                body, ((b"X-Client-Request-Id", request_id.encode("ascii")),), total=self.timeout
            )
        except RequestError as exc:
            raise self.redacted(exc) from None
        status = response.status
        if status == 200:
            return parse_completion(response.body, kept_headers(response.headers))
        if status == 407:
            # only a proxy answers 407 (an http:// target's, through an absolute-form request)
            raise AuthenticationError(
                "HTTP 407 Proxy Authentication Required from the proxy: give its user name "
                "and password in --proxy / HTTP_PROXY (http://user:password@host:port).",
                status=status,
            )
        raise self.redacted(
            error_from_response(status, response.body, httpx.Headers(response.headers))
        )

    def redacted(self, error: RequestError) -> RequestError:
        error.message = self.redact(error.message)
        error.args = (error.message,)
        return error


def build_body(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> bytes:
    """The request body: model, messages and the other (set) parameters, as JSON bytes."""
    return json.dumps({"model": model, "messages": messages, **params}, ensure_ascii=False).encode()


def kept_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The rate-limit and accounting headers of a response, names lower-cased."""
    kept = {}
    for name, value in raw:
        lowered = name.lower()
        if lowered.startswith(KEPT_HEADER_PREFIXES):
            kept[lowered.decode("latin-1")] = value.decode("latin-1")
    return kept


def parse_completion(content: bytes, headers: dict[str, str] | None = None) -> Completion:
    """A 200 body -> Completion; anything that is not a chat completion is MalformedResponse."""
    try:
        # decoding first is ~1.5 us faster than json.loads(bytes), which sniffs the encoding
        data = json.loads(content.decode())
    except ValueError:  # not UTF-8, or not JSON
        try:  # what json.loads(bytes) also accepts: a BOM, UTF-16/32
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedResponse(
                f"200 with a body that is not JSON ({exc}): {_snippet(content)}", status=200
            ) from None
    return completion_from(data, content, headers)


def completion_from(
    data: Any, content: bytes = b"", headers: dict[str, str] | None = None
) -> Completion:
    """A 200 body already parsed from JSON -> Completion (``content``: the bytes it came
    from, kept for the response cache); anything that is not a chat completion is
    MalformedResponse."""
    if not isinstance(data, dict):
        raise MalformedResponse(f"200 with a JSON {type(data).__name__}, not an object", status=200)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("200 without choices[0]", status=200)
    parsed = [_parse_choice(choice, number) for number, choice in enumerate(choices)]
    if len(parsed) > 1:
        # servers send choices in index order; sort in case one does not
        parsed.sort(key=lambda item: item[0])
    return Completion(
        choices=tuple(choice for _, choice in parsed),
        usage=parse_usage(data.get("usage")),
        model=_str_or_none(data.get("model")),
        response_id=_str_or_none(data.get("id")),
        headers=headers or {},
        reported_cost=reported_cost(headers or {}, data),
        raw=content,
    )


def _parse_choice(choice: Any, number: int) -> tuple[int, Choice]:
    """(index, Choice) of ``choices[number]``; MalformedResponse when it is not a choice."""
    if not isinstance(choice, dict):
        raise MalformedResponse(f"200 with choices[{number}] that is not an object", status=200)
    message = choice.get("message")
    if not isinstance(message, dict):
        raise MalformedResponse(f"200 without choices[{number}].message", status=200)
    text = message.get("content")
    if text is not None and not isinstance(text, str):
        # content as a list of parts: join the text parts
        if isinstance(text, list):
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        else:
            raise MalformedResponse(
                f"200 with a non-text choices[{number}].message.content", status=200
            )
    if text is None and message.get("tool_calls"):
        text = json.dumps(message["tool_calls"], ensure_ascii=False)
    index = choice.get("index")
    position = index if isinstance(index, int) and not isinstance(index, bool) else number
    return position, Choice(text=text, finish_reason=_str_or_none(choice.get("finish_reason")))


def parse_usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    return Usage(
        prompt_tokens=_int_or_none(raw.get("prompt_tokens")),
        completion_tokens=_int_or_none(raw.get("completion_tokens")),
        total_tokens=_int_or_none(raw.get("total_tokens")),
        cached_tokens=_int_or_none(
            prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
        ),
        reasoning_tokens=_int_or_none(
            completion_details.get("reasoning_tokens")
            if isinstance(completion_details, dict)
            else None
        ),
    )


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _snippet(content: bytes, limit: int = 200) -> str:
    text = content[:limit].decode("utf-8", errors="replace")
    return text + ("..." if len(content) > limit else "")


def parse_error_body(content: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, code) from either error shape, or the raw text."""
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return (_snippet(content, 500) or "(empty body)", None, None)
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):  # OpenAI: {"error": {message, type, code, param}}
            return (
                str(inner.get("message") or "(no message)"),
                _str_or_none(inner.get("type")),
                None if inner.get("code") is None else str(inner.get("code")),
            )
        if isinstance(inner, str):
            return (inner, None, None)
        if "message" in data:  # AI/ML API: {message, path, requestId, statusCode, timestamp}
            message = data["message"]
            if isinstance(message, list):
                message = "; ".join(str(m) for m in message)
            return (str(message), _str_or_none(data.get("error")), None)
    return (_snippet(content, 500), None, None)


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``Retry-After`` (seconds or HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
            if value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from_response(status: int, content: bytes, headers: httpx.Headers) -> RequestError:
    """Map a non-200 answer to the error type that decides retry / row error / stop."""
    message, err_type, code = parse_error_body(content)
    label = code or err_type
    text = f"HTTP {status}" + (f" {label}" if label else "") + f": {message}"
    kwargs: dict[str, Any] = {
        "status": status,
        "code": code,
        "type": err_type,
        "headers": kept_headers(headers.raw),
    }
    if 300 <= status < 400:
        location = headers.get("location")
        if location:
            text += f" (Location: {location[:300]}; set --base-url to where it points)"
    if status == 401:
        return AuthenticationError(text, **kwargs)
    if status == 403:
        return PermissionDenied(text, **kwargs)
    if status == 429:
        marker = " ".join(x for x in (code, err_type) if x)
        if "insufficient_quota" in marker or (
            not marker and any(w in message.lower() for w in QUOTA_WORDS)
        ):
            return QuotaExceeded(text, **kwargs)
        return RateLimited(text, retry_after=parse_retry_after(headers), **kwargs)
    should_retry = headers.get("x-should-retry")
    if should_retry == "true" or status in (408, 409) or status >= 500:
        return ServerError(text, retry_after=parse_retry_after(headers), **kwargs)
    return BadRequest(text, **kwargs)
