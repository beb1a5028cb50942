"""Scale-out figure (a): one job as 2 shard processes (`--shard 0/2`, `--shard 1/2`, started
together on one OUTPUT) vs 1 process, against a fast local server, on this machine.

    python benchmarks/scale_out.py                 # 40k rows, 3 alternating rounds (~1 min)
    python benchmarks/scale_out.py --rows 10000 --reps 1
    python benchmarks/scale_out.py --flat 1000000,10000000   # (c): ~25 min

``--flat`` is figure (c): one local run per size (Parquet input of ~300-character prompts in
row groups of 100,000, written chunk by chunk), against the same server: peak RSS, wall time
and rows/s, to show that memory stays flat as rows grow.

The server (Debian's nginx answering a fixed completion, or the simulator when nginx is
absent) runs pinned to core 0; the clients are not pinned (two shards need two cores). A
and B alternate so that other load on the machine hits both alike. Reported per side:
rows/s of the job (first launch to last exit), client CPU seconds per 1000 rows, and the
server's CPU share over the job (what limits it). Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the shared helpers: servers, tables, the measured launcher)


def job_cmd(inp: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [
        bench.PY, "-m", "pipeline", "run", str(inp), "-o", str(out), "--base-url", base_url,
        "--model", bench.MODEL, "--concurrency", "64", "--no-progress", "--quiet", *extra,
    ]  # fmt: skip


def run_together(cmds: list[list[str]], work: Path, tag: str) -> dict[str, Any]:
    """Start every command at once through measure.py; wall from first launch to last exit."""
    procs = []
    results = []
    for i, cmd in enumerate(cmds):
        res = work / f"{tag}-{i}.rusage.json"
        launcher = [bench.PY, str(HERE / "measure.py"), str(res), str(work / f"{tag}-{i}.log")]
        procs.append(
            subprocess.Popen(
                [*launcher, "900", "--", *cmd], cwd=bench.CHILD_CWD, env=bench.child_env()
            )
        )
        results.append(res)
    for proc in procs:
        proc.wait()
    runs = [json.loads(path.read_text()) for path in results]
    if any(r["rc"] != 0 for r in runs):
        logs = [(work / f"{tag}-{i}.log").read_text()[-800:] for i in range(len(cmds))]
        raise RuntimeError(f"{tag}: a client failed: {logs}")
    start = min(r["launched_at"] for r in runs)
    end = max(r["launched_at"] + r["wall_s"] for r in runs)
    return {
        "wall_s": end - start,
        "client_cpu_s": sum(r["user_s"] + r["sys_s"] for r in runs),
        "maxrss_mb": max(r["maxrss_mb"] for r in runs),
    }


def flat(sizes: list[int], work: Path) -> None:
    """Figure (c): peak RSS and wall time of one run per size."""
    server = bench.nginx_server(work) or bench.simulator(work, "sim")
    rows_out = []
    with server:
        for size in sizes:
            inp = work / f"in-{size}.parquet"
            writer = None
            for start in range(0, size, 100_000):
                table = bench.make_table(min(100_000, size - start), start=start)
                if writer is None:
                    writer = bench.pq.ParquetWriter(inp, table.schema, compression="zstd")
                writer.write_table(table)
            assert writer is not None
            writer.close()
            out = work / f"out-{size}" / "out.parquet"
            out.parent.mkdir()
            cmd = job_cmd(inp, out, server.base_url)
            run = bench.run_child(bench.pinned(cmd, bench.CLIENT_CPU), work / f"flat-{size}.log")
            assert run.rc == 0, run.output()[-2000:]
            ok = bench.pq.read_table(out, columns=["status"]).column("status")
            assert ok.to_pylist().count("ok") == size
            rows_out.append((size, run.maxrss_mb, run.wall_s, size / run.wall_s))
            bench.log(f"flat {size}: peak RSS {run.maxrss_mb:.0f} MB, {run.wall_s:.0f} s")
            shutil.rmtree(out.parent)
            inp.unlink()
    print("| rows | peak RSS MB | wall s | rows/s |")
    print("|---|---|---|---|")
    for size, rss, wall, rate in rows_out:
        print(f"| {size:,} | {rss:.0f} | {wall:.0f} | {rate:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--flat", help="figure (c): comma-separated sizes of one run each")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    if args.flat:
        flat([int(n) for n in args.flat.split(",")], work)
        return
    inp = work / "in.parquet"
    bench.write_parquet_one_group(bench.make_table(args.rows), inp)
    server = bench.nginx_server(work) or bench.simulator(work, "sim")
    sides: dict[str, list[dict[str, Any]]] = {"1 process": [], "2 shards": []}
    with server:
        for rep in range(args.reps):
            for side in sides:
                out = work / f"{side.replace(' ', '-')}-{rep}" / "out.parquet"
                out.parent.mkdir()
                if side == "1 process":
                    cmds = [job_cmd(inp, out, server.base_url)]
                else:
                    cmds = [job_cmd(inp, out, server.base_url, "--shard", f"{i}/2") for i in (0, 1)]
                server_before = server.cpu_s()
                run = run_together(cmds, work, f"{side.replace(' ', '-')}-{rep}")
                run["server_cpu_share"] = (server.cpu_s() - server_before) / run["wall_s"]
                run["rows_per_s"] = args.rows / run["wall_s"]
                done = bench.pq.read_table(out, columns=["status"]).column("status").to_pylist()
                assert done == ["ok"] * args.rows, f"{side}: not every row ok"
                sides[side].append(run)
                bench.log(
                    f"{side} #{rep}: {run['rows_per_s']:.0f} rows/s, client CPU "
                    f"{1000 * run['client_cpu_s'] / args.rows:.3f} s/1000 rows, server "
                    f"{run['server_cpu_share']:.0%} of a core"
                )
    table = {}
    for side, runs in sides.items():
        table[side] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("rows_per_s", "client_cpu_s", "server_cpu_share", "maxrss_mb")
        }
    ratio = table["2 shards"]["rows_per_s"] / table["1 process"]["rows_per_s"]
    print("| side | rows/s | client CPU s / 1000 rows | server CPU (share of a core) |")
    print("|---|---|---|---|")
    for side, row in table.items():
        print(
            f"| {side} | {row['rows_per_s']:.0f} | {1000 * row['client_cpu_s'] / args.rows:.3f} "
            f"| {row['server_cpu_share']:.0%} |"
        )
    print(
        f"\n2 shards / 1 process: {ratio:.2f}x ({args.rows} rows, {args.reps} rounds, "
        f"server {server.name}, {time.strftime('%Y-%m-%d %H:%M')})"
    )
    (bench.RESULTS).mkdir(exist_ok=True)
    (bench.RESULTS / f"scale-out-{int(time.time())}.json").write_text(
        json.dumps({"rows": args.rows, "table": table, "ratio": ratio}, indent=2)
    )


if __name__ == "__main__":
    main()
