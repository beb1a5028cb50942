"""The frozen run configuration: defaults < TOML file < CLI/keyword options, and its fingerprint.

Owns option names, types, ranges, ``@FILE`` expansion and the fingerprint of everything that
determines a response. It reads no input data and sends nothing. The API key is looked up
in ``credentials.py`` (``resolve_api_key``, re-exported here) and never stored in the config,
its fingerprint or any output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .credentials import DEFAULT_KEY_ENVS as DEFAULT_KEY_ENVS
from .credentials import resolve_api_key as resolve_api_key

DEFAULT_BASE_URL = "https://api.aimlapi.com/v1"
DEFAULT_MODEL = "gpt-3.5-turbo"
# No model answers more tokens than this: a larger --max-tokens is a typo (and would make a
# budget reserve it for every request).
MAX_TOKENS_BOUND = 1_000_000
# the seed of sample 0 in --n-mode seeds when --seed is not given (see samples.py)
DEFAULT_BASE_SEED = 1
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

# Body fields that have their own option; --param may not set them.
RESERVED_PARAMS = {
    "model": "--model",
    "messages": "--prompt-column / --template / --messages-column",
    "temperature": "--temperature",
    "max_tokens": "--max-tokens",
    "top_p": "--top-p",
    "seed": "--seed",
    "stop": "--stop",
    "response_format": "--response-format",
    "n": "--n (samples per row; see --n-mode)",
    "stream": "(streaming is not supported: batch work uses non-streaming responses)",
}


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a run needs besides INPUT and OUTPUT. Field names are the TOML keys."""

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    models: tuple[str, ...] = ()  # several --model: each row goes to every one
    wide: bool = False  # several models: one output row per input row, column groups
    api_key_env: str | None = None
    api_key_file: str | None = None
    # prompt source: exactly one of the three (default: prompt_column="prompt")
    prompt_column: str | None = None
    template: str | None = None
    messages_column: str | None = None
    system: str | None = None
    # structured answers and evaluation
    json_schema: str | None = None  # JSON Schema file for the answer
    schema_mode: str = "auto"  # auto | native | prompt
    schema_prefix: str = ""  # prefix of the answer's typed columns
    labels: str | None = None  # "a,b,c" or "@file": single-label classification
    max_reasks: int = 2  # re-asks of an answer that does not parse or validate
    expected_column: str | None = None
    score: str | None = None  # exact | contains | regex | json-field=PATH
    # samples per row (see pipeline/samples.py)
    n: int = 1  # samples per row
    samples: str = "list"  # list | long: how OUTPUT holds a row's samples
    n_mode: str = "auto"  # auto | native | seeds: how the samples are asked for
    # request body parameters; None means "leave out of the body"
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_format: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # rows and I/O
    id_column: str | None = None
    input_format: str | None = None
    delimiter: str | None = None  # CSV field separator; None: "," (a tab for .tsv / tsv)
    limit: int | None = None
    overwrite: bool = False
    restart: bool = False
    retry_failed: bool = False
    summary_json: str | None = None
    # sending
    concurrency: int = 32
    rpm: float | None = None
    tpm: float | None = None
    adaptive: bool = True
    timeout: float = 60.0
    max_retries: int = 5
    max_retry_wait: float = 120.0
    http_backend: str = "http11"
    max_response_bytes: int = 64 * 1024 * 1024  # one response body, as received and decoded
    # http://[user:pass@]host:port for every request; None: HTTPS_PROXY etc.; "": none
    proxy: str | None = None
    grace: float = 10.0
    max_runtime: float | None = None  # seconds; TOML/CLI accept "90s", "45m", "2h"
    # cost
    prices: str | None = None  # extra/override price table (TOML), beside configs/prices.toml
    max_cost: float | None = None  # USD for the whole OUTPUT, across runs
    max_total_tokens: int | None = None  # tokens for the whole OUTPUT, across runs
    dedup: bool = True  # rows with the same prompt are sent once
    cache: str | None = None  # response cache directory shared across runs and outputs
    dry_run: bool = False  # only estimate; send nothing
    # batch mode: answers through the provider's Batch API (pipeline/batch/)
    batch: bool = False
    batch_dialect: str | None = None  # openai | anthropic | aimlapi; None: from the base URL
    batch_max_requests: int | None = None  # lines per batch; None: the provider's cap
    poll_interval: float = 30.0  # seconds before the first poll; x1.5 while nothing changes
    wait: bool = True  # False (--no-wait): submit, collect what is ready, exit 9
    resubmit_cancelled: bool = False  # send again the rows of batches the user cancelled
    # scale-out: "I/N", this process takes shard I of N (0 <= I < N; shards.py)
    shard: str | None = None
    engine: str = "local"  # local | ray: answer in this process, or in Ray actors (pipeline.ray)
    ray_address: str | None = None  # --engine ray: a cluster's address; None: a local instance
    ray_actors: int | None = None  # --engine ray: actors (one shard each); None: the CPUs, >= 2
    # checkpoints and progress
    checkpoint_seconds: float = 2.0
    checkpoint_rows: int = 2000
    progress: bool = True
    log_interval: float = 10.0
    log_format: str = "text"
    quiet: bool = False

    @property
    def all_models(self) -> tuple[str, ...]:
        """Every model a row is sent to, in order."""
        return self.models or (self.model,)

    @property
    def base_seed(self) -> int:
        """The seed of sample 0 in seeds mode (sample s gets ``base_seed + s``)."""
        return self.seed if self.seed is not None else DEFAULT_BASE_SEED

    @property
    def prompt_source(self) -> tuple[str, str]:
        """(kind, value): ("column", name) | ("template", text) | ("messages", name)."""
        if self.template is not None:
            return ("template", self.template)
        if self.messages_column is not None:
            return ("messages", self.messages_column)
        return ("column", self.prompt_column or "prompt")

    def body_params(self) -> dict[str, Any]:
        """The request body fields besides model and messages; unset ones are left out."""
        body: dict[str, Any] = {}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = self.stop[0] if len(self.stop) == 1 else list(self.stop)
        if self.response_format is not None:
            body["response_format"] = self.response_format
        body.update(self.params)
        return body

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data for logs and manifests (holds no secret by construction)."""
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        if self.proxy:
            from .proxy import mask_proxy_url

            out["proxy"] = mask_proxy_url(self.proxy)
        return out

    @property
    def is_local(self) -> bool:
        """True when the base URL points at this machine (no API key needed)."""
        host = urlsplit(self.base_url).hostname or ""
        return host in LOCAL_HOSTS
