"""The Ray engine (``--engine ray``, ``pipeline.ray.complete``) on a real local Ray instance.

One instance is started for the module (loopback only, no dashboard) and the jobs run
against the simulator over real HTTP: OUTPUT equals a local run's, the key's limit holds for
the whole job, an actor killed with ``ray.kill`` costs only its rows in flight, a driver
killed with SIGKILL loses nothing recorded, and no Ray process listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import env_without_keys, run_pipeline

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'batch-prompt-pipeline[ray]'"
)

import pipeline  # noqa: E402
from pipeline.merging import merge_output  # noqa: E402
from pipeline.ray import complete, connect  # noqa: E402
from pipeline.ray.driver import ACTOR_PREFIX, ShardActor  # noqa: E402
from pipeline.simulator import SimulatorThread  # noqa: E402

# Ray Data warns of its own deprecated settings as it starts; not ours to fix
# one worker runs them all, on one Ray instance (two instances on two cores starve each other)
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.xdist_group("ray"),
]

MakeSimulator = Callable[..., SimulatorThread]
ANSWER = "Simulated answer to: "


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """A local Ray instance for the module (as ``--engine ray`` starts one), 2 CPUs or more."""
    started = connect(num_cpus=max(2, os.cpu_count() or 1))
    yield
    if started:
        ray.shutdown()


def prompts_of(count: int) -> list[str]:
    return [f"row {i}" for i in range(count)]


def run_on_ray(
    sim: SimulatorThread, prompts: list[str], output: Path, **options: Any
) -> pd.DataFrame:
    """``pipeline.run`` of ``prompts`` against ``sim`` on 2 Ray actors, quiet."""
    return pipeline.run(
        pd.DataFrame({"prompt": prompts}),
        output,
        base_url=sim.base_url,
        engine="ray",
        ray_actors=2,
        progress=False,
        quiet=True,
        **options,
    )


def received(sim: SimulatorThread) -> Counter[str]:
    """How many requests the simulator received per prompt (refused ones included)."""
    return Counter(r.body["messages"][-1]["content"] for r in sim.simulator.requests if r.body)


def assert_complete(frame: pd.DataFrame, prompts: list[str]) -> None:
    assert frame["prompt"].tolist() == prompts
    assert frame["status"].tolist() == ["ok"] * len(prompts)
    assert frame["completion"].tolist() == [ANSWER + p for p in prompts]


def test_a_ray_run_writes_the_output_of_a_local_run(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(record=True)
    prompts = [*prompts_of(120), "row 7"]  # a repeated prompt is sent once (--dedup)
    data = pd.DataFrame({"prompt": prompts, "n": range(len(prompts))})
    options = dict(base_url=sim.base_url, progress=False, quiet=True)
    on_ray = pipeline.run(
        data, tmp_path / "ray.parquet", engine="ray", ray_actors=2, **{**options, "quiet": False}
    )
    # every prompt sent once by the engine, over 2 actors. (The simulator may see a few
    # twice: the HTTP client writes a request again on a fresh connection when the kept-alive
    # one closes before any byte of the answer; seen here now and then, under load.)
    assert set(received(sim)) == set(prompts) and on_ray.attrs["summary"]["sent"] == 120
    local = pipeline.run(data, tmp_path / "local.parquet", **options)
    per_request = ["latency_ms", "response_id"]  # the server's id, the time it took
    shown = pd.read_parquet(tmp_path / "ray.parquet").drop(columns=per_request)
    expected = pd.read_parquet(tmp_path / "local.parquet").drop(columns=per_request)
    pd.testing.assert_frame_equal(shown, expected)
    assert on_ray.attrs["summary"]["ok"] == 121
    assert local["status"].eq("ok").all()
    # rerun: everything is there, nothing is sent
    again = pipeline.run(data, tmp_path / "ray.parquet", engine="ray", ray_actors=3, **options)
    assert again.attrs["summary"]["sent"] == 0


def test_rpm_holds_for_the_whole_job_across_actors(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    # the server refuses beyond 20 requests/s; --rpm 1170 is 19.5/s for the key, all actors
    sim = make_simulator(rps_limit=20, rps_burst=5, latency_ms=5, record=True)
    prompts = prompts_of(160)
    frame = run_on_ray(sim, prompts, tmp_path / "out.parquet", rpm=1170, concurrency=16)
    assert_complete(frame, prompts)
    assert sim.simulator.stats["429"] == 0
    times = sorted(r.time for r in sim.simulator.requests)
    rate = (len(times) - 1) / (times[-1] - times[0])
    # one bucket for the job: the actors together at --rpm, the last one alone too
    assert rate >= 0.95 * 20, f"{rate:.1f} requests/s against a limit of 20/s"


def test_a_limit_the_server_announces_in_headers_holds_for_the_whole_job(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    # no --rpm: the server's x-ratelimit-* headers say 20/s (a bucket of 10: jitter on a
    # loaded machine); each actor's mirror of it alone took the whole rate (with a bucket
    # of 5: 39/s together, 272 429s of 565, 7 rows lost)
    sim = make_simulator(
        rps_limit=20, rps_burst=10, latency_ms=5, rate_limit_headers=True, record=True
    )
    prompts = prompts_of(160)
    frame = run_on_ray(sim, prompts, tmp_path / "out.parquet", concurrency=16)
    assert_complete(frame, prompts)
    requests = sim.simulator.requests
    # the actors' first round trips (before any header was read) and jitter at the limit
    assert sim.simulator.stats["429"] <= 0.1 * len(requests)
    times = sorted(r.time for r in requests)
    # never much faster than the server allows (20/s and its bucket of 10)
    assert len(times) - 1 <= 1.1 * (20 * (times[-1] - times[0]) + 10)


def test_an_actor_killed_mid_run_costs_only_its_rows_in_flight(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=40, record=True)
    prompts = prompts_of(300)
    killed: list[str] = []

    def kill_one_actor() -> None:
        while len(sim.simulator.requests) < 60:
            time.sleep(0.01)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        name = sorted(n for n in names if n.startswith(ACTOR_PREFIX))[0]
        ray.kill(ray.get_actor(name))
        killed.append(name)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    frame = run_on_ray(sim, prompts, tmp_path / "out.parquet", concurrency=8, checkpoint_rows=5)
    killer.join()
    assert killed
    assert_complete(frame, prompts)
    sent = received(sim)
    assert set(sent) == set(prompts)
    again = [p for p, n in sent.items() if n > 1]
    # sent twice: at most what the dead actor had in flight (8) or had not yet recorded (a
    # part of 5 being written, and up to 5 more answers waiting for the next one)
    assert len(again) <= 8 + 2 * 5, again


def test_a_row_that_exhausts_its_retries_is_an_error_row_not_an_abort(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    prompts = [*prompts_of(20), "row bad [[sim:status=500]]"]
    frame = run_on_ray(
        simulator, prompts, tmp_path / "out.parquet", max_retries=1, max_retry_wait=0.05
    )
    assert frame["status"].tolist() == ["ok"] * 20 + ["error"]
    assert frame.attrs["summary"]["exit_code"] == 1  # some rows failed; the job ran to its end


def test_a_killed_driver_loses_nothing_recorded_and_the_same_command_resumes(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=100, record=True)
    # 160 requests/s: ~7.5 s, killed after 150 (1 s of sending). Ray ends the actors of a
    # dead driver only after a while: with 500 rows, a loaded CI machine once let them
    # finish every row first (nothing left to resume)
    prompts = prompts_of(1200)
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    command = [sys.executable, "-m", "pipeline", "run", "in.csv", "-o", "out.parquet"]
    command += ["--base-url", sim.base_url, "--engine", "ray", "--ray-actors", "2"]
    command += ["--concurrency", "8", "--no-progress", "--quiet"]
    driver = subprocess.Popen(command, cwd=tmp_path, env=env_without_keys(), start_new_session=True)
    while len(sim.simulator.requests) < 150 and driver.poll() is None:
        time.sleep(0.01)
    actors = [pid for pid in process_tree(driver.pid) if b"ShardActor" in command_line(pid)]
    assert len(actors) == 2
    driver.send_signal(signal.SIGKILL)  # the driver only: Ray ends its actors
    driver.wait()
    while any(is_running(pid) for pid in actors):
        time.sleep(0.1)
    # what the actors sent just before they died may still be read by the simulator: its
    # count settles first (once it was read after this point and counted as the rerun's)
    before, settled = -1, time.monotonic() + 10
    while before != len(sim.simulator.requests) and time.monotonic() < settled:
        before = len(sim.simulator.requests)
        time.sleep(0.5)
    recorded = merge_output(tmp_path / "out.parquet", destination=tmp_path / "so-far.parquet")
    assert 0 < recorded.pending < len(prompts), "the kill came before or after the run"
    finished = subprocess.run(
        command, cwd=tmp_path, env=env_without_keys(), capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert_complete(pd.read_parquet(tmp_path / "out.parquet"), prompts)
    assert set(received(sim)) == set(prompts)
    # the rerun sent exactly the rows that had no recorded result
    assert len(sim.simulator.requests) - before == recorded.pending


def test_a_wrong_key_stops_every_actor_with_exit_3(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(require_api_key="sk-right", latency_ms=20, record=True)
    pd.DataFrame({"prompt": prompts_of(400)}).to_csv(tmp_path / "in.csv", index=False)
    command = [sys.executable, "-m", "pipeline", "run", "in.csv", "-o", "out.parquet"]
    command += ["--base-url", sim.base_url, "--engine", "ray", "--ray-actors", "2"]
    command += ["--no-progress", "--quiet"]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=env_without_keys(AIMLAPI_API_KEY="sk-wrong"),  # the actors' environment too
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "401" in done.stderr or "key" in done.stderr.lower(), done.stderr
    assert len(sim.simulator.requests) < 400  # stopped, not sent to the end


def test_complete_is_a_lazy_ray_data_transformation(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = make_simulator(record=True)
    prompts = [*prompts_of(50), "row bad [[sim:status=500]]"]
    frame = pd.DataFrame({"prompt": prompts, "n": range(len(prompts))})
    dataset = ray.data.from_pandas([frame.iloc[i : i + 9] for i in range(0, len(frame), 9)])
    completed = complete(
        dataset,
        actors=2,
        batch_size=10,
        base_url=sim.base_url,
        max_retries=0,
    )
    assert not sim.simulator.requests  # lazy: nothing sent before it is consumed
    frame = completed.to_pandas().sort_values("n", ignore_index=True)
    assert frame["prompt"].tolist() == prompts
    assert frame["status"].tolist() == ["ok"] * 50 + ["error"]
    assert frame["completion"].tolist()[:50] == [ANSWER + p for p in prompts[:50]]
    assert received(sim) == Counter(prompts)


def test_complete_holds_rpm_for_the_whole_dataset_across_actors(
    make_simulator: MakeSimulator,
) -> None:
    sim = make_simulator(rps_limit=20, rps_burst=5, latency_ms=5, record=True)
    prompts = prompts_of(120)
    frame = pd.DataFrame({"prompt": prompts, "n": range(len(prompts))})
    dataset = ray.data.from_pandas([frame.iloc[i : i + 20] for i in range(0, len(frame), 20)])
    completed = complete(dataset, actors=2, batch_size=20, base_url=sim.base_url, rpm=1170)
    frame = completed.to_pandas().sort_values("n", ignore_index=True)
    assert frame["status"].tolist() == ["ok"] * len(prompts)
    assert sim.simulator.stats["429"] == 0  # each actor at the whole rpm would draw 429s


def test_the_readme_example_of_complete_runs_as_written(
    simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000/v1", simulator.base_url)
    source = source.replace("print(", "shown = (")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    shown = namespace["shown"]
    assert isinstance(shown, pd.DataFrame) and len(shown) == 200
    # one review of the sample is empty: skipped, as in a local run
    assert shown["status"].value_counts().to_dict() == {"ok": 199, "skipped": 1}


def test_the_local_instance_listens_on_the_loopback_only() -> None:
    actors = [ShardActor.remote() for _ in range(2)]  # type: ignore[attr-defined]
    ray.get([actor.pid.remote() for actor in actors])
    listening = listening_sockets(process_tree(os.getpid()))
    for actor in actors:
        ray.kill(actor)
    assert len(listening) >= 4, listening  # GCS, raylet, the workers: found, not missed
    outside = [(pid, address) for pid, address in listening if not is_loopback(address)]
    assert not outside, f"Ray listens beyond the loopback: {outside}"


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_running(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_tree(root: int) -> set[int]:
    """``root`` and every process it started, and they started (Ray's GCS, raylet, workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {root}
    while True:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        if not more:
            return found
        found |= more


def listening_sockets(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket in LISTEN state that ``pids`` hold."""
    listening: dict[str, str] = {}  # socket inode -> address
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening[fields[9]] = fields[1].split(":")[0]
    found = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, listening[inode]))
    return found


def is_loopback(address: str) -> bool:
    """``/proc/net/tcp*`` addresses (hex, little-endian words): 127.x, ::1, ::ffff:127.x."""
    if len(address) == 8:
        return address.endswith("7F")
    if address == "00000000000000000000000001000000":
        return True
    return address.startswith("0000000000000000FFFF0000") and address.endswith("7F")


def test_engine_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    pd.DataFrame({"prompt": ["a"]}).to_csv(tmp_path / "in.csv", index=False)
    base = ["run", "in.csv", "-o", "out.parquet", "--base-url", "http://127.0.0.1:9/v1"]
    shard = run_pipeline(tmp_path, *base, "--engine", "ray", "--shard", "0/2")
    assert shard.returncode == 2 and "Leave out --shard" in shard.stderr
    restart = run_pipeline(tmp_path, *base, "--engine", "ray", "--restart")
    assert restart.returncode == 2 and "--engine local --restart" in restart.stderr
    address = run_pipeline(tmp_path, *base, "--ray-address", "auto")
    assert address.returncode == 2 and "--engine ray" in address.stderr
    assert not (tmp_path / "out.parquet.checkpoint").exists()
