"""OUTPUT and its checkpoint on object storage (``-o s3://bucket/key.parquet``) against a real
S3-protocol server (moto's, on 127.0.0.1): each process works on its own local working copy
(``PIPELINE_WORK_DIR``, as on separate hosts) and the store is what they share. A result is
recorded once its part is in the store; OUTPUT appears there whole, or not at all.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
from conftest import S3_SECRET, cli, kill_job, point_aws_at, spawn, wait_for, write_csv

import pipeline
from pipeline import remote_output
from pipeline.simulator import SimulatorThread

MakeSimulator = Callable[..., SimulatorThread]
ANSWER = "Simulated answer to: "
URI = "s3://outputs/jobs/labels.parquet"


def stored(client: Any, key: str = "jobs/labels.parquet") -> pd.DataFrame:
    body = client.get_object(Bucket="outputs", Key=key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def keys(client: Any) -> list[str]:
    listing = client.list_objects_v2(Bucket="outputs")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def on_host(monkeypatch: pytest.MonkeyPatch, place: Path) -> None:
    """What follows runs as if on another host: its own working copies."""
    monkeypatch.setenv("PIPELINE_WORK_DIR", str(place))


def test_a_run_on_s3_writes_output_whole_and_another_host_resumes_from_the_store(
    s3: Any, simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [f"stored prompt {i}" for i in range(40)]
    source = write_csv(tmp_path / "in.csv", prompts)
    base = ["run", source, "-o", URI, "--base-url", simulator.base_url, "--no-progress"]

    on_host(monkeypatch, tmp_path / "host-a")
    first = cli(*base)
    assert first.exit_code == 0, first.output
    assert f"output: {URI}" in first.output
    frame = stored(s3)
    assert frame["prompt"].tolist() == prompts
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]
    assert any(k.startswith("jobs/labels.parquet.checkpoint/parts/part-") for k in keys(s3))
    assert not any(k.endswith((".lock", ".npz", ".npy", ".tmp")) for k in keys(s3))

    # another host: the store's checkpoint says every row is done; nothing is sent
    on_host(monkeypatch, tmp_path / "host-b")
    sent = len(simulator.simulator.requests)
    again = cli(*base)
    assert again.exit_code == 0 and len(simulator.simulator.requests) == sent, again.output
    grown = [*prompts, "one more"]
    write_csv(tmp_path / "in.csv", grown)
    on_host(monkeypatch, tmp_path / "host-c")
    more = cli(*base)
    assert more.exit_code == 0 and len(simulator.simulator.requests) == sent + 1
    assert stored(s3)["prompt"].tolist() == grown

    # OUTPUT lost from the store (a PUT that failed, a user's delete): the next run puts it
    s3.delete_object(Bucket="outputs", Key="jobs/labels.parquet")
    restored = cli(*base)
    assert restored.exit_code == 0 and len(simulator.simulator.requests) == sent + 1
    assert stored(s3)["prompt"].tolist() == grown

    estimate = cli("estimate", source, "-o", URI)
    assert estimate.exit_code == 0 and f"41 rows already done in {URI}" in estimate.output

    status = cli("status", URI, "--json")
    assert status.exit_code == 0, status.output
    shown = json.loads(status.output)
    assert shown["ok"] == 41 and shown["output"] == URI and shown["output_written"]

    # the secret is nowhere: not printed, not in the store, not in a working copy
    assert S3_SECRET not in first.output + again.output + more.output + status.output
    for key in keys(s3):
        body = s3.get_object(Bucket="outputs", Key=key)["Body"].read()
        assert S3_SECRET.encode() not in body, key
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert S3_SECRET.encode() not in path.read_bytes(), path


def test_an_object_no_run_of_ours_wrote_is_not_replaced_without_overwrite(
    s3: Any, simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_host(monkeypatch, tmp_path / "work")
    s3.put_object(Bucket="outputs", Key="jobs/labels.parquet", Body=b"someone else's file")
    source = write_csv(tmp_path / "in.csv", ["a", "b"])
    base = ["run", source, "-o", URI, "--base-url", simulator.base_url, "--no-progress"]
    refused = cli(*base)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert URI in refused.output and simulator.simulator.requests == []
    body = s3.get_object(Bucket="outputs", Key="jobs/labels.parquet")["Body"].read()
    assert body == b"someone else's file"
    assert cli(*base, "--overwrite").exit_code == 0
    assert stored(s3)["status"].tolist() == ["ok", "ok"]


@pytest.mark.parametrize(
    ("option", "named"),
    [("--batch", "--batch"), ("--restart", "--restart")],
)
def test_what_needs_a_filesystem_is_refused_before_sending(
    s3: Any,
    simulator: SimulatorThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    option: str,
    named: str,
) -> None:
    on_host(monkeypatch, tmp_path / "work")
    source = write_csv(tmp_path / "in.csv", ["a"])
    result = cli("run", source, "-o", URI, "--base-url", simulator.base_url, option)
    assert result.exit_code == 2 and named in result.output and URI in result.output
    assert simulator.simulator.requests == [] and keys(s3) == []


def test_deleting_the_stored_checkpoint_starts_over_even_where_a_working_copy_is_left(
    s3: Any, simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_host(monkeypatch, tmp_path / "work")
    source = write_csv(tmp_path / "in.csv", ["a", "b", "c"])
    base = ["run", source, "-o", URI, "--base-url", simulator.base_url, "--no-progress"]
    assert cli(*base).exit_code == 0 and len(simulator.simulator.requests) == 3
    for key in keys(s3):
        s3.delete_object(Bucket="outputs", Key=key)
    again = cli(*base)
    # the working copy's results belong to the deleted job: set aside, neither read nor
    # uploaded; every row is sent again
    assert again.exit_code == 0, again.output
    assert len(simulator.simulator.requests) == 6
    assert stored(s3)["status"].tolist() == ["ok"] * 3
    assert list((tmp_path / "work").rglob("*.checkpoint.aside-*"))


def test_mistakes_get_one_line_naming_the_uri_and_the_fix(
    s3: Any, simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_host(monkeypatch, tmp_path / "work")
    source = write_csv(tmp_path / "in.csv", ["a"])
    base = ["run", source, "--base-url", simulator.base_url]
    no_bucket = cli(*base, "-o", "s3://no-such-bucket/x.parquet")
    assert no_bucket.exit_code == 2
    assert "the bucket no-such-bucket does not exist" in no_bucket.output
    csv = cli(*base, "-o", "s3://outputs/x.csv")
    assert csv.exit_code == 2 and "name it s3://outputs/x.parquet" in csv.output
    for command in ("status", "merge"):
        missing = cli(command, "s3://outputs/none.parquet")
        assert missing.exit_code == 2
        assert "no checkpoint for s3://outputs/none.parquet" in missing.output, missing.output
    assert simulator.simulator.requests == [] and keys(s3) == []


def test_the_python_api_takes_an_s3_output(
    s3: Any, simulator: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_host(monkeypatch, tmp_path / "work")
    frame = pipeline.run(
        pd.DataFrame({"prompt": ["x", "y"]}), URI, base_url=simulator.base_url, progress=False
    )
    assert frame["completion"].tolist() == [ANSWER + "x", ANSWER + "y"]
    assert stored(s3)["completion"].tolist() == frame["completion"].tolist()


# -- SIGKILL: 3 shard processes on 3 "hosts", killed once each, then N = 2 on two others ----

KILL_ROWS = 600
KILL_CONCURRENCY = 8
CHECKPOINT_SECONDS = 0.25
LOSS_WINDOW = CHECKPOINT_SECONDS + 1.75  # checkpoint period + the part's PUT + slack


def recorded_keys(client: Any) -> set[int]:
    """The row keys of every result part in the store."""
    found: set[int] = set()
    for key in keys(client):
        if "/parts/part-" in key:
            body = client.get_object(Bucket="outputs", Key=key)["Body"].read()
            found.update(pd.read_parquet(io.BytesIO(body), columns=["key"])["key"].tolist())
    return found


@pytest.mark.slow
def test_three_shards_on_s3_killed_then_two_others_finish_every_row_once_in_order(
    s3: Any, make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=50)
    rng, prompts, base = kill_job(
        tmp_path, sim.base_url, URI, seed=5, rows=KILL_ROWS,
        concurrency=KILL_CONCURRENCY, checkpoint_seconds=CHECKPOINT_SECONDS,
    )  # fmt: skip
    requests = sim.simulator.requests
    procs = [
        spawn([*base, "--shard", f"{i}/3"], tmp_path / f"s{i}.log", work=tmp_path / f"host-{i}")
        for i in range(3)
    ]
    kills: list[float] = []
    for proc in procs:  # each at its own random point, the others still sending
        target = len(requests) + rng.randrange(40, 120)
        wait_for(lambda t=target: len(requests) >= t, f"{target} requests", proc)
        proc.send_signal(signal.SIGKILL)
        kills.append(time.time())
        assert proc.wait(timeout=10) == -signal.SIGKILL
    assert "jobs/labels.parquet" not in keys(s3)  # OUTPUT: not at all until it is whole
    sent_before = len(requests)
    rate = sent_before / max(kills[-1] - requests[0].time, 0.05)
    recorded = recorded_keys(s3)  # what the killed runs' parts put in the store
    assert len(recorded) >= sent_before - 3 * (rate * LOSS_WINDOW + KILL_CONCURRENCY)

    # two other hosts finish the job: only the store carries what the killed ones recorded
    finals = [
        spawn([*base, "--shard", f"{i}/2"], tmp_path / f"t{i}.log", work=tmp_path / f"host-{3 + i}")
        for i in range(2)
    ]
    for i, proc in enumerate(finals):
        assert proc.wait(timeout=120) == 0, (tmp_path / f"t{i}.log").read_text()

    frame = stored(s3)
    assert frame["prompt"].tolist() == prompts
    assert frame["status"].tolist() == ["ok"] * len(prompts)
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]
    # the other hosts sent exactly the rows the store had no result for
    assert len(requests) - sent_before == KILL_ROWS - len(recorded)
    counts = Counter(r.body["messages"][-1]["content"] for r in requests if r.body)
    assert set(counts) == set(prompts) and max(counts.values()) <= 2
    resent = sum(n - 1 for n in counts.values())
    assert resent <= 3 * (rate * LOSS_WINDOW + KILL_CONCURRENCY), (resent, rate)


class ReplacedWhileRead(BaseHTTPRequestHandler):
    """An S3-protocol endpoint holding one manifest that another host replaces between a
    reader's size lookup and its read: the first HEAD says the old size, the first GET
    sends the new, longer manifest cut at that size (what a read crossing a replace gets
    from a store); from then on the new one, whole."""

    old = json.dumps({"job_id": "j", "rows_total": 5}).encode()
    new = json.dumps({"job_id": "j", "rows_total": 5, "note": "x" * 200}).encode()
    looks: ClassVar[dict[str, int]] = {"HEAD": 0, "GET": 0}

    def _send(self, body: bytes, size: int, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(size))
        self.send_header("Last-Modified", "Sat, 05 Dec 2026 18:00:00 GMT")
        self.send_header("ETag", '"e"')
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.looks["HEAD"] += 1
        self._send(b"", len(self.old if self.looks["HEAD"] == 1 else self.new))

    def do_GET(self) -> None:
        self.looks["GET"] += 1
        body = self.new[: len(self.old)] if self.looks["GET"] == 1 else self.new
        lo, hi = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        self._send(body[lo : hi + 1], len(body[lo : hi + 1]), 206)

    def log_message(self, *args: object) -> None:
        pass


def test_a_manifest_replaced_while_it_is_read_is_read_again_not_taken_cut(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local = tmp_path / "manifest.json"
    with ThreadingHTTPServer(("127.0.0.1", 0), ReplacedWhileRead) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        point_aws_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        on_host(monkeypatch, tmp_path / "host")
        store = remote_output.RemoteOutput("s3://outputs/jobs/labels.parquet")
        try:
            store._download(f"{store.remote_checkpoint}/manifest.json", local)
        finally:
            server.shutdown()

    assert local.read_bytes() == ReplacedWhileRead.new  # not the new one cut at the old size
    assert ReplacedWhileRead.looks["GET"] >= 2
