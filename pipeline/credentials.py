"""The API key: from ``--api-key-file``, else the environment (``--api-key-env`` or the defaults).

Owns where the key is looked for and the error naming what to set; the key is returned, never
logged or stored. Does not hold the config record (``config.py``, which re-exports
``resolve_api_key`` and ``DEFAULT_KEY_ENVS`` for old imports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig

DEFAULT_KEY_ENVS = ("AIMLAPI_API_KEY", "OPENAI_API_KEY")


def resolve_api_key(config: RunConfig, environ: dict[str, str] | None = None) -> str | None:
    """The API key from the environment (or ``api_key_file``); None is fine for localhost.

    Raises ConfigError naming the variable to set when a remote base URL has no key.
    """
    env = os.environ if environ is None else environ
    if config.api_key_file:
        try:
            key = Path(config.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"--api-key-file {config.api_key_file}: cannot read it ({exc.strerror})."
            ) from None
        if key:
            return key
        raise ConfigError(f"--api-key-file {config.api_key_file} is empty.")
    names = (config.api_key_env,) if config.api_key_env else DEFAULT_KEY_ENVS
    for name in names:
        key = env.get(name, "").strip()
        if key:
            return key
    if config.is_local:
        return None
    wanted = " or ".join(names)
    raise ConfigError(
        f"No API key: set {wanted} in the environment (or name another variable with "
        f"--api-key-env, or a file with --api-key-file). {config.base_url} is not local, "
        "so a key is required."
    )
