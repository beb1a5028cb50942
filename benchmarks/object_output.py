"""OUTPUT on object storage vs a local OUTPUT: the same job against the simulator, once with
``-o local.parquet`` and once with ``-o s3://...`` on a moto S3 server on 127.0.0.1 (the
test extra), alternating, medians of ``--rounds``. Prints wall time per side, the ratio,
and the objects the S3 run PUT. ``python benchmarks/object_output.py [--rows N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

from pipeline.simulator import SimulatorConfig, SimulatorThread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="bench", aws_secret_access_key="bench",
    )  # fmt: skip
    client.create_bucket(Bucket="bench")
    walls: dict[str, list[float]] = {"local": [], "s3": []}
    with tempfile.TemporaryDirectory() as where, SimulatorThread(SimulatorConfig()) as sim:
        source = Path(where) / "in.parquet"
        prompts = [f"benchmark row {i} " + "x" * 200 for i in range(args.rows)]
        pd.DataFrame({"prompt": prompts}).to_parquet(source)
        objects = 0
        for round_ in range(args.rounds):
            for side in ("local", "s3"):
                output = (
                    f"s3://bench/r{round_}/out.parquet"
                    if side == "s3"
                    else str(Path(where) / f"r{round_}.parquet")
                )
                work = Path(where) / f"work{round_}"
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "pipeline", "run", str(source), "-o", output,
                     "--base-url", sim.base_url, "--no-progress", "--quiet"],
                    env={**env, "PIPELINE_WORK_DIR": str(work)}, check=True,
                )  # fmt: skip
                walls[side].append(time.perf_counter() - started)
                if side == "s3":
                    listed = client.list_objects_v2(Bucket="bench", Prefix=f"r{round_}/")
                    objects = listed.get("KeyCount", 0)
    server.stop()
    local, s3 = statistics.median(walls["local"]), statistics.median(walls["s3"])
    print(
        f"{args.rows} rows, medians of {args.rounds}: local {local:.2f} s, s3 {s3:.2f} s, "
        f"s3/local {s3 / local:.2f}x; objects in the store after one run: {objects}"
    )
    print(f"walls: local {walls['local']}, s3 {walls['s3']}")


if __name__ == "__main__":
    main()
