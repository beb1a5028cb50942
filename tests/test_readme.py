"""The README's quick start and Python example are real: they run as written."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline.simulator import SimulatorThread

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_quick_start_gives_exactly_two_commands_and_ci_runs_the_second() -> None:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", section, re.S)
    assert commands == [
        "python3 -m pip install -e . && python3 -m pipeline demo",
        "python3 -m pip install -e '.[test]' && python3 -m pytest",
    ]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_demo_runs_the_sample_through_the_simulator_and_resumes(tmp_path: Path) -> None:
    config = (ROOT / "configs" / "demo.toml").read_text()
    port = _free_port()
    config = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", config)
    (tmp_path / "demo.toml").write_text(config)
    out = tmp_path / "demo.parquet"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "demo",
        "--output",
        str(out),
        "--config",
        str(tmp_path / "demo.toml"),
    ]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "rows: 200 total" in first.stderr and str(out) in first.stdout
    frame = pd.read_parquet(out)
    assert len(frame) == 200 and set(frame["status"]) == {"ok", "skipped"}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 sent" in again.stderr


def test_the_python_api_example_runs_as_written(simulator: SimulatorThread, tmp_path: Path):
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000/v1", simulator.base_url)
    source = source.replace('"labels.parquet"', repr(str(tmp_path / "labels.parquet")))
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert isinstance(out, pd.DataFrame)
    assert out["status"].tolist() == ["ok", "ok"]
    assert len(simulator.simulator.requests) == 2
