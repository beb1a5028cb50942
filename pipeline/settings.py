"""Settings: how a ``RunConfig`` is built from defaults, a TOML file and options, and checked.

``load_config_file`` reads ``configs/*.toml`` (unknown keys refused with a suggestion),
``build_config`` merges defaults < file < options and ``validate`` checks ranges and the
options that go together, loading what they name (schema, labels, scorer) so that errors
come before anything runs. The types a TOML value must have are read from the fields of
``RunConfig``. The record itself and its fingerprint are ``config``'s.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import (
    DEFAULT_MODEL,
    MAX_TOKENS_BOUND,
    RESERVED_PARAMS,
    RunConfig,
)
from .durations import parse_duration
from .errors import ConfigError

_FIELDS = {f.name: f for f in fields(RunConfig)}


def _fields_of(kind: str) -> set[str]:
    """The names of the RunConfig fields whose type is ``kind`` (or ``kind | None``)."""
    return {f.name for f in fields(RunConfig) if str(f.type).split("|")[0].strip() == kind}


_INT_FIELDS = _fields_of("int")
_FLOAT_FIELDS = _fields_of("float") - {"max_runtime"}  # a duration: "90s", "45m", "2h"
_BOOL_FIELDS = _fields_of("bool")
_STR_FIELDS = _fields_of("str")
# TOML keys that are not RunConfig fields but are accepted by load_config_file and
# passed through untouched (the CLI reads them itself).
EXTRA_KEYS: set[str] = set()


def read_text_arg(value: str, *, option: str, base_dir: Path | None = None) -> str:
    """Expand ``@FILE`` to the file's text; other values are returned as given."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{option}: file {path} does not exist.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{option}: file {path} is not UTF-8 text ({exc.reason}).") from None
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {path}: {exc.strerror}.") from None


def parse_response_format(value: Any, *, base_dir: Path | None = None) -> dict[str, Any] | None:
    """``json_object`` | ``text`` | ``@schema.json`` | a table from TOML -> the body's value."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError("response_format must be 'json_object', 'text' or '@schema.json'.")
    if value in ("json_object", "text"):
        return {"type": value}
    if not value.startswith("@"):
        raise ConfigError(
            f"--response-format {value!r} is not understood. "
            "Use json_object, text, or @schema.json (a JSON Schema file)."
        )
    text = read_text_arg(value, option="--response-format", base_dir=base_dir)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--response-format {value}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg})."
        ) from None
    if not isinstance(schema, dict):
        raise ConfigError(f"--response-format {value}: the file must hold a JSON object.")
    if "schema" in schema and "name" in schema:  # already a json_schema block
        return {"type": "json_schema", "json_schema": schema}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(value[1:]).stem)[:64] or "answer"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def parse_param(item: str) -> tuple[str, Any]:
    """``KEY=JSON`` -> (key, value). A value that is not JSON is taken as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--param {item!r}: expected KEY=VALUE, for example --param n=2.")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def did_you_mean(key: str) -> str:
    """`` Did you mean a, b?`` naming the options close to an unknown ``key``, or ""."""
    close = (
        difflib.get_close_matches(key, _FIELDS, n=3)
        or [k for k in _FIELDS if k.startswith(key[:4])][:3]
    )
    return f" Did you mean {', '.join(close)}?" if close else ""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; unknown keys and wrong types are errors that name them."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from None
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELDS and key not in EXTRA_KEYS:
            raise ConfigError(
                f"Config file {path}: unknown key '{raw_key}'.{did_you_mean(key)} "
                "See configs/example.toml for every key."
            )
        values[key] = value
    values["_base_dir"] = path.parent
    return values


