"""The Ray engine's shared --rpm: 2 actors against the simulator refusing beyond 20 requests/s
(burst 5), ``--rpm 1170`` (19.5/s); prints the 429s and the rate from the first request to
the last. ``python benchmarks/ray_rate.py [ROWS]`` (default 300; ~15 s plus Ray's start)."""

from __future__ import annotations

import sys
import tempfile

import pandas as pd

import pipeline
from pipeline.simulator import SimulatorConfig, SimulatorThread


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    config = SimulatorConfig(rps_limit=20, rps_burst=5, latency_ms=5, record=True)
    with SimulatorThread(config) as sim, tempfile.TemporaryDirectory() as where:
        frame = pipeline.run(
            pd.DataFrame({"prompt": [f"row {i}" for i in range(rows)]}),
            f"{where}/out.parquet",
            base_url=sim.base_url,
            engine="ray",
            ray_actors=2,
            rpm=1170,
            concurrency=16,
            progress=False,
            quiet=True,
        )
        times = sorted(r.time for r in sim.simulator.requests)
        refused = sim.simulator.stats["429"]
    span = times[-1] - times[0]
    print(
        f"rows ok {int((frame['status'] == 'ok').sum())}/{rows}, 429s {refused}, "
        f"{(len(times) - 1) / span:.2f} requests/s over {span:.1f} s "
        "(server limit 20/s, --rpm 19.5/s)"
    )


if __name__ == "__main__":
    main()
