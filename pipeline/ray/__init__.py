"""The Ray engine (the ``[ray]`` extra): our async engine inside Ray actors.

- ``run_on_ray(data, output, config)``: what ``pipeline run --engine ray`` and
  ``pipeline.run(..., engine="ray")`` call. The driver gives each actor one shard of the job
  (``--shard i/N`` semantics, see ``pipeline.shards``) over OUTPUT's shared checkpoint, reruns
  the shard of an actor that died, and finishes OUTPUT as a local run would (``driver``).
- ``complete(dataset, **options)``: a lazy Ray Data transformation, rows plus the result
  columns, for users composing their own pipelines (``dataset``).
- ``connect(address)``: join a cluster, or start a local instance bound to 127.0.0.1 (``local``).

Importing this package imports ray; ``pipeline`` itself never does.
"""

from __future__ import annotations

from ..errors import ConfigError

try:
    import ray as _ray_module  # noqa: F401  (checked here: one clear error, not a traceback)
except ImportError:  # pragma: no cover - the tests skip without ray
    raise ConfigError(
        "--engine ray needs Ray: pip install 'batch-prompt-pipeline[ray]' (or "
        "pip install 'ray[data]'), or use --engine local."
    ) from None

from .dataset import complete as complete
from .driver import run_on_ray as run_on_ray
from .local import connect as connect

__all__ = ["complete", "connect", "run_on_ray"]
