"""The Ray engine's shared limits: 2 actors against the simulator refusing beyond 20
requests/s (burst 5); prints the 429s and the rate from the first request to the last.

    python benchmarks/ray_rate.py [ROWS]              # --rpm 1170 (19.5/s) for the job
    python benchmarks/ray_rate.py [ROWS] --headers    # no --rpm: the server announces its
                                                      # limit in x-ratelimit-* headers
    python benchmarks/ray_rate.py [ROWS] --headers --local   # the same, one local run
    python benchmarks/ray_rate.py [ROWS] --unannounced       # no --rpm, no headers: each
                                                      # actor's rate controller finds it

ROWS defaults to 300 (~15 s plus Ray's start).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import pandas as pd

import pipeline
from pipeline.simulator import SimulatorConfig, SimulatorThread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", type=int, nargs="?", default=300)
    parser.add_argument("--headers", action="store_true")
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--unannounced", action="store_true")
    args = parser.parse_args()
    config = SimulatorConfig(
        rps_limit=20, rps_burst=5, latency_ms=5, record=True, rate_limit_headers=args.headers
    )
    options: dict[str, Any] = {} if args.headers or args.unannounced else {"rpm": 1170}
    if not args.local:
        options |= {"engine": "ray", "ray_actors": 2}
    with SimulatorThread(config) as sim, tempfile.TemporaryDirectory() as where:
        frame = pipeline.run(
            pd.DataFrame({"prompt": [f"row {i}" for i in range(args.rows)]}),
            f"{where}/out.parquet",
            base_url=sim.base_url,
            concurrency=16,
            progress=False,
            quiet=True,
            **options,
        )
        times = sorted(r.time for r in sim.simulator.requests)
        refused = sim.simulator.stats["429"]
    span = times[-1] - times[0]
    limit = "headers" if args.headers else "unannounced" if args.unannounced else "--rpm 1170"
    print(
        f"{'local' if args.local else 'ray x2'}, {limit}: "
        f"rows ok {int((frame['status'] == 'ok').sum())}/{args.rows}, {len(times)} requests, "
        f"429s {refused}, {(len(times) - 1) / span:.2f} requests/s over {span:.1f} s "
        "(server limit 20/s)"
    )


if __name__ == "__main__":
    main()
