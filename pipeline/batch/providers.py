"""Which Batch API a run talks to: the dialect (``--batch-dialect``, else from the base URL),
what that provider refuses (checked before anything is sent), and the dialect's client.

``openai``: Files + Batches (OpenAI, Azure, Groq, DeepInfra, the simulator); ``anthropic``:
Message Batches (Anthropic); ``aimlapi``: the AI/ML API's batches for Claude models, the
default for ``api.aimlapi.com`` (BATCH-API.md section 3). Does not drive batches
(``executor``) nor speak HTTP itself (``openai``, ``anthropic``).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx

from ..asks import RequestShape
from ..config import RunConfig
from ..errors import ConfigError
from .anthropic import AimlapiDialect, AnthropicDialect, to_params
from .dialect import Dialect
from .openai import OpenAIBatches, OpenAIDialect
from .parts import ENDPOINT

DIALECTS = ("openai", "anthropic", "aimlapi")


def _host(config: RunConfig) -> str:
    return (urlsplit(config.base_url).hostname or "").lower()


def dialect_for(config: RunConfig) -> str:
    """``--batch-dialect``, or the one the base URL's provider speaks."""
    if config.batch_dialect is not None:
        return config.batch_dialect
    host = _host(config)
    if host.endswith("aimlapi.com"):
        return "aimlapi"
    return "anthropic" if host.endswith("anthropic.com") else "openai"


def check_batchable(config: RunConfig, models: Iterable[str], shape: RequestShape) -> str:
    """The run's dialect, or a ConfigError saying why its requests cannot go through that
    Batch API (before anything is sent; never a silent fall back to online)."""
    dialect = dialect_for(config)
    if dialect not in DIALECTS:
        raise ConfigError(f"--batch-dialect {dialect!r}: use {', '.join(DIALECTS)}.")
    if dialect == "openai":
        return dialect
    aimlapi = dialect == "aimlapi" or _host(config).endswith("aimlapi.com")
    for model in models:
        if aimlapi and not model.lower().startswith(("claude", "anthropic/")):
            raise ConfigError(
                f"--batch: the AI/ML API batches Claude models only, not '{model}'. "
                "Send it online (without --batch), or choose a Claude model."
            )
        to_params({"model": model, "messages": [], **shape.of(model)[0]})  # refuses early
    return dialect


def make_dialect(
    config: RunConfig, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None
) -> Dialect:
    """The client of ``config``'s Batch API (``dialect_for``)."""
    http = transport or httpx.AsyncHTTPTransport(retries=0)
    dialect = dialect_for(config)
    if dialect == "aimlapi":
        return AimlapiDialect(config.base_url, api_key, http)
    if dialect == "anthropic":
        return AnthropicDialect(config.base_url, api_key, http)
    api = OpenAIBatches(config.base_url, api_key, http, timeout=max(config.timeout, 600))
    return OpenAIDialect(api, ENDPOINT)