def _check_type(key: str, value: Any, where: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: '{key}' must be {expected} (got {value!r}).")

    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        value = float(value)
    elif key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif key == "shard" and isinstance(value, list | tuple) and len(value) == 2:
        value = f"{value[0]}/{value[1]}"  # the API's shard=(i, n)
    elif key == "model" and isinstance(value, list | tuple):
        if not all(isinstance(v, str) for v in value):
            raise bad("a model name or a list of them")  # an empty name: validate() says so
        value = tuple(value)
    elif key in _STR_FIELDS:
        if not isinstance(value, str):
            raise bad("a string")
    elif key == "stop":
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        else:
            raise bad("a string or a list of strings")
    elif key == "max_runtime":
        seconds = (
            float(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else parse_duration(value)
            if isinstance(value, str)
            else None
        )
        if seconds is None or seconds <= 0:
            raise bad("a duration like 90s, 45m or 2h")
        value = seconds
    elif key == "models":
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        else:
            raise bad("a list of model names")
    elif key == "params" and not isinstance(value, dict):
        raise bad("a table of body fields")
    return value


def build_config(
    file_values: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    *,
    config_path: str | None = None,
) -> RunConfig:
    """Merge defaults < file < options (None in options means "not given"), then validate."""
    file_values = dict(file_values or {})
    base_dir = file_values.pop("_base_dir", None)
    merged: dict[str, Any] = {}
    where_file = f"Config file {config_path}" if config_path else "config"
    for key, value in file_values.items():
        if key in EXTRA_KEYS:
            continue
        merged[key] = _check_type(key, value, where_file)
    # @FILE in a config file is relative to that file
    for key in ("template", "system"):
        if isinstance(merged.get(key), str):
            merged[key] = read_text_arg(merged[key], option=key, base_dir=base_dir)
    if "response_format" in merged:
        merged["response_format"] = parse_response_format(
            merged["response_format"], base_dir=base_dir
        )
    params = dict(merged.pop("params", {}) or {})

    for key, value in (options or {}).items():
        if value is None or (key == "stop" and not value):
            continue
        if key == "params":
            params.update(value)
            continue
        if key not in _FIELDS:
            raise ConfigError(f"Unknown option '{key}'.{did_you_mean(key)}")
        value = _check_type(key, value, "option")
        if key in ("template", "system"):
            value = read_text_arg(value, option=f"--{key}")
        if key == "response_format":
            value = parse_response_format(value)
        merged[key] = value

    for key in params:
        if key in RESERVED_PARAMS:
            raise ConfigError(f"--param {key}=...: '{key}' is set with {RESERVED_PARAMS[key]}.")
    merged["params"] = params
    # model = ["a", "b"] (TOML, API) or --model repeated: several models
    model = merged.get("model")
    if isinstance(model, list | tuple):
        if not model:
            raise ConfigError("--model: give at least one model.")
        merged["models"] = tuple(model) if len(model) > 1 else ()
        merged["model"] = model[0]
    config = RunConfig(**merged)
    validate(config)
    return config


def split_models(values: Iterable[str]) -> tuple[str, ...]:
    """``--model a,b --model c`` -> ("a", "b", "c"): a comma separates models (no model id
    holds one). An empty name stays, so that validation refuses it by name."""
    return tuple(part.strip() for value in values for part in value.split(","))


def validate(config: RunConfig) -> None:
    """Range and consistency checks that do not need the input file."""
    sources = [
        name
        for name, value in (
            ("--prompt-column", config.prompt_column),
            ("--template", config.template),
            ("--messages-column", config.messages_column),
        )
        if value is not None
    ]
    if len(sources) > 1:
        raise ConfigError(
            f"Give exactly one prompt source; got {' and '.join(sources)}. "
            "Use --prompt-column COL, --template TEXT|@FILE or --messages-column COL."
        )
    if config.template is not None and not config.template.strip():
        raise ConfigError("--template is empty.")
    split = urlsplit(config.base_url)
    if split.scheme not in ("http", "https") or not split.netloc:
        raise ConfigError(
            f"--base-url {config.base_url!r} is not an http(s) URL, "
            "for example https://api.aimlapi.com/v1."
        )
    checks: list[tuple[bool, str]] = [
        (config.temperature is None or 0 <= config.temperature <= 2, "--temperature: 0 to 2"),
        (config.top_p is None or 0 < config.top_p <= 1, "--top-p: above 0, at most 1"),
        (config.max_tokens is None or config.max_tokens >= 1, "--max-tokens: at least 1"),
        (1 <= config.concurrency <= 10_000, "--concurrency: 1 to 10000"),
        (config.timeout > 0, "--timeout: above 0 seconds"),
        (config.max_response_bytes >= 1024, "--max-response-bytes: at least 1024"),
        (config.rpm is None or config.rpm > 0, "--rpm: above 0"),
        (config.max_cost is None or config.max_cost > 0, "--max-cost: above 0 USD"),
        (
            config.max_total_tokens is None or config.max_total_tokens > 0,
            "--max-total-tokens: above 0",
        ),
        (config.tpm is None or config.tpm > 0, "--tpm: above 0"),
        (config.max_retries >= 0, "--max-retries: 0 or more"),
        (config.max_retry_wait >= 0, "max_retry_wait: 0 or more seconds"),
        (config.limit is None or config.limit >= 1, "--limit: at least 1"),
        (config.grace >= 0, "--grace: 0 or more seconds"),
        (config.checkpoint_seconds > 0, "checkpoint_seconds: above 0"),
        (config.checkpoint_rows >= 1, "checkpoint_rows: at least 1"),
        (
            config.http_backend in ("http11", "aiohttp", "httpx"),
            "--http-backend: http11, aiohttp or httpx",
        ),
        (config.log_format in ("text", "json"), "--log-format: text or json"),
        (
            config.input_format in (None, "csv", "tsv", "parquet", "jsonl", "openai-batch"),
            "--input-format: csv, tsv, parquet, jsonl or openai-batch",
        ),
        (
            config.max_tokens is None or config.max_tokens <= MAX_TOKENS_BOUND,
            f"--max-tokens: at most {MAX_TOKENS_BOUND:,} (no model answers more; a budget "
            "reserves --max-tokens for every request, so a huge value stops --max-cost at "
            "once). Use the model's output limit, e.g. --max-tokens 4096",
        ),
        (
            config.delimiter is None or len(config.delimiter) == 1,
            "--delimiter: one character, e.g. ';' or '\\t' for a tab",
        ),
    ]
    for ok, rule in checks:
        if not ok:
            raise ConfigError(f"Out of range: {rule}.")
    _validate_answer_options(config)
    _validate_samples(config)
    _validate_shard(config)
    _validate_engine(config)
    if config.proxy is not None:
        from .proxy import settings_from

        settings_from(config.proxy, {})  # a ConfigError naming --proxy if it is no proxy URL


def _validate_shard(config: RunConfig) -> None:
    """--shard I/N: its form, and what a shard cannot do."""
    if config.shard is None:
        return
    from .shards import Shard

    shard = Shard.parse(config.shard)
    if config.restart:
        raise ConfigError(
            f"--shard {shard} with --restart: a shard would set aside the results of every "
            "shard of the job. Start over once without --shard (--restart --limit 1, or "
            "remove OUTPUT.checkpoint), then run the shards without --restart."
        )
    if config.batch:
        raise ConfigError(
            f"--shard {shard} with --batch: batch mode runs as one process (a Batch API job "
            "already runs on the provider's machines). Leave out --shard."
        )


def _validate_engine(config: RunConfig) -> None:
    """--engine local|ray, and what only the Ray engine takes."""
    if config.engine not in ("local", "ray"):
        raise ConfigError(f"Out of range: --engine: local or ray (got {config.engine!r}).")
    if config.engine == "local":
        if config.ray_address is not None or config.ray_actors is not None:
            raise ConfigError(
                "--ray-address / --ray-actors are for --engine ray: add --engine ray, or "
                "leave them out."
            )
        return
    if config.shard is not None:
        raise ConfigError(
            f"--engine ray with --shard {config.shard}: the Ray engine gives each actor a "
            "shard of the whole job itself. Leave out --shard."
        )
    if config.batch:
        raise ConfigError(
            "--engine ray with --batch: a Batch API job runs on the provider's machines. "
            "Leave out one of them."
        )
    if config.restart:
        raise ConfigError(
            "--engine ray with --restart: the actors run shards, and a shard cannot set aside "
            "the results of the others. Start over once with --engine local --restart "
            "--limit 1 (or remove OUTPUT.checkpoint), then run with --engine ray."
        )
    if config.ray_actors is not None and not 1 <= config.ray_actors <= 1024:
        raise ConfigError("Out of range: --ray-actors: 1 to 1024 (one shard of the job each).")


def _validate_samples(config: RunConfig) -> None:
    """--n, --samples and --n-mode: K within what the request can carry."""
    from .samples import LAYOUTS, MAX_NATIVE_N, N_MODES

    if config.n < 1:
        raise ConfigError(
            f"--n {config.n}: samples per row must be at least 1. Use --n 1 (the default) "
            "for one answer per row, or --n K for K samples."
        )
    if config.n_mode not in N_MODES:
        raise ConfigError(f"--n-mode {config.n_mode!r}: use {', '.join(N_MODES)}.")
    if config.samples not in LAYOUTS:
        raise ConfigError(f"--samples {config.samples!r}: use {' or '.join(LAYOUTS)}.")
    if config.n > MAX_NATIVE_N and config.n_mode != "seeds":
        raise ConfigError(
            f"--n {config.n}: --n-mode {config.n_mode} sends the API's n, which OpenAI caps "
            f"at {MAX_NATIVE_N} (the provider's schema sets no maximum). Use --n "
            f"{MAX_NATIVE_N} or less, or --n-mode seeds (one request per sample)."
        )


def _validate_answer_options(config: RunConfig) -> None:
    """Structured answers and scoring: load what they name now, so errors come first."""
    if config.json_schema is not None and config.labels is not None:
        raise ConfigError("Give --json-schema or --labels, not both.")
    if config.schema_mode not in ("auto", "native", "prompt"):
        raise ConfigError(f"--schema-mode {config.schema_mode!r}: use auto, native or prompt.")
    if config.max_reasks < 0:
        raise ConfigError("Out of range: --max-reasks: 0 or more.")
    if any(not m.strip() for m in config.all_models):
        raise ConfigError(
            f"--model {list(config.all_models)}: a model name cannot be empty. Give a name, "
            f"e.g. --model {DEFAULT_MODEL}, or leave --model out for that default."
        )
    if len(set(config.all_models)) != len(config.all_models):
        raise ConfigError(f"--model: the same model twice in {list(config.all_models)}.")
    if config.score is not None and config.expected_column is None:
        raise ConfigError("--score needs --expected-column COL (the right answers).")
    from .labels import load_labels
    from .scoring import make_scorer
    from .structured import load_schema

    if config.json_schema is not None:
        load_schema(config.json_schema)
    if config.labels is not None:
        load_labels(config.labels)
    if config.score is not None:
        make_scorer(config.score)
