"""INPUT and OUTPUT on Google Cloud Storage (``gs://``) against a real GCS-protocol server
(``gcp-storage-emulator``, started here on 127.0.0.1), read and written by pyarrow's own GCS
client, as a user's run would: the endpoint from ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` and the
credentials from the file ``GOOGLE_APPLICATION_CREDENTIALS`` names (its token endpoint a small
server here, also on 127.0.0.1: nothing is asked of any other address). The same promises as
on S3: OUTPUT appears whole, a killed run's recorded results are not sent again, the
credentials are written nowhere.
"""

from __future__ import annotations

import http.server
import io
import json
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, kill_job, spawn, wait_for

from pipeline.simulator import SimulatorThread

MakeSimulator = Callable[..., SimulatorThread]
ANSWER = "Simulated answer to: "
SECRET = "gcs-refresh-token-never-shown-42"
BUCKET = "bkt"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    """OAuth's token endpoint: any refresh gets a bearer token."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"access_token": "t", "expires_in": 3600, "token_type": "Bearer"})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


class Store:
    """The emulator's bucket ``bkt`` through pyarrow's GCS client (anonymous, as a test's
    own view of the store)."""

    def __init__(self, endpoint: str) -> None:
        import pyarrow.fs as pafs

        self.fs = pafs.GcsFileSystem(
            anonymous=True, scheme="http", endpoint_override=endpoint.removeprefix("http://")
        )

    def put(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{BUCKET}/{name}") as sink:
            sink.write(data)

    def get(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{BUCKET}/{name}") as source:
            return bytes(source.read())

    def names(self) -> list[str]:
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
        return sorted(
            info.path.removeprefix(f"{BUCKET}/")
            for info in found
            if info.type == pafs.FileType.File
        )

    def frame(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.get(name)))


@pytest.fixture
def gcs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    server_module = pytest.importorskip(
        "gcp_storage_emulator.server", reason="gcp-storage-emulator is a test extra"
    )
    server = server_module.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    host, port = server._api._httpd.server_address[:2]
    tokens = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    credentials = tmp_path_factory.mktemp("gcloud") / "credentials.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "pipeline-tests",
                "client_secret": "not-used",
                "refresh_token": SECRET,
                "token_uri": f"http://127.0.0.1:{tokens.server_address[1]}/token",
            }
        )
    )
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", endpoint)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    yield Store(endpoint)
    tokens.shutdown()
    tokens.server_close()
    server.stop()


def test_input_and_output_on_gcs_run_like_local_files(
    gcs: Store, simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [f"stored prompt {i}" for i in range(30)]
    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": prompts}), sink)
    gcs.put("jobs/in.parquet", sink.getvalue())
    uri = f"gs://{BUCKET}/jobs/labels.parquet"
    base = ["run", f"gs://{BUCKET}/jobs/in.parquet", "-o", uri]
    base += ["--base-url", simulator.base_url, "--no-progress"]

    monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path / "host-a"))
    first = cli(*base)
    assert first.exit_code == 0, first.output
    frame = gcs.frame("jobs/labels.parquet")
    assert frame["prompt"].tolist() == prompts
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]
    assert any(n.startswith("jobs/labels.parquet.checkpoint/parts/part-") for n in gcs.names())

    # another host finds every result in the store: nothing is sent again
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(tmp_path / "host-b"))
    sent = len(simulator.simulator.requests)
    again = cli(*base)
    assert again.exit_code == 0 and len(simulator.simulator.requests) == sent, again.output
    status = cli("status", uri, "--json")
    assert status.exit_code == 0 and json.loads(status.output)["ok"] == 30, status.output

    missing = cli("run", f"gs://{BUCKET}/jobs/nope.csv", "-o", tmp_path / "x.parquet")
    assert missing.exit_code == 2
    assert f"Input gs://{BUCKET}/jobs/nope.csv does not exist." in missing.output

    # the refresh token is nowhere: not printed, not in the store, not in a working copy
    assert SECRET not in first.output + again.output + status.output + missing.output
    for name in gcs.names():
        assert SECRET.encode() not in gcs.get(name), name
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_run_on_gcs_killed_then_resumed_elsewhere_sends_only_what_was_not_recorded(
    gcs: Store, make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=50)
    uri = f"gs://{BUCKET}/jobs/killed.parquet"
    rows = 400
    rng, prompts, base = kill_job(
        tmp_path, sim.base_url, uri, seed=7, rows=rows, concurrency=8, checkpoint_seconds=0.2
    )
    requests = sim.simulator.requests
    proc = spawn(base, tmp_path / "a.log", work=tmp_path / "host-a")
    target = rng.randrange(100, 200)
    wait_for(lambda: len(requests) >= target, f"{target} requests", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert "jobs/killed.parquet" not in gcs.names()  # OUTPUT: not at all until it is whole
    sent_before = len(requests)
    rate = sent_before / max(requests[-1].time - requests[0].time, 0.05)
    parts = [n for n in gcs.names() if n.startswith("jobs/killed.parquet.checkpoint/parts/")]
    recorded = {k for n in parts for k in pq.read_table(io.BytesIO(gcs.get(n)))["key"].to_pylist()}
    assert len(recorded) >= sent_before - (rate * 2.0 + 8)  # a part every 0.2 s, PUT, slack

    rerun = spawn(base, tmp_path / "b.log", work=tmp_path / "host-b")
    assert rerun.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()
    frame = gcs.frame("jobs/killed.parquet")
    assert frame["prompt"].tolist() == prompts
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]
    # the rerun (another host, only the store to go by) sent exactly the rows the store
    # had no result for
    assert len(requests) - sent_before == rows - len(recorded)
    counts = Counter(r.body["messages"][-1]["content"] for r in requests if r.body)
    assert set(counts) == set(prompts) and max(counts.values()) <= 2
