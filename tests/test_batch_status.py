"""``pipeline status OUTPUT`` of a batch run shows each batch's dialect, the provider's
status and request counts as its last poll saw them, from the journal (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from batch_server import BatchServer, Faults
from click.testing import CliRunner
from conftest import run_job

from pipeline.cli import main
from pipeline.errors import EXIT_BATCHES_RUNNING, EXIT_OK

FAST = {"batch": True, "poll_interval": 0.01}


def test_status_shows_the_dialect_provider_status_and_counts_of_each_batch(
    tmp_path: Path,
) -> None:
    data, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    pd.DataFrame({"prompt": [f"item {i}" for i in range(12)]}).to_csv(data, index=False)
    with BatchServer(Faults(polls_running=2)) as server:
        options = {"base_url": server.base_url, "batch_max_requests": 8, "wait": False, **FAST}
        assert run_job(data, output, **options).exit_code == EXIT_BATCHES_RUNNING  # created
        assert run_job(data, output, **options).exit_code == EXIT_BATCHES_RUNNING  # polled
        created = set(server.batches)
    # the server is gone: status reads the journal only
    text = CliRunner().invoke(main, ["status", str(output)]).stdout
    info = json.loads(CliRunner().invoke(main, ["status", str(output), "--json"]).stdout)
    # each part's own batch (the parts are created side by side, in either order)
    assert {b["batch_id"] for b in info["batches"]} == created
    assert sorted(b["lines"] for b in info["batches"]) == [4, 8]
    for b in info["batches"]:
        assert f"submitted, {b['batch_id']} (openai: in_progress, 0/{b['lines']} done)" in text
    seen = [
        (b["dialect"], b["provider_status"], b["completed"], b["total"]) for b in info["batches"]
    ]
    assert seen == [("openai", "in_progress", 0, 0), ("openai", "in_progress", 0, 0)]

    with BatchServer() as server:  # another server: a finished run needs no network either
        done = tmp_path / "done.parquet"
        assert run_job(data, done, base_url=server.base_url, **FAST).exit_code == EXIT_OK
    (batch,) = json.loads(CliRunner().invoke(main, ["status", str(done), "--json"]).stdout)[
        "batches"
    ]
    assert (batch["stage"], batch["provider_status"], batch["completed"]) == (
        "merged",
        "completed",
        12,
    )
