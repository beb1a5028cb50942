"""batch-prompt-pipeline: a table of prompts through an OpenAI-compatible chat API.

import pipeline
df = pipeline.run(frame, output="out.parquet", template="Label: {text}", concurrency=64)
"""

from .api import run
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

__version__ = "0.1.0"

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
