"""The command line for unattended use: one-line errors, exit codes, JSON errors, help.

In-process through Click's runner where the process is not the point; real files, real
ports and the built-in simulator on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import Result
from conftest import cli, write_csv

from pipeline.errors import EXIT_CODES
from pipeline.simulator import SimulatorThread

README = Path(__file__).resolve().parents[1] / "README.md"


def run_args(sim: SimulatorThread, source: Path, output: Path, *extra: Any) -> list[Any]:
    return ["run", source, "-o", output, "--base-url", sim.base_url, "--no-progress", *extra]


def assert_one_line_error(result: Result, *pieces: str) -> None:
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- 14.7: one-line errors instead of tracebacks ------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_an_unwritable_output_directory_is_one_line_exit_2(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = cli(
            *run_args(simulator, write_csv(tmp_path / "in.csv", ["a"]), locked / "o.parquet")
        )
    finally:
        locked.chmod(stat.S_IRWXU)
    assert result.exit_code == 2
    assert_one_line_error(result, str(locked), "Permission denied")
    assert simulator.simulator.requests == []


def test_an_output_path_under_a_file_is_one_line_exit_2(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    # a file where the output directory should be: the same OSError path as a read-only dir,
    # and it also fails for root (the test above is skipped under root)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    result = cli(*run_args(simulator, write_csv(tmp_path / "in.csv", ["a"]), blocker / "o.parquet"))
    assert result.exit_code == 2
    assert_one_line_error(result, "cannot write", "-o")
    assert simulator.simulator.requests == []


def test_report_html_into_a_missing_directory_is_one_line(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    output = tmp_path / "o.parquet"
    assert cli(*run_args(simulator, write_csv(tmp_path / "in.csv", ["a"]), output)).exit_code == 0
    result = cli("report", output, "--html", tmp_path / "missing" / "r.html")
    assert result.exit_code == 2
    assert_one_line_error(result, "--html", "missing")


def test_demo_on_a_busy_port_is_one_line(busy_port: int, tmp_path: Path) -> None:
    result = cli("demo", "-o", tmp_path / "d.parquet", "--port", busy_port)
    assert result.exit_code == 2
    assert_one_line_error(result, f"port {busy_port}", "--port")


def test_simulate_on_a_busy_port_is_one_line(busy_port: int) -> None:
    result = cli("simulate", "--port", busy_port)
    assert result.exit_code == 2
    assert_one_line_error(result, f"port {busy_port}", "already in use")


def test_simulate_refuses_a_negative_latency() -> None:
    result = cli("simulate", "--latency-ms", "-5", "--port", 0)
    assert result.exit_code == 2
    assert_one_line_error(result, "--latency-ms -5")


# -- 14.9: distinct exit codes, documented once, named in the summary JSON ----------------


def test_the_readme_exit_code_table_is_the_code_table() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    documented = {int(row.split("|")[1]): row.split("|")[2].strip() for row in rows[1:]}
    assert set(documented) == set(EXIT_CODES)
    for code, (reason, _) in EXIT_CODES.items():
        assert f"`{reason}`" in documented[code], (code, documented[code])


def test_max_runtime_and_a_bad_key_have_different_codes_and_reasons(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=300, require_api_key="sk-right")
    source = write_csv(tmp_path / "in.csv", [f"q{i}" for i in range(40)])
    deadline_json, denied_json = tmp_path / "deadline.json", tmp_path / "denied.json"
    os.environ["BPP_CLI_TEST_KEY"] = "sk-right"
    try:
        deadline = cli(
            *run_args(sim, source, tmp_path / "a.parquet", "--concurrency", 2),
            *("--api-key-env", "BPP_CLI_TEST_KEY", "--max-runtime", "1s"),
            *("--summary-json", deadline_json),
        )
        os.environ["BPP_CLI_TEST_KEY"] = "sk-wrong"
        denied = cli(
            *run_args(sim, source, tmp_path / "b.parquet"),
            *("--api-key-env", "BPP_CLI_TEST_KEY", "--summary-json", denied_json),
        )
    finally:
        del os.environ["BPP_CLI_TEST_KEY"]
    assert deadline.exit_code == 5, deadline.output
    assert denied.exit_code == 3, denied.output
    assert json.loads(deadline_json.read_text())["exit_reason"] == "interrupted"
    assert json.loads(denied_json.read_text())["exit_reason"] == "fatal"
    # the reason is printed when the run stops and in the summary; the last line says
    # what to do next instead of repeating it a third time
    assert denied.stderr.count("AuthenticationError") <= 2, denied.stderr


def test_a_broken_config_and_a_usage_error_write_the_reason_to_summary_json(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("concurency = 4\n")
    summary = tmp_path / "s.json"
    result = cli(
        "run", write_csv(tmp_path / "in.csv", ["a"]), "-o", tmp_path / "o.parquet",
        "--config", bad, "--summary-json", summary,
    )  # fmt: skip
    assert result.exit_code == 2
    written = json.loads(summary.read_text())
    assert (written["exit_code"], written["exit_reason"]) == (2, "usage")
    assert "concurrency" in written["error"]


# -- 14.10: JSON errors, progress events, timestamps ---------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ("--concurrency", "0"),
        ("--max-runtime", "5x"),
        ("--concurrency", "many"),  # a Click type error, before our code runs
        ("--no-such-option",),
    ],
)
def test_usage_errors_are_json_under_log_format_json(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    source = write_csv(tmp_path / "in.csv", ["a"])
    result = cli("run", source, "-o", tmp_path / "o.parquet", "--log-format", "json", *extra)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    event = json.loads(lines[0])
    assert (event["event"], event["exit_code"], event["exit_reason"]) == ("error", 2, "usage")
    assert event["message"]


def test_json_progress_events_carry_total_pending_eta_and_cost(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    sim = make_simulator(latency_ms=50)
    source = write_csv(tmp_path / "in.csv", [f"q{i}" for i in range(30)])
    result = cli(
        *run_args(sim, source, tmp_path / "o.parquet", "--concurrency", 2),
        *("--log-format", "json", "--log-interval", "0.1"),
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stderr.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, result.stderr
    first = progress[0]
    assert first["total"] == 30 and first["todo"] == 30
    assert first["pending"] == 30 - first["done"]
    assert first["eta_s"] is None or first["eta_s"] >= 0
    assert first["cost_usd"] is not None and first["cost_usd"] >= 0


def test_text_log_lines_off_a_terminal_start_with_a_timestamp(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    result = cli(
        *run_args(simulator, write_csv(tmp_path / "in.csv", ["a"]), tmp_path / "o.parquet")
    )
    assert result.exit_code == 0
    start = next(line for line in result.stderr.splitlines() if "to send" in line)
    stamp = start.split(" ", 1)[0]
    assert len(stamp) >= 19 and stamp[4] == "-" and stamp[10] == "T", start


# -- 14.11: models, max-tokens, unknown cost -----------------------------------------------


def test_model_with_commas_is_several_models(simulator: SimulatorThread, tmp_path: Path) -> None:
    output = tmp_path / "o.parquet"
    result = cli(
        *run_args(simulator, write_csv(tmp_path / "in.csv", ["a", "b"]), output),
        *("--model", "gpt-4o-mini,gpt-4.1-mini"),
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(output)
    assert sorted(set(frame["model"])) == ["gpt-4.1-mini", "gpt-4o-mini"]
    assert len(frame) == 4


@pytest.mark.parametrize("model", ["", " ", "a,,b"])
def test_an_empty_model_name_is_refused(tmp_path: Path, model: str) -> None:
    result = cli(
        "run", write_csv(tmp_path / "in.csv", ["a"]), "-o", tmp_path / "o.parquet", "--model", model
    )
    assert result.exit_code == 2
    assert_one_line_error(result, "--model", "cannot be empty")


def test_an_absurd_max_tokens_is_refused_before_any_request(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    result = cli(
        *run_args(simulator, write_csv(tmp_path / "in.csv", ["a"]), tmp_path / "o.parquet"),
        *("--max-tokens", "2000000000", "--max-cost", "5"),
    )
    assert result.exit_code == 2
    assert_one_line_error(result, "--max-tokens", "1,000,000")
    assert simulator.simulator.requests == []


def test_a_budget_stop_prints_its_reason_at_most_twice(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    result = cli(
        *run_args(simulator, write_csv(tmp_path / "in.csv", ["a"]), tmp_path / "o.parquet"),
        *("--max-tokens", "900000", "--max-cost", "0.01"),
    )
    assert result.exit_code == 4, result.output
    # once when the run stops, once in the summary (not a third time in the final line)
    assert result.stderr.count("budget reached") == 2, result.stderr
    # and why a budget stops before anything was spent: what the next request reserves
    assert "reserves up to $" in result.stderr and "900,0" in result.stderr, result.stderr


def test_an_unpriced_model_reads_unknown_never_zero(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    output, summary = tmp_path / "o.parquet", tmp_path / "s.json"
    result = cli(
        *run_args(simulator, write_csv(tmp_path / "in.csv", ["a", "b"]), output),
        *("--model", "my-local-model", "--summary-json", summary),
    )
    assert result.exit_code == 0, result.output
    assert "cost unknown" in result.stderr and "$0.000000" not in result.stderr
    written = json.loads(summary.read_text())
    assert written["cost_usd"] is None and written["unpriced_results"] == 2
    status = cli("status", output, "--json")
    info = json.loads(status.stdout)
    assert info["cost_usd"] is None and info["unpriced_models"] == ["my-local-model"]
    assert "cost unknown" in cli("status", output).stdout


# -- 14.12: output format, delimiters, empty input ------------------------------------------


@pytest.mark.parametrize("name", ["out.csv", "out.jsonl", "out"])
def test_a_non_parquet_output_name_is_refused_with_a_hint(tmp_path: Path, name: str) -> None:
    result = cli("run", write_csv(tmp_path / "in.csv", ["a"]), "-o", tmp_path / name)
    assert result.exit_code == 2
    assert_one_line_error(result, "Parquet", ".parquet")
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize(
    ("separator", "hint"), [(";", "--delimiter ';'"), ("\t", "--delimiter tab")]
)
def test_a_semicolon_or_tab_csv_gets_a_hint_and_delimiter_reads_it(
    simulator: SimulatorThread, tmp_path: Path, separator: str, hint: str
) -> None:
    source = tmp_path / "in.csv"
    source.write_text(f"id{separator}review\n1{separator}great\n2{separator}bad\n")
    output = tmp_path / "o.parquet"
    refused = cli(*run_args(simulator, source, output, "--template", "{review}"))
    assert refused.exit_code == 2
    assert_one_line_error(refused, "{review}", hint)
    given = "tab" if separator == "\t" else separator
    result = cli(
        *run_args(simulator, source, output, "--template", "{review}", "--delimiter", given)
    )
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(output)["review"].tolist() == ["great", "bad"]


def test_input_format_tsv_reads_a_tab_separated_file(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("id\tprompt\n1\thello, world\n")
    output = tmp_path / "o.parquet"
    result = cli(*run_args(simulator, source, output, "--input-format", "tsv"))
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(output)["prompt"].tolist() == ["hello, world"]


def test_a_header_only_csv_says_0_rows(simulator: SimulatorThread, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,prompt\n")
    result = cli(*run_args(simulator, source, tmp_path / "o.parquet"))
    assert result.exit_code == 0, result.output
    assert "has 0 rows (a header only?): nothing to send" in result.stderr


# -- 14.13: estimate refuses what only a run uses --------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ("--restart",),
        ("--summary-json", "s.json"),
        ("--grace", "5"),
        ("--max-runtime", "1m"),
        ("--log-format", "json"),
        ("--quiet",),
        ("--no-progress",),
        ("--retry-failed",),
    ],
)
def test_estimate_refuses_run_only_options(tmp_path: Path, extra: tuple[str, ...]) -> None:
    source = write_csv(tmp_path / "in.csv", ["a"])
    for command in (
        ["estimate", source],
        ["run", source, "-o", tmp_path / "o.parquet", "--dry-run"],
    ):
        result = cli(*command, *extra)
        assert result.exit_code == 2, result.output
        assert extra[0] in result.stderr and "pipeline run" in result.stderr
        assert not (tmp_path / "s.json").exists()


def test_estimate_note_names_the_option_that_refines_it(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", ["a", "b"])
    plain = cli("estimate", source, "--json")
    assert "--typical-completion" in plain.stdout
    refined = json.loads(cli("estimate", source, "--json", "--typical-completion", "7").stdout)
    assert refined["completion_tokens"]["typical_per_request"] == 7


# -- 14.14: help ------------------------------------------------------------------------------


def test_run_help_groups_the_options_and_describes_each() -> None:
    text = cli("run", "--help").stdout
    for section in ("Input and output:", "Prompt:", "Endpoint and request:", "Cost and budget:"):
        assert section in text
    # every option has a description: no option line without text after it
    for option in ("--temperature", "--max-tokens", "--top-p", "--seed"):
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.split(None, 2)) == 3, line
    assert "error or invalid" in " ".join(text.split())  # what --retry-failed resends
    assert "Other options" not in text


def test_help_defaults_are_read_from_the_run_config_fields() -> None:
    import dataclasses

    from pipeline.cli_options import default_of
    from pipeline.config import RunConfig

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert default_of("concurrency") == f"[default: {defaults['concurrency']}]"
    assert default_of("timeout") == f"[default: {int(defaults['timeout'])}]"
    assert default_of("dedup") == "[default: on]"
    assert default_of("model") == f"[default: {defaults['model']}]"
