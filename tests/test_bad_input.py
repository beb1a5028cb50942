"""Bad input is refused before anything is sent, and the user is told what to fix.

For every kind of bad input the run must: exit with code 2, print one clear message on
stderr that names the file and the column or row at fault and how to fix it, send no
request, and leave OUTPUT alone (an existing OUTPUT keeps its bytes and mtime; no OUTPUT,
checkpoint or other file appears). The API key must never appear in anything we write.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import env_without_keys, run_cli

from pipeline.simulator import SimulatorThread

OLD_MTIME_NS = 1_600_000_000_000_000_000  # 2020-09-13: "an old file" that must keep its mtime
JUNK_OUTPUT = b"a results file from somewhere else; keep me\n"


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and directory under ``directory``: (size, mtime_ns, sha256)."""
    state: dict[str, tuple[int, int, str]] = {}
    for path in sorted(directory.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


def write_old_output(path: Path) -> None:
    path.write_bytes(JUNK_OUTPUT)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


def big_csv_with_bad_row(rows: int, bad_at: int, bad: str) -> bytes:
    """A CSV of ``rows`` data rows (> 1 MB) whose data row ``bad_at`` (1-based) is ``bad``."""
    lines = ["id,prompt"] + [
        f"{i},please summarise review number {i:07d} for me" for i in range(rows)
    ]
    lines[bad_at] = bad
    return ("\n".join(lines) + "\n").encode()


@dataclass
class BadInput:
    """A bad input: the files to create, the arguments after ``run``, and what stderr names."""

    files: dict[str, bytes]
    args: list[str]
    mentions: list[str]  # plain text that must appear in the message
    matches: list[str] = field(default_factory=list)  # regexes that must match the message


CSV = b"id,text\n1,great product\n2,broke after a week\n"

BAD_INPUTS = [
    pytest.param(
        BadInput(
            {"in.csv": CSV}, ["in.csv", "--prompt-column", "body"], ["in.csv", "body", "text"]
        ),
        id="prompt-column-missing-names-it-and-lists-the-columns",
    ),
    pytest.param(
        BadInput({"in.csv": CSV}, ["in.csv"], ["in.csv", "prompt", "--prompt-column", "text"]),
        id="default-prompt-column-missing",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV},
            ["in.csv", "--prompt-column", "text", "--id-column", "uid"],
            ["in.csv", "uid", "text"],
        ),
        id="id-column-missing",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV},
            ["in.csv", "--template", "Classify: {txt} (id {id})"],
            ["in.csv", "{txt}", "text"],
        ),
        id="unknown-template-placeholder-names-it-and-lists-the-columns",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV}, ["in.csv", "--template", "Classify: {text"], ["--template", "{{"]
        ),
        id="unmatched-open-brace-in-template",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV}, ["in.csv", "--template", "Classify: text}"], ["--template", "}}"]
        ),
        id="unmatched-close-brace-in-template",
    ),
    pytest.param(
        BadInput({"in.csv": b""}, ["in.csv"], ["in.csv", "empty"]),
        id="empty-csv-file",
    ),
    pytest.param(
        BadInput({"in.jsonl": b""}, ["in.jsonl"], ["in.jsonl", "empty"]),
        id="empty-jsonl-file",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"id,prompt\n1,hello\n2,hi\n3,too,many,fields\n4,bye\n"},
            ["in.csv"],
            ["in.csv"],
            # data row 3 is line 4 of the file; either way of counting names it
            matches=[r"(?i)\b(line|row)\s*#?\s*[34]\b"],
        ),
        id="csv-row-with-too-many-fields-names-the-row",
    ),
    pytest.param(
        BadInput(
            {"in.csv": big_csv_with_bad_row(30_000, 25_000, "x,too,many")},
            ["in.csv"],
            ["in.csv"],
            matches=[r"(?i)\b(line|row)\s*#?\s*2500[01]\b"],
        ),
        id="csv-row-with-too-many-fields-past-the-first-megabyte",
    ),
    pytest.param(
        BadInput(
            {"in.csv": "id,prompt\n1,hello\n2,caf\xe9 au lait\n".encode("latin-1")},
            ["in.csv"],
            ["in.csv", "line 3", "UTF-8"],
        ),
        id="non-utf8-bytes-in-csv-names-the-line",
    ),
    pytest.param(
        BadInput(
            {"in.jsonl": b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n{"prompt": "d"}\n'},
            ["in.jsonl"],
            ["in.jsonl", "line 3"],
        ),
        id="malformed-jsonl-line-names-the-line-number",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV, "cfg.toml": b'model = "gpt-4o"\ntemperature = = 0.2\n'},
            ["in.csv", "--prompt-column", "text", "--config", "cfg.toml"],
            ["cfg.toml", "line 2"],
        ),
        id="bad-toml-names-the-file-and-line",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV, "cfg.toml": b'prompt_column = "text"\ntemprature = 0.2\n'},
            ["in.csv", "--config", "cfg.toml"],
            ["cfg.toml", "temprature"],
        ),
        id="unknown-config-key-is-named",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV},
            ["in.csv", "--prompt-column", "text", "--temperature", "5"],
            ["--temperature", "2"],
        ),
        id="temperature-out-of-range",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV},
            ["in.csv", "--prompt-column", "text", "--template", "Classify: {text}"],
            ["--prompt-column", "--template"],
        ),
        id="two-prompt-sources-prompt-column-and-template",
    ),
    pytest.param(
        BadInput(
            {"in.csv": CSV},
            ["in.csv", "--template", "Classify: {text}", "--messages-column", "text"],
            ["--template", "--messages-column"],
        ),
        id="two-prompt-sources-template-and-messages-column",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"id,prompt\na1,x\nb2,y\na1,z\nc3,w\nb2,v\n"},
            ["in.csv", "--id-column", "id"],
            ["in.csv", "id", "a1", "b2"],
        ),
        id="duplicate-ids-are-named",
    ),
    pytest.param(
        BadInput({"in.txt": b"prompt\nhello\n"}, ["in.txt"], ["in.txt", "--input-format"]),
        id="unknown-extension-suggests-input-format",
    ),
    pytest.param(
        BadInput(
            {
                "in.csv": b'id,prompt\n1,short\n2,"never closed\n'
                + b"".join(b"%d,row %d\n" % (i, i) for i in range(3, 60_000))
            },
            ["in.csv"],
            ["in.csv", "line 3: a quoted cell never closes"],
        ),
        id="csv-quote-that-never-closes-is-not-read-as-one-long-cell",
    ),
    pytest.param(
        BadInput(
            {
                "in.csv": b"id,prompt\n"
                + b"".join(b"%d,row %d\n" % (i, i) for i in range(5))
                + b'5,"oops\n'
                + b"".join(b"%d,row %d\n" % (i, i) for i in range(6, 1000))
            },
            ["in.csv"],
            ["in.csv", "line 7: a quoted cell never closes", '5,"oops'],
        ),
        id="csv-quote-that-never-closes-in-a-small-file",
    ),
    pytest.param(
        BadInput({"in.csv": b"prompt,status\nhi,new\n"}, ["in.csv"], ["in.csv", "'status'"]),
        id="input-column-that-is-a-result-column",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"prompt,label\nhi,pos\n"},
            ["in.csv", "--labels", "pos,neg"],
            ["in.csv", "'label'", "--labels"],
        ),
        id="input-column-label-with-labels",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"prompt,score\nhi,1\n"},
            ["in.csv", "--score", "exact", "--expected-column", "prompt"],
            ["in.csv", "'score'", "--score"],
        ),
        id="input-column-score-with-score",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"prompt,model\nhi,mine\n"},
            ["in.csv", "--model", "m1", "--model", "m2"],
            ["in.csv", "'model'", "--model"],
        ),
        id="input-column-model-with-several-models",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"prompt,m1__completion\nhi,x\n"},
            ["in.csv", "--model", "m1", "--model", "m2", "--wide"],
            ["in.csv", "'m1__completion'", "--wide"],
        ),
        id="input-column-that-wide-adds",
    ),
    pytest.param(
        BadInput(
            {"in.csv": b"prompt,sample\nhi,1\n"},
            ["in.csv", "--n", "2", "--samples", "long"],
            ["in.csv", "'sample'", "--samples list"],
        ),
        id="input-column-sample-with-long-samples",
    ),
    pytest.param(
        BadInput(
            {
                "in.csv": b"prompt,topic\nhi,x\n",
                "s.json": b'{"type": "object", "properties": {"topic": {"type": "string"}}}',
            },
            ["in.csv", "--json-schema", "s.json"],
            ["s.json", "'topic'", "--schema-prefix"],
        ),
        id="schema-property-named-like-an-input-column",
    ),
    pytest.param(
        BadInput(
            {
                "in.csv": b"prompt\nhi\n",
                "s.json": b'{"type": "object", "properties": {"status": {"type": "string"}}}',
            },
            ["in.csv", "--json-schema", "s.json"],
            ["s.json", "'status'", "--schema-prefix"],
        ),
        id="schema-property-named-like-a-result-column",
    ),
    pytest.param(
        BadInput(
            {
                "in.csv": b"prompt\nhi\n",
                "s.json": b'{"type": "object", "properties": {"status": {"type": "string"}}}',
            },
            ["in.csv", "--json-schema", "s.json", "--model", "m1", "--model", "m2", "--wide"],
            ["s.json", "'m1__status'", "--schema-prefix"],
        ),
        id="schema-property-named-like-a-result-column-in-the-wide-layout",
    ),
]


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_exits_2_with_a_clear_message_sends_nothing_and_keeps_the_old_output(
    bad: BadInput, simulator: SimulatorThread, tmp_path: Path
) -> None:
    for name, content in bad.files.items():
        (tmp_path / name).write_bytes(content)
    # An OUTPUT that --overwrite would let a good run replace: a bad run must not touch it.
    write_old_output(tmp_path / "out.parquet")
    before = snapshot(tmp_path)

    result = run_cli(
        tmp_path, *bad.args, "-o", "out.parquet", "--overwrite", "--base-url", simulator.base_url
    )

    assert result.returncode == 2, result.stderr
    message = result.stderr
    assert "Traceback" not in message
    for text in bad.mentions:
        assert text in message, f"the message should mention {text!r}: {message}"
    for pattern in bad.matches:
        assert re.search(pattern, message), f"the message should match {pattern!r}: {message}"
    assert simulator.simulator.requests == []
    assert (tmp_path / "out.parquet").read_bytes() == JUNK_OUTPUT
    assert (tmp_path / "out.parquet").stat().st_mtime_ns == OLD_MTIME_NS
    assert not (tmp_path / "out.parquet.checkpoint").exists(), "left a checkpoint behind"
    assert snapshot(tmp_path) == before, "a refused run must leave the directory as it was"


