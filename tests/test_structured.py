"""Structured answers: schema loading, request plans, typed columns, parsing, re-asks, labels.

The last section runs the texts this module sends through the simulator over real HTTP, so
the markers the simulator recognises cannot drift from the ones we send.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from pipeline.labels import LABELS_MARKER, label_instruction, load_labels, match_label, parse_label
from pipeline.prompts import add_system_text
from pipeline.simulator import SimulatorThread
from pipeline.structured import (
    answer_columns,
    load_schema,
    parse_answer,
    plan_schema_request,
    reask_messages,
    schema_columns,
    supports_native_schema,
)

MakeSimulator = Callable[..., SimulatorThread]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": ["number", "null"]},
        "member": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    "required": ["name", "age"],
}
STRICT = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
LABELS = ["positive", "negative", "neutral"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- load_schema -------------------------------------------------------------------------


def test_load_schema_reads_a_json_schema(tmp_path: Path) -> None:
    path = write(tmp_path, "person.json", json.dumps(PERSON))
    assert load_schema(path) == PERSON


def test_load_schema_unwraps_an_openai_json_schema_block(tmp_path: Path) -> None:
    block = {"name": "city", "schema": STRICT, "strict": True}
    assert load_schema(write(tmp_path, "block.json", json.dumps(block))) == STRICT


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"type": "object",', "line 1"),
        ("[1, 2]", "not a JSON array"),
        ('{"type": "objekt"}', "not a valid JSON Schema"),
        ('{"type": "object", "required": "name"}', "not a valid JSON Schema"),
        ('{"type": "string"}', "must describe an object"),
    ],
    ids=["bad-json", "not-an-object", "bad-type", "bad-required", "not-object-schema"],
)
def test_load_schema_refuses_with_the_file_named(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path, "answer.json", text)
    with pytest.raises(ConfigError) as caught:
        load_schema(path)
    assert str(path) in str(caught.value)
    assert named in str(caught.value)


def test_load_schema_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json.*does not exist"):
        load_schema(tmp_path / "nope.json")


# -- which models get json_schema ----------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-mini",
        "gpt-4o-mini-2024-07-18",
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o-2024-11-20",
        "gpt-4.1",
        "gpt-4.1-nano-2025-04-14",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5.1",
        "o1",
        "o3-mini",
        "o4-mini",
        "openai/gpt-4o-mini",
        "GPT-4o-Mini",
    ],
)
def test_models_with_structured_outputs(model: str) -> None:
    assert supports_native_schema(model)


@pytest.mark.parametrize(
    "model",
    [
        "gpt-3.5-turbo",
        "gpt-3.5-turbo-0125",
        "gpt-4",
        "gpt-4-turbo",
        "gpt-4o-2024-05-13",
        "chatgpt-4o-latest",
        "o1-mini",
        "o1-preview",
        "claude-3-5-sonnet",
        "meta-llama/Llama-3-70b",
    ],
)
def test_models_without_structured_outputs(model: str) -> None:
    assert not supports_native_schema(model)


def test_auto_plan_uses_json_schema_where_supported() -> None:
    plan = plan_schema_request(STRICT, "gpt-4o-mini")

    assert plan.mode == "native"
    assert plan.system_prompt is None
    assert plan.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": STRICT, "strict": True},
    }


def test_auto_plan_falls_back_to_json_mode_with_the_schema_in_the_prompt() -> None:
    plan = plan_schema_request(PERSON, "gpt-3.5-turbo")

    assert plan.mode == "prompt"
    assert plan.response_format == {"type": "json_object"}
    assert plan.system_prompt is not None
    assert "JSON" in plan.system_prompt  # OpenAI refuses json_object without it
    stated = plan.system_prompt[plan.system_prompt.index("{") :]
    schema, _ = json.JSONDecoder().raw_decode(stated)
    assert schema == PERSON


def test_forced_modes_override_the_model_rule() -> None:
    assert plan_schema_request(PERSON, "gpt-3.5-turbo", "native").mode == "native"
    assert plan_schema_request(PERSON, "gpt-4o", "prompt").mode == "prompt"


def test_strict_only_for_schemas_that_meet_openai_strict_rules() -> None:
    # PERSON leaves properties optional and allows extra ones: strict would be a 400.
    loose = plan_schema_request(PERSON, "gpt-4o", "native").response_format
    strict = plan_schema_request(STRICT, "gpt-4o", "native").response_format
    assert loose["json_schema"]["strict"] is False
    assert strict["json_schema"]["strict"] is True


def test_schema_name_is_made_acceptable_to_the_api() -> None:
    plan = plan_schema_request(STRICT, "gpt-4o", name="my schema.v2")
    assert plan.response_format["json_schema"]["name"] == "my_schema_v2"


def test_unknown_schema_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="auto, native or prompt"):
        plan_schema_request(PERSON, "gpt-4o", "strict")  # type: ignore[arg-type]


def test_add_system_text_appends_to_the_system_prompt_or_adds_one() -> None:
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    without = [{"role": "user", "content": "q"}]

    added = add_system_text(with_system, "EXTRA")
    inserted = add_system_text(without, "EXTRA")

    assert added == [
        {"role": "system", "content": "Be brief.\n\nEXTRA"},
        {"role": "user", "content": "q"},
    ]
    assert inserted == [{"role": "system", "content": "EXTRA"}, {"role": "user", "content": "q"}]
    assert with_system[0]["content"] == "Be brief."  # the caller's messages are not changed


# -- typed columns -------------------------------------------------------------------------


def test_schema_columns_are_typed_in_schema_order() -> None:
    assert schema_columns(PERSON, "a_") == [
        ("a_name", pa.string()),
        ("a_age", pa.int64()),
        ("a_height", pa.float64()),
        ("a_member", pa.bool_()),
        ("a_mood", pa.string()),
        ("a_tags", pa.string()),
        ("a_address", pa.string()),
    ]


@pytest.mark.parametrize(
    ("subschema", "arrow_type"),
    [
        ({"type": ["integer", "null"]}, pa.int64()),
        ({"anyOf": [{"type": "boolean"}, {"type": "null"}]}, pa.bool_()),
        ({"type": ["integer", "number"]}, pa.float64()),
        ({"enum": [1, 2, 3]}, pa.int64()),
        ({"const": 2.5}, pa.float64()),
        ({"type": ["string", "integer"]}, pa.string()),
        ({"$ref": "#/$defs/thing"}, pa.string()),
        ({}, pa.string()),
    ],
)
def test_column_type_of_unions_enums_and_untyped(
    subschema: dict[str, Any], arrow_type: pa.DataType
) -> None:
    schema = {"type": "object", "properties": {"v": subschema}}
    assert schema_columns(schema) == [("v", arrow_type)]


def test_a_property_that_would_overwrite_a_column_is_refused() -> None:
    schema = {"type": "object", "properties": {"status": {"type": "string"}}}
    with pytest.raises(ConfigError, match=r"'status'.*prefix"):
        schema_columns(schema, taken={"status", "completion"})
    assert schema_columns(schema, "answer_", taken={"status"}) == [("answer_status", pa.string())]


def test_answer_columns_fit_the_arrow_types() -> None:
    text = (
        '{"name": "Ann", "age": 31.0, "height": 1.7, "member": true, "mood": "sad", '
        '"tags": ["a", "b"], "address": {"city": "Oslo"}}'
    )
    parsed = parse_answer(text, PERSON)
    values = answer_columns(parsed, PERSON, "a_")

    table = pa.Table.from_pylist([values], schema=pa.schema(schema_columns(PERSON, "a_")))
    row = table.to_pylist()[0]
    assert row["a_age"] == 31
    assert json.loads(row["a_tags"]) == ["a", "b"]
    assert json.loads(row["a_address"]) == {"city": "Oslo"}
    assert row["a_member"] is True


def test_answer_columns_are_null_for_an_invalid_answer() -> None:
    parsed = parse_answer('{"name": "Ann", "age": "old"}', PERSON)
    assert set(answer_columns(parsed, PERSON).values()) == {None}


# -- parse_answer --------------------------------------------------------------------------


def test_a_valid_answer_gives_every_top_level_property() -> None:
    parsed = parse_answer('{"name": "Ann", "age": 31}', PERSON)

    assert parsed.ok and parsed.error is None
    assert parsed.values == {
        "name": "Ann",
        "age": 31,
        "height": None,
        "member": None,
        "mood": None,
        "tags": None,
        "address": None,
    }


@pytest.mark.parametrize(
    "text",
    [
        '```json\n{"name": "Ann", "age": 31}\n```',
        'Here you go: {"name": "Ann", "age": 31}. Anything else?',
        'I think {maybe} but: {"name": "Ann", "age": 31}',
        '  {"name": "Ann", "age": 31}\n',
    ],
    ids=["fenced", "prose", "prose-with-braces", "whitespace"],
)
def test_the_object_is_found_inside_fences_and_prose(text: str) -> None:
    parsed = parse_answer(text, PERSON)
    assert parsed.ok
    assert (parsed.values["name"], parsed.values["age"]) == ("Ann", 31)


def test_not_json_reports_the_parse_error_and_where() -> None:
    parsed = parse_answer('{"name": "Ann", "age": }', PERSON)

    assert not parsed.ok
    assert parsed.error is not None
    assert "not valid JSON" in parsed.error
    assert "line 1 column 24" in parsed.error
    assert not parsed.truncated


def test_a_missing_required_property_is_named() -> None:
    parsed = parse_answer('{"name": "Ann"}', PERSON)
    assert not parsed.ok
    assert parsed.error is not None and "'age' is a required property" in parsed.error


def test_a_wrong_type_names_its_path() -> None:
    parsed = parse_answer('{"name": "Ann", "age": 3, "tags": ["a", 7]}', PERSON)
    assert parsed.error is not None
    assert "$.tags[1]" in parsed.error and "'string'" in parsed.error


def test_every_value_is_none_when_the_answer_is_invalid() -> None:
    parsed = parse_answer('{"name": "Ann", "age": "thirty"}', PERSON)
    assert not parsed.ok
    assert set(parsed.values.values()) == {None}


@pytest.mark.parametrize(
    ("text", "named"),
    [(None, "empty"), ("   ", "empty"), ("[1, 2]", "array"), ('"Ann"', "string")],
)
def test_empty_and_non_object_answers(text: str | None, named: str) -> None:
    parsed = parse_answer(text, PERSON)
    assert not parsed.ok
    assert parsed.error is not None and named in parsed.error


def test_an_answer_cut_at_the_token_limit_is_reported_as_truncated() -> None:
    parsed = parse_answer('{"name": "Ann", "ag', PERSON, finish_reason="length")

    assert not parsed.ok and parsed.truncated
    assert parsed.error is not None and "cut off at the token limit" in parsed.error


def test_error_messages_stay_short_for_a_huge_answer() -> None:
    schema = {"type": "object", "properties": {"v": {"type": "string"}}}
    parsed = parse_answer(json.dumps({"v": list(range(5000))}), schema)
    assert parsed.error is not None and len(parsed.error) < 400


# -- re-asks -------------------------------------------------------------------------------


def test_reask_feeds_the_answer_and_the_error_back() -> None:
    original = [{"role": "system", "content": "S"}, {"role": "user", "content": "Describe Ann"}]
    messages = reask_messages(original, "{oops", "The answer is not valid JSON: ...")

    assert messages[:2] == original
    assert messages[2] == {"role": "assistant", "content": "{oops"}
    assert messages[3]["role"] == "user"
    assert "The answer is not valid JSON: ..." in messages[3]["content"]
    assert "only the corrected answer" in messages[3]["content"]
    assert len(original) == 2  # not mutated


def test_reask_of_an_empty_answer_sends_an_empty_assistant_turn() -> None:
    messages = reask_messages([{"role": "user", "content": "q"}], None, "The answer is empty.")
    assert messages[1] == {"role": "assistant", "content": ""}


# -- labels --------------------------------------------------------------------------------


def test_labels_inline_and_from_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "labels.txt", "positive\n\n negative \nneutral, mixed\n")
    assert load_labels(" positive, negative ,neutral") == LABELS
    assert load_labels(f"@{path}") == ["positive", "negative", "neutral, mixed"]


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("a,,b", "label 2 is empty"),
        ("a,b,", "label 3 is empty"),
        ("", "is empty"),
        ("only", "at least two"),
        ("Positive,positive.", "the same"),
        ("a|b,c", "'|'"),
        ("a,...", "no letters"),
        ("@/nonexistent/labels.txt", "does not exist"),
    ],
)
def test_bad_labels_are_config_errors(value: str, named: str) -> None:
    with pytest.raises(ConfigError, match="--labels") as caught:
        load_labels(value)
    assert named in str(caught.value)


def test_label_instruction_ends_with_the_labels_line() -> None:
    text = label_instruction(LABELS)
    assert text.splitlines()[-1] == f"{LABELS_MARKER} positive | negative | neutral"
    assert "exactly one" in text


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("positive", "positive"),
        (" Positive.", "positive"),
        ('"NEGATIVE"', "negative"),
        ("**neutral**", "neutral"),
        ("`neutral`\n", "neutral"),
        ("Label: positive", "positive"),
        ("answer = negative.", "negative"),
        ("Sentiment: Neutral", "neutral"),
        ("\u201cpositive\u201d", "positive"),
    ],
)
def test_an_answer_that_is_one_label_matches(answer: str, label: str) -> None:
    assert match_label(answer, LABELS) == label


@pytest.mark.parametrize(
    "answer",
    [
        "positive or negative",
        "Label: positive, negative",
        "The answer is positive",
        "not positive",
        "positively",
        "",
        None,
    ],
)
def test_anything_else_matches_no_label(answer: str | None) -> None:
    assert match_label(answer, LABELS) is None


def test_label_match_keeps_the_label_as_configured() -> None:
    assert match_label("very good", ["Very Good", "Bad"]) == "Very Good"


def test_parse_label_errors_list_the_labels_and_any_labels_named() -> None:
    unknown = parse_label("great", LABELS)
    two = parse_label("positive or negative", LABELS)
    cut = parse_label("posi", LABELS, finish_reason="length")

    assert not unknown.ok and unknown.values == {"label": None}
    assert unknown.error is not None
    assert "'great'" in unknown.error and "positive, negative, neutral" in unknown.error
    assert two.error is not None and "more than one label (positive, negative)" in two.error
    assert cut.truncated
    assert parse_label("Neutral!", LABELS).values == {"label": "neutral"}


# -- against the simulator: the markers we send are the ones it understands ------------------


def ask(sim: SimulatorThread, messages: list[dict[str, Any]], **extra: Any) -> str:
    body = {"model": "gpt-3.5-turbo", "messages": messages, **extra}
    response = httpx.post(sim.base_url + "/chat/completions", json=body, timeout=5)
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


@pytest.mark.parametrize("model", ["gpt-3.5-turbo", "gpt-4o-mini"])
def test_the_simulator_answers_a_schema_request_with_a_valid_object(
    simulator: SimulatorThread, model: str
) -> None:
    plan = plan_schema_request(PERSON, model)
    messages = [{"role": "user", "content": "Describe Ann."}]
    if plan.system_prompt:
        messages = add_system_text(messages, plan.system_prompt)

    answer = ask(simulator, messages, response_format=plan.response_format)

    parsed = parse_answer(answer, PERSON)
    assert parsed.ok, parsed.error
    jsonschema.validate(json.loads(answer), PERSON)


def test_the_simulator_answers_a_label_instruction_with_a_label(
    simulator: SimulatorThread,
) -> None:
    messages = add_system_text([{"role": "user", "content": "Review"}], label_instruction(LABELS))
    answers = {ask(simulator, messages, seed=seed) for seed in range(1, 13)}

    assert answers <= set(LABELS)
    assert len(answers) > 1  # the seed changes the sample


def test_a_reask_corrects_a_wrong_first_answer(make_simulator: MakeSimulator) -> None:
    sim = make_simulator()
    messages = add_system_text(
        [{"role": "user", "content": "Review: great! [[sim:wrong=1]]"}], label_instruction(LABELS)
    )

    first = ask(sim, messages)
    checked = parse_label(first, LABELS)
    assert not checked.ok and checked.error is not None

    second = ask(sim, reask_messages(messages, first, checked.error))
    assert parse_label(second, LABELS).ok


def test_a_schema_reask_corrects_a_missing_field(make_simulator: MakeSimulator) -> None:
    sim = make_simulator()
    plan = plan_schema_request(PERSON, "gpt-4o-mini")
    messages = [{"role": "user", "content": "Ann [[sim:wrong=2]]"}]

    answers = [ask(sim, messages, response_format=plan.response_format)]
    for _ in range(2):
        parsed = parse_answer(answers[-1], PERSON)
        assert not parsed.ok and parsed.error is not None
        reask = reask_messages(messages, answers[-1], parsed.error)
        answers.append(ask(sim, reask, response_format=plan.response_format))

    assert parse_answer(answers[-1], PERSON).ok
    # the two wrong answers are the two kinds of invalid: prose, then a missing field
    assert "not valid JSON" in (parse_answer(answers[0], PERSON).error or "")
    assert "required property" in (parse_answer(answers[1], PERSON).error or "")


def test_a_run_reads_and_checks_its_schema_file_once_and_again_when_it_changes(
    tmp_path: Path, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema serves the fingerprint, the requests and OUTPUT's columns: parsed and
    checked once per run (it was read and parsed about 7 times), and read again once the
    file changes (no stale schema)."""
    import pandas as pd
    from conftest import run_job

    import pipeline.structured as structured

    schema_path = tmp_path / "schema.json"
    schema_path.write_text(json.dumps(STRICT))
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["a review", "another"]}).to_csv(data, index=False)
    reads: list[str] = []
    read_schema = structured.read_schema

    def counted(path: str | Path) -> dict[str, Any]:
        reads.append(str(path))
        return read_schema(path)

    monkeypatch.setattr(structured, "read_schema", counted)
    summary = run_job(data, tmp_path / "out.parquet", base_url=simulator.base_url,
                      json_schema=str(schema_path))  # fmt: skip
    assert summary.ok == 2 and reads == [str(schema_path)]
    schema_path.write_text(json.dumps({**STRICT, "title": "changed"}) + " ")
    assert load_schema(schema_path)["title"] == "changed" and len(reads) == 2
