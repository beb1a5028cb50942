"""Two processes on one unannounced limit, in virtual time, over many start offsets and
round trips: how often the rate controller meets issue 13's targets (together >= 0.85 of
the limit, each >= 1/3 of the total while both run) and its worst 429 share.

    python benchmarks/rate_sweep.py          # 36 cases, ~1 minute
    PYTHONPATH=/tmp/old python benchmarks/rate_sweep.py   # the same for an exported tree

The scripted server and virtual clock are the ones of ``tests/test_rate_control.py`` (a
token bucket of 20 req/s holding 5; each refused row waits 1 s, holding no slot); the
second process starts ``delay`` seconds after the first. No sockets at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_rate_control import ScriptedServer, run_two

LIMIT = 20.0
DELAYS = [0, 0.3, 0.7, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8]
ROUND_TRIPS = [0.01, 0.05, 0.3]


def case(delay: float, round_trip: float, rows: int = 600) -> tuple[float, float, float]:
    """(smaller share of the total, total / limit, 429 share) while both run."""
    server = ScriptedServer(rate=lambda t: LIMIT, burst=5)
    end = run_two(server, delay, round_trip, rows)
    total = server.rate_between(delay, end)
    each = [server.rate_between(delay, end, client=k) for k in (0, 1)]
    return min(each) / total, total / LIMIT, server.refused_share(delay, end)


def main() -> None:
    results = []
    for delay in DELAYS:
        row = []
        for round_trip in ROUND_TRIPS:
            smaller, total, refused = case(delay, round_trip)
            results.append((smaller, total, refused))
            row.append(f"{smaller:.2f}/{total:.2f}/{refused:.0%}")
        print(f"second starts {delay:>4} s later (rtt {ROUND_TRIPS}): {'  '.join(row)}")
    met = sum(1 for s, t, _ in results if s >= 1 / 3 and t >= 0.85)
    print(
        f"met {met}/{len(results)}; smaller share worst {min(s for s, _, _ in results):.2f}; "
        f"429 share worst {max(r for _, _, r in results):.1%}"
    )


if __name__ == "__main__":
    main()