NO_OUTPUT_CASES = {
    "missing-column": (CSV, ["--prompt-column", "body"]),
    "duplicate-ids": (b"id,prompt\na1,x\na1,y\n", ["--id-column", "id"]),
}


@pytest.mark.parametrize("case", list(NO_OUTPUT_CASES))
def test_bad_input_creates_no_output_and_no_checkpoint(
    case: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    content, args = NO_OUTPUT_CASES[case]
    (tmp_path / "in.csv").write_bytes(content)
    before = snapshot(tmp_path)

    result = run_cli(
        tmp_path, "in.csv", *args, "-o", "out.parquet", "--base-url", simulator.base_url
    )

    assert result.returncode == 2, result.stderr
    assert simulator.simulator.requests == []
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.checkpoint").exists(), "left a checkpoint behind"
    assert snapshot(tmp_path) == before, "nothing may be created by a refused run"


# -- OUTPUT that pipeline did not write ----------------------------------------------------


def test_existing_output_not_written_by_pipeline_is_refused_and_kept(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")
    write_old_output(tmp_path / "out.parquet")
    before = snapshot(tmp_path)

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 2
    assert "out.parquet" in result.stderr
    assert "--overwrite" in result.stderr
    assert simulator.simulator.requests == []
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_an_output_not_written_by_pipeline(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\nworld\n", encoding="utf-8")
    write_old_output(tmp_path / "out.parquet")

    result = run_cli(
        tmp_path, "in.csv", "-o", "out.parquet", "--overwrite", "--base-url", simulator.base_url
    )

    assert result.returncode == 0, result.stderr
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["prompt"].tolist() == ["hello", "world"]
    assert output["status"].tolist() == ["ok", "ok"]


# -- API keys ------------------------------------------------------------------------------


def test_remote_base_url_without_api_key_fails_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")
    before = snapshot(tmp_path)

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--base-url",
        "https://api.example.invalid/v1",
        "--max-retries",
        "0",
        "--timeout",
        "2",
        env=env_without_keys(),
    )

    assert result.returncode == 2, result.stderr
    assert "AIMLAPI_API_KEY" in result.stderr
    assert "OPENAI_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def all_text_written(result: subprocess.CompletedProcess[str], directory: Path) -> bytes:
    """stdout, stderr and every file under ``directory``, as one blob to search."""
    blobs = [result.stdout.encode(), result.stderr.encode()]
    blobs += [p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()]
    return b"\n".join(blobs)


def parquet_as_text(directory: Path) -> str:
    """The decoded content of every Parquet file (OUTPUT and checkpoint parts are compressed)."""
    return "\n".join(pd.read_parquet(p).to_csv() for p in sorted(directory.rglob("*.parquet")))


def test_api_key_never_appears_in_any_output(
    make_simulator: Callable[..., SimulatorThread], tmp_path: Path
) -> None:
    secret = "sk-test-9f8e7d6c5b4a39281706"
    sim = make_simulator(require_api_key=secret)
    (tmp_path / "in.csv").write_text(
        "prompt\nhello\nbad row [[sim:status=400]]\n\n", encoding="utf-8"
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--base-url",
        sim.base_url,
        "--log-format",
        "json",
        "--summary-json",
        "summary.json",
        env=env_without_keys(AIMLAPI_API_KEY=secret),
    )

    assert result.returncode == 1, result.stderr  # the 400 row failed; the others did not
    assert sim.simulator.requests[0].headers["authorization"] == f"Bearer {secret}"
    assert secret.encode() not in all_text_written(result, tmp_path)
    assert secret not in parquet_as_text(tmp_path)
