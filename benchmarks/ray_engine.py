"""The Ray engine's overhead: the same job through `pipeline run --engine local` and
`--engine ray` (1 and 2 actors) against the local simulator.

    python benchmarks/ray_engine.py                  # 20k rows, 2 rounds (~3 min on 2 cores)
    python benchmarks/ray_engine.py --rows 5000 --rounds 1 --latency-ms 50

Every run is a real `pipeline run` process, timed from start to exit (read the CSV, send,
write Parquet; for Ray also start and stop a local instance on 127.0.0.1). Each engine runs
the job at N rows and at 1 row, so that the fixed cost (Ray's start-up and shutdown, the
finishing run) and the cost per row come apart:

    per row = (wall(N) - wall(1)) / (N - 1)        fixed = wall(1)

The engines alternate within a round (local, ray x1, ray x2, local, ...) so that load from
other work on the machine hits them alike; the table gives medians. The simulator is a
process of its own on 127.0.0.1; nothing is sent anywhere else. Needs the [ray] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {
    "local": ["--engine", "local"],
    "ray, 1 actor": ["--engine", "ray", "--ray-actors", "1"],
    "ray, 2 actors": ["--engine", "ray", "--ray-actors", "2"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_simulator(port: int, latency_ms: float) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pipeline", "simulate", "--port", str(port)]
    command += ["--latency-ms", str(latency_ms)]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the simulator did not start")


def run_once(work: Path, rows: int, engine: list[str], base_url: str, concurrency: int) -> float:
    """Wall seconds of one `pipeline run` of ``rows`` rows into a new OUTPUT."""
    data = work / f"in-{rows}.csv"
    if not data.exists():
        data.write_text("prompt\n" + "".join(f"row {i}\n" for i in range(rows)))
    output = work / "out" / "out.parquet"
    shutil.rmtree(output.parent, ignore_errors=True)
    output.parent.mkdir()
    command = [sys.executable, "-m", "pipeline", "run", str(data), "-o", str(output)]
    command += ["--base-url", base_url, "--concurrency", str(concurrency), "--quiet"]
    command += ["--no-progress", *engine]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    server = start_simulator(port, args.latency_ms)
    base_url = f"http://127.0.0.1:{port}/v1"
    walls: dict[str, dict[int, list[float]]] = {name: {1: [], args.rows: []} for name in ENGINES}
    try:
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as where:
            for _ in range(args.rounds):
                for rows in (1, args.rows):
                    for name, engine in ENGINES.items():
                        wall = run_once(Path(where), rows, engine, base_url, args.concurrency)
                        walls[name][rows].append(wall)
                        print(f"{name:14} {rows:>7} rows: {wall:6.2f} s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    report(walls, args)


def report(walls: dict[str, dict[int, list[float]]], args: argparse.Namespace) -> None:
    rows = args.rows
    lines = [
        f"{rows} rows, simulator latency {args.latency_ms:g} ms, --concurrency "
        f"{args.concurrency}, {args.rounds} round(s), {os.cpu_count()} CPUs; medians",
        "",
        "| engine | wall, 1 row (fixed) | wall, N rows | rows/s | per row | per row vs local |",
        "|---|---|---|---|---|---|",
    ]
    local_per_row = None
    results = {}
    for name in ENGINES:
        fixed = statistics.median(walls[name][1])
        whole = statistics.median(walls[name][rows])
        per_row = (whole - fixed) / (rows - 1)
        local_per_row = local_per_row or per_row
        results[name] = {"fixed_s": fixed, "wall_s": whole, "per_row_us": per_row * 1e6}
        lines.append(
            f"| {name} | {fixed:.2f} s | {whole:.2f} s | {rows / whole:,.0f} | "
            f"{per_row * 1e6:.0f} us | {per_row / local_per_row:.2f}x |"
        )
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"ray-{stamp}.json").write_text(
        json.dumps({"args": vars(args), "walls": walls, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
