"""A normal (non-editable) install works: what the tool reads at run time ships inside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import PACKAGE_DATA
from pipeline.pricing import DEFAULT_PRICES_PATH

ROOT = Path(__file__).resolve().parents[1]

# package copy -> the user-facing example at the top of the repository
SHIPPED = {
    "demo.toml": ROOT / "configs" / "demo.toml",
    "prices.toml": ROOT / "configs" / "prices.toml",
    "sample.csv": ROOT / "data" / "sample.csv",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_packaged_files_equal_the_examples_in_the_repository(name: str) -> None:
    assert (PACKAGE_DATA / name).read_bytes() == SHIPPED[name].read_bytes(), (
        f"pipeline/data/{name} and {SHIPPED[name].relative_to(ROOT)} differ: edit both"
    )


def test_the_price_table_is_read_from_inside_the_package() -> None:
    assert DEFAULT_PRICES_PATH.is_relative_to(Path(__file__).resolve().parents[1] / "pipeline")


@pytest.mark.slow
def test_a_wheel_installed_outside_the_tree_runs_demo_and_estimate(tmp_path: Path) -> None:
    """Build a wheel, install it (no deps: the venv sees this interpreter's packages) into a
    fresh venv, and run the console script from a directory that has no configs/ or data/."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    if build.returncode != 0 and "setuptools" in build.stderr:
        pytest.skip(f"cannot build a wheel here (no build backend): {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=60
    )
    python, script = venv / "bin" / "python", venv / "bin" / "pipeline"
    (wheel,) = wheels.glob("*.whl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --force-reinstall: an editable install of the same version outside the venv would
    # otherwise count as "already satisfied"
    install = ["install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    subprocess.run(
        [str(python), "-m", "pip", *install],
        env=env,
        check=True,
        timeout=60,
    )
    where = subprocess.run(
        [str(python), "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(venv)), "the installed copy, not this tree, is tested"

    demo = subprocess.run(
        [str(script), "demo", "-o", "out/demo.parquet", "--port", "0"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert demo.returncode == 0, demo.stderr
    assert (elsewhere / "out" / "demo.parquet").is_file()

    (elsewhere / "in.csv").write_text("prompt\nhello\nhow are you?\n")
    estimate = subprocess.run(
        [str(script), "estimate", "in.csv", "--max-tokens", "10"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert estimate.returncode == 0, estimate.stderr
    assert "priced as gpt-3.5-turbo" in estimate.stdout
    assert "No default price table" not in estimate.stdout + estimate.stderr
