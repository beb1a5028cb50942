"""INPUT on object storage: ``pipeline run s3://bucket/key ...`` against a real S3-protocol
server (moto's, started here on 127.0.0.1), with the endpoint and credentials from the
standard AWS variables. The object is read once into a private local copy; a rerun while it
is unchanged downloads nothing; credentials are never written or printed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import S3_SECRET as SECRET
from conftest import cli

from pipeline.simulator import SimulatorThread

ANSWER = "Simulated answer to: "


def put(client: Any, key: str, data: bytes) -> None:
    client.put_object(Bucket="inputs", Key=key, Body=data)


def test_a_csv_and_a_parquet_on_s3_run_like_local_files_and_resume_from_the_copy(
    s3: Any, simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [f"stored prompt {i}" for i in range(40)]
    put(s3, "jobs/in.csv", pd.DataFrame({"prompt": prompts}).to_csv(index=False).encode())
    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": prompts[:10]}), sink)
    put(s3, "jobs/in.parquet", sink.getvalue())
    base = ["--base-url", simulator.base_url, "--no-progress"]

    first = cli("run", "s3://inputs/jobs/in.csv", "-o", tmp_path / "a.parquet", *base)
    assert first.exit_code == 0, first.output
    frame = pd.read_parquet(tmp_path / "a.parquet")
    assert frame["prompt"].tolist() == prompts
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]
    parquet = cli("run", "s3://inputs/jobs/in.parquet", "-o", tmp_path / "b.parquet", *base)
    assert parquet.exit_code == 0, parquet.output
    assert pd.read_parquet(tmp_path / "b.parquet")["status"].eq("ok").sum() == 10

    # a rerun resumes (nothing sent), its input from the local copy while the object is
    # unchanged; a changed object is read again and only its new rows are sent
    sent = len(simulator.simulator.requests)
    again = cli("run", "s3://inputs/jobs/in.csv", "-o", tmp_path / "a.parquet", *base)
    assert again.exit_code == 0 and len(simulator.simulator.requests) == sent
    grown = [*prompts, "one more"]
    put(s3, "jobs/in.csv", pd.DataFrame({"prompt": grown}).to_csv(index=False).encode())
    more = cli("run", "s3://inputs/jobs/in.csv", "-o", tmp_path / "a.parquet", *base)
    assert more.exit_code == 0 and len(simulator.simulator.requests) == sent + 1
    assert pd.read_parquet(tmp_path / "a.parquet")["prompt"].tolist() == grown

    # the secret is nowhere: not in what was printed, not in the checkpoint or OUTPUT
    printed = first.output + parquet.output + again.output + more.output
    assert SECRET not in printed
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    manifest = (tmp_path / "a.parquet.checkpoint" / "manifest.json").read_text()
    assert '"input": "s3://inputs/jobs/in.csv"' in manifest


def test_a_missing_object_or_bucket_is_a_usage_error_naming_the_uri(
    s3: Any, simulator: SimulatorThread, tmp_path: Path
) -> None:
    for uri in ("s3://inputs/nope.csv", "s3://no-such-bucket/in.csv"):
        result = cli("run", uri, "-o", tmp_path / "out.parquet", "--base-url", simulator.base_url)
        assert result.exit_code == 2, result.output
        assert uri in result.output and "Traceback" not in result.output
    assert simulator.simulator.requests == []
