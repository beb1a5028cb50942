"""batch-prompt-pipeline: a table of prompts through an OpenAI-compatible chat API.

import pipeline
df = pipeline.run(frame, output="out.parquet", template="Label: {text}", concurrency=64)
df = await pipeline.arun(frame, ...)  # in a notebook or other async code

help(pipeline.run) lists every option.
"""

from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .errors import (
    ConfigError,
    FingerprintMismatch,
    InputError,
    LockHeld,
    OutputError,
    PipelineError,
    RunAborted,
    UsageError,
)
from .records import RunSummary
from .runner import run_async, run_batch
from .settings import build_config
from .status import RunStatus, run_status

if TYPE_CHECKING:
    from .api import arun, run

__version__ = "0.1.0"


_LAZY = ("arun", "run")


def __getattr__(name: str) -> Any:
    # pandas is imported only when the DataFrame API is used: the CLI starts faster.
    if name in _LAZY:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ConfigError",
    "FingerprintMismatch",
    "InputError",
    "LockHeld",
    "OutputError",
    "PipelineError",
    "RunAborted",
    "RunConfig",
    "RunStatus",
    "RunSummary",
    "UsageError",
    "arun",
    "build_config",
    "run",
    "run_async",
    "run_batch",
    "run_status",
]
