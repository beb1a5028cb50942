"""A run's fingerprint: what determines a response (endpoint, model, body parameters, prompt
source, samples, answer format), by name, and its short hash. A checkpoint made under another
fingerprint is refused, naming what changed. Options that shape only how a run runs
(concurrency, batch mode, logging) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .config import RunConfig
from .labels import load_labels
from .structured import load_schema

# The value of a fingerprint part that is left out when it has it (see fingerprint_parts).
FINGERPRINT_DEFAULTS: dict[str, Any] = {"n": 1, "answer_format": None}


def fingerprint_parts(config: RunConfig) -> dict[str, Any]:
    """What determines a response, by name (so that a mismatch can say what changed)."""
    kind, value = config.prompt_source
    models = config.all_models
    parts: dict[str, Any] = {
        "base_url": config.base_url.rstrip("/"),
        "model": config.model if len(models) == 1 else list(models),
        "body_parameters": config.body_params(),
        "prompt_source": {"kind": kind, "value": value},
        "system_prompt": config.system,
    }
    if config.n != 1:  # left out at 1, so that runs without samples keep their fingerprint
        parts["n"] = config.n
    if config.json_schema is not None or config.labels is not None:
        parts["answer_format"] = {
            "json_schema": load_schema(config.json_schema) if config.json_schema else None,
            "schema_mode": config.schema_mode,
            "labels": load_labels(config.labels) if config.labels else None,
            "max_reasks": config.max_reasks,
        }
    return parts


def fingerprint(config: RunConfig) -> str:
    """A short stable hash of ``fingerprint_parts``."""
    return fingerprint_of(fingerprint_parts(config))


def fingerprint_of(parts: dict[str, Any]) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
