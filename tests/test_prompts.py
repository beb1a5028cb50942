"""Where each row's prompt comes from, and exactly what is sent for it.

Exactly one prompt source: ``--prompt-column`` (``prompt`` by default), ``--template`` with
``{column}`` placeholders (``{{``/``}}`` are literal braces), or ``--messages-column`` (a
JSON list of {role, content}; in JSONL it may be a real list). ``--system`` is prepended as
a system message. A row whose messages are not a valid list ends as an ``InvalidRow``
error and is never sent; a row with nothing to say is skipped and never sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

import pipeline
from pipeline.simulator import SimulatorThread


def sent_messages(sim: SimulatorThread) -> list[list[dict[str, Any]]]:
    """The ``messages`` of every request received, ordered by their first user message."""
    bodies = [r.body for r in sim.simulator.requests]
    assert all(body is not None for body in bodies)
    messages = [body["messages"] for body in bodies if body is not None]
    return sorted(messages, key=json.dumps)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# -- prompt column -------------------------------------------------------------------------


def test_prompt_column_named_prompt_is_used_when_no_source_is_given(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("text,prompt\nignored,What is 2+2?\n", encoding="utf-8")

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [[user("What is 2+2?")]]


def test_prompt_column_option_sends_that_column_as_the_user_message(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text(
        'prompt,question\nnot this,"Line one\nline two, with a comma"\nnor this,Short\n',
        encoding="utf-8",
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--prompt-column",
        "question",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [
        [user("Line one\nline two, with a comma")],
        [user("Short")],
    ]


# -- template ------------------------------------------------------------------------------


def test_template_fills_each_placeholder_from_the_row(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text(
        "id,product,review\n1,headphones,Great value.\n2,shoes,Fell apart.\n", encoding="utf-8"
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--template",
        "Review of {product} (#{id}): {review} Is this {product} review positive?",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [
        [user("Review of headphones (#1): Great value. Is this headphones review positive?")],
        [user("Review of shoes (#2): Fell apart. Is this shoes review positive?")],
    ]
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert list(output.columns[:3]) == ["id", "product", "review"]


def test_template_double_braces_are_literal_braces(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("label\npositive\n", encoding="utf-8")

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--template",
        'Answer as JSON: {{"label": "{label}"}} and keep {{braces}}',
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [
        [user('Answer as JSON: {"label": "positive"} and keep {braces}')]
    ]


def test_template_can_be_read_from_a_file(simulator: SimulatorThread, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("text\nThe soup was cold.\n", encoding="utf-8")
    (tmp_path / "prompt.txt").write_text(
        "Classify the sentiment.\n\nText: {text}\nAnswer:", encoding="utf-8"
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--template",
        "@prompt.txt",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [
        [user("Classify the sentiment.\n\nText: The soup was cold.\nAnswer:")]
    ]


def test_template_renders_numbers_from_typed_columns_as_plain_text(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    pq.write_table(
        pa.table({"count": pa.array([3], pa.int64()), "price": [2.5], "item": ["apples"]}),
        tmp_path / "in.parquet",
    )

    result = run_cli(
        tmp_path,
        "in.parquet",
        "-o",
        "out.parquet",
        "--template",
        "{count} {item} at {price} each",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [[user("3 apples at 2.5 each")]]


def test_template_row_with_a_null_or_empty_placeholder_value_is_skipped_not_sent(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"title": "Dune", "author": "Herbert"},
            {"title": "Emma", "author": None},
            {"title": "", "author": "Orwell"},
            {"title": "Ulysses", "author": "Joyce"},
        ],
    )

    result = run_cli(
        tmp_path,
        "in.jsonl",
        "-o",
        "out.parquet",
        "--template",
        "Summarise {title} by {author}.",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["status"].tolist() == ["ok", "skipped", "skipped", "ok"]
    assert "author" in output["error_message"][1]
    assert "title" in output["error_message"][2]
    assert sent_messages(simulator) == [
        [user("Summarise Dune by Herbert.")],
        [user("Summarise Ulysses by Joyce.")],
    ]


# -- messages column -----------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You translate to French."},
    {"role": "user", "content": "cat"},
    {"role": "assistant", "content": "chat"},
    {"role": "user", "content": "dog"},
]


def test_messages_column_in_csv_is_sent_as_given(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    pd.DataFrame(
        {"id": [1, 2], "msgs": [json.dumps(CONVERSATION), json.dumps([user("hello")])]}
    ).to_csv(tmp_path / "in.csv", index=False)

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--messages-column",
        "msgs",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == sorted([CONVERSATION, [user("hello")]], key=json.dumps)
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["completion"].tolist() == [
        "Simulated answer to: dog",
        "Simulated answer to: hello",
    ]


def test_messages_column_in_jsonl_may_be_a_real_nested_list(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": 1, "messages": CONVERSATION}, {"id": 2, "messages": json.dumps([user("hi")])}],
    )

    result = run_cli(
        tmp_path,
        "in.jsonl",
        "-o",
        "out.parquet",
        "--messages-column",
        "messages",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == sorted([CONVERSATION, [user("hi")]], key=json.dumps)
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["status"].tolist() == ["ok", "ok"]


INVALID_MESSAGES = {
    "not JSON": "this is not json",
    "a JSON object, not a list": json.dumps(user("hi")),
    "a list of strings": json.dumps(["hi"]),
    "an unknown role": json.dumps([{"role": "wizard", "content": "hi"}]),
    "a user message without content": json.dumps([{"role": "user"}]),
}


def test_invalid_messages_cell_makes_the_row_an_invalid_row_error_and_sends_nothing_for_it(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    cells = [json.dumps([user("valid one")]), *INVALID_MESSAGES.values()]
    pd.DataFrame({"case": ["valid", *INVALID_MESSAGES], "msgs": cells}).to_csv(
        tmp_path / "in.csv", index=False
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--messages-column",
        "msgs",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 1, result.stderr  # the run finished with failed rows
    output = pd.read_parquet(tmp_path / "out.parquet").set_index("case")
    assert output.loc["valid", "status"] == "ok"
    for case in INVALID_MESSAGES:
        row = output.loc[case]
        assert row["status"] == "error", case
        assert row["error_type"] == "InvalidRow", case
        assert "msgs" in row["error_message"], case  # names the column at fault
        assert pd.isna(row["http_status"]), case
    assert sent_messages(simulator) == [[user("valid one")]]


# -- system prompt -------------------------------------------------------------------------


def test_system_prompt_is_prepended_to_a_prompt_column(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nWhat is the capital of France?\n", encoding="utf-8")

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--system",
        "Answer in one word.",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [
        [
            {"role": "system", "content": "Answer in one word."},
            user("What is the capital of France?"),
        ]
    ]


def test_system_prompt_from_a_file_is_prepended_to_a_messages_column(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"messages": [user("cat")]}])
    (tmp_path / "system.txt").write_text("You translate to French.\nBe brief.", encoding="utf-8")

    result = run_cli(
        tmp_path,
        "in.jsonl",
        "-o",
        "out.parquet",
        "--messages-column",
        "messages",
        "--system",
        "@system.txt",
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert sent_messages(simulator) == [
        [{"role": "system", "content": "You translate to French.\nBe brief."}, user("cat")]
    ]


def test_system_prompt_is_not_sent_for_skipped_rows(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    frame = pd.DataFrame({"prompt": ["hello", None]})

    result = pipeline.run(
        frame,
        output=tmp_path / "out.parquet",
        base_url=simulator.base_url,
        system="Be kind.",
        progress=False,
    )

    assert result["status"].tolist() == ["ok", "skipped"]
    assert sent_messages(simulator) == [[{"role": "system", "content": "Be kind."}, user("hello")]]


# -- the Python API takes the same prompt sources --------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param({"prompt_column": "q"}, [user("Why?")], id="prompt_column"),
        pytest.param({"template": "{q} {{x}}"}, [user("Why? {x}")], id="template"),
        pytest.param(
            {"messages_column": "m"},
            [{"role": "developer", "content": "Be terse."}, user("Why not?")],
            id="messages_column",
        ),
    ],
)
def test_python_api_accepts_each_prompt_source(
    source: dict[str, str],
    expected: list[dict[str, str]],
    simulator: SimulatorThread,
    tmp_path: Path,
) -> None:
    frame = pd.DataFrame(
        {
            "q": ["Why?"],
            "m": [json.dumps([{"role": "developer", "content": "Be terse."}, user("Why not?")])],
        }
    )

    result = pipeline.run(
        frame,
        output=tmp_path / "out.parquet",
        base_url=simulator.base_url,
        progress=False,
        **source,
    )

    assert result["status"].tolist() == ["ok"]
    assert sent_messages(simulator) == [expected]
