"""Go-style durations as rate-limit headers and options write them (``1s``, ``6m0s``, ``12ms``)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float | None:
    """Go-style durations of ``x-ratelimit-reset-*``: ``1s``, ``6m0s``, ``12ms``, ``0.5``."""
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))  # a bare number means seconds
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None
