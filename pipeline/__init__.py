"""batch-prompt-pipeline: a table of prompts through an OpenAI-compatible chat API.

import pipeline
df = pipeline.run(frame, output="out.parquet", template="Label: {text}", concurrency=64)
"""

from typing import TYPE_CHECKING, Any

from .config import RunConfig, build_config
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

if TYPE_CHECKING:
    from .api import run

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # pandas is imported only when the DataFrame API is used: the CLI starts faster.
    if name == "run":
        from .api import run

        return run
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "FingerprintMismatch",
    "InputError",
    "LockHeld",
    "OutputError",
    "PipelineError",
    "RunAborted",
    "RunConfig",
    "RunSummary",
    "UsageError",
    "build_config",
    "run",
    "run_async",
    "run_batch",
]
