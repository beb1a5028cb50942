"""Batch mode's own cost: N rows through `pipeline run --batch` against the simulator's Batch
API (batches complete at once: `--batch-seconds 0`), beside an online run of the same rows,
back to back, alternating.

    python benchmarks/batch_mode.py                  # 100,000 rows, 2 rounds (~4 min)
    python benchmarks/batch_mode.py --rows 20000 --reps 1

Both sides read the same CSV (~300-character prompts), write Parquet, and talk only to the
simulator on 127.0.0.1 (pinned to core 0; the clients to core 1). Reported per side: wall time
from process start to exit, client CPU and peak RSS. The batch side does what the online side
does not (cut the asks into part files of at most 50,000 lines, upload, create, poll,
download, parse, merge): its wall time minus the online run's is that overhead, and the
simulator's work answering is about the same on both sides. Target (issue 15): overhead
under 20% of the online run's wall time, peak RSS within the online run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the shared helpers: servers, tables, the measured launcher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    inp = work / "in.csv"
    bench.write_csv(bench.make_table(args.rows), inp)
    sides: dict[str, list[bench.ChildRun]] = {"online": [], "batch": []}
    server_s: dict[str, list[float]] = {"online": [], "batch": []}
    with bench.simulator(work, "sim", batch_seconds=0) as server:
        for rep in range(args.reps):
            for side, extra in (("online", []), ("batch", ["--batch", "--poll-interval", "0.2"])):
                out = work / f"{side}-{rep}.parquet"
                cmd = bench.pipeline_cmd(inp, out, server.base_url, 64, *extra)
                server_before = server.cpu_s()
                run = bench.run_child(cmd, work / f"{side}-{rep}.log")
                server_s[side].append(server.cpu_s() - server_before)
                if run.rc != 0:
                    raise RuntimeError(f"{side} failed (rc {run.rc}): {run.output()[-2000:]}")
                summary = bench.read_summary(out)
                assert summary["ok"] == args.rows, summary
                sides[side].append(run)
                bench.log(
                    f"{side} #{rep}: {run.wall_s:.1f} s, CPU {run.cpu_s:.1f} s, "
                    f"peak RSS {run.maxrss_mb:.0f} MB"
                )
    table = {
        side: {
            "wall_s": statistics.median(r.wall_s for r in runs),
            "cpu_s": statistics.median(r.cpu_s for r in runs),
            "maxrss_mb": statistics.median(r.maxrss_mb for r in runs),
            "server_cpu_s": statistics.median(server_s[side]),
        }
        for side, runs in sides.items()
    }
    online, batch = table["online"], table["batch"]
    overhead = (batch["wall_s"] - online["wall_s"]) / online["wall_s"]
    # the server's batch work (validate, answer, write result files) is the provider's time,
    # spent while the client waits: without it, what is left is batch mode's own
    own = batch["wall_s"] - batch["server_cpu_s"]
    print(f"| side ({args.rows:,} rows) | wall s | client CPU s | server CPU s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for side, row in table.items():
        print(
            f"| {side} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['server_cpu_s']:.1f} "
            f"| {row['maxrss_mb']:.0f} |"
        )
    print(
        f"\nbatch wall without the server's batch work: {own:.1f} s = "
        f"{(own - online['wall_s']) / online['wall_s']:+.0%} of the online wall time"
    )
    print(
        f"batch overhead: {overhead:+.0%} of the online wall time (target < 20%); "
        f"peak RSS {batch['maxrss_mb'] / online['maxrss_mb']:.2f}x the online run's "
        f"({args.reps} rounds, {time.strftime('%Y-%m-%d %H:%M')})"
    )
    bench.RESULTS.mkdir(exist_ok=True)
    (bench.RESULTS / f"batch-mode-{int(time.time())}.json").write_text(
        json.dumps({"rows": args.rows, "table": table, "overhead": overhead}, indent=2)
    )


if __name__ == "__main__":
    main()
