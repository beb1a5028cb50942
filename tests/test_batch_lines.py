"""Batch result lines and the batch journal, as a provider writes them and as a kill leaves
them: every documented line shape maps to the row result a user expects, and the journal
replays to the step a killed run had reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.batch.anthropic import outcome as anthropic_outcome
from pipeline.batch.anthropic import to_params
from pipeline.batch.journal import Journal
from pipeline.batch.lines import parse_results
from pipeline.batch.parts import PartCaps, PartWriter, custom_id, key_of, read_lines, request_line
from pipeline.errors import ConfigError

KEY = 0x1234ABCD5678EF00
BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-3.5-turbo-0125",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}


def _line(**fields: Any) -> bytes:
    return json.dumps({"id": "batch_req_1", "custom_id": custom_id(KEY), **fields}).encode()


def test_custom_ids_are_the_result_keys_in_a_form_every_provider_accepts() -> None:
    cid = custom_id(KEY)
    assert cid == "bpp-1234abcd5678ef00" and key_of(cid) == KEY
    assert key_of("row-17") is None and key_of("bpp-xyz") is None


def test_an_answer_line_parses_to_its_completion() -> None:
    line = _line(response={"status_code": 200, "request_id": "r", "body": BODY}, error=None)
    outcome = parse_results([line]).outcomes[KEY]
    assert outcome.completion is not None and outcome.completion.text == "Paris"
    assert outcome.completion.usage.total_tokens == 13 and not outcome.retryable


def test_an_http_error_in_the_response_body_with_a_null_error_is_the_rows_error() -> None:
    # openai-openapi #302: the details sit in response.body.error, the top-level error is null
    error = {"message": "too long", "type": "invalid_request_error", "param": None, "code": None}
    line = _line(response={"status_code": 400, "body": {"error": error}}, error=None)
    outcome = parse_results([line]).outcomes[KEY]
    assert (outcome.status, outcome.error_type, outcome.retryable) == (400, "BadRequest", False)
    assert outcome.message is not None and "too long" in outcome.message


def test_a_5xx_or_429_line_and_an_expired_line_may_be_sent_again() -> None:
    server = _line(response={"status_code": 500, "body": {"error": {"message": "oops"}}})
    expired = _line(response=None, error={"code": "batch_expired", "message": "window ended"})
    assert parse_results([server]).outcomes[KEY].retryable
    assert parse_results([expired]).outcomes[KEY].retryable


def test_a_vllm_error_line_with_a_string_error_and_a_null_body_parses() -> None:
    line = _line(response={"status_code": 400, "body": None}, error="prompt is too long")
    outcome = parse_results([line]).outcomes[KEY]
    assert outcome.status == 400 and "prompt is too long" in (outcome.message or "")


def test_lines_match_by_custom_id_only_the_first_wins_and_strangers_are_counted() -> None:
    ok = _line(response={"status_code": 200, "body": BODY})
    again = _line(response={"status_code": 500, "body": {}})
    stranger = json.dumps({"custom_id": "someone-else", "response": None}).encode()
    parsed = parse_results([b"\n".join([stranger, ok]), again + b"\n", b"not json\n"])
    assert parsed.outcomes[KEY].completion is not None
    assert (parsed.repeated, parsed.unknown) == (1, 2)


def test_parts_are_cut_by_count_and_bytes_and_hold_one_model_each(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, 1, PartCaps(requests=3, bytes=10_000))
    for i in range(7):
        model = "a" if i % 2 else "b"
        writer.add(model, request_line(i, model, [{"role": "user", "content": "x"}], {}))
    written = writer.finish()
    assert sorted(p.lines for p in written) == [1, 3, 3]  # model b: 4 lines (3 + 1), model a: 3
    for part in written:
        bodies = [json.loads(line)["body"] for _, line in read_lines(tmp_path / part.name)]
        assert {b["model"] for b in bodies} == {part.model}
    assert not list(tmp_path.glob(".*tmp"))


def test_the_journal_replays_each_part_to_its_last_step_and_ignores_a_torn_line(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.append("part", 1, model="m", file="part-000001.jsonl", lines=5, round=1)
    journal.append("upload", 1)
    journal.append("uploaded", 1, file_id="file-1")
    journal.append("create", 1, attempt=1, t0=1.0)
    journal.append("part", 2, model="m", file="part-000002.jsonl", lines=3, round=2)
    with open(journal.path, "a") as fh:
        fh.write('{"event": "created", "part": 1, "bat')  # killed during the append
    parts = journal.replay()
    assert parts[1].file_id == "file-1" and parts[1].creating == 1.0
    assert parts[1].batch_id is None and parts[1].attempt == 1 and parts[1].open
    assert parts[2].round == 2 and parts[2].file_id is None
    assert journal.next_part() == 3


def test_an_openai_body_becomes_anthropic_messages_parameters() -> None:
    body = {
        "model": "claude-3-5-haiku",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "temperature": 0.1,
        "stop": "\n",
    }
    assert to_params(body) == {
        "model": "claude-3-5-haiku",
        "max_tokens": 1024,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "temperature": 0.1,
        "stop_sequences": ["\n"],
    }


def test_an_anthropic_batch_refuses_before_sending_what_messages_cannot_carry() -> None:
    body = {"model": "claude", "messages": [], "response_format": {"type": "json_object"}}
    with pytest.raises(ConfigError, match="response_format"):
        to_params(body)


def test_anthropic_result_lines_map_to_the_same_outcomes() -> None:
    succeeded = {
        "type": "succeeded",
        "message": {
            "id": "msg_1",
            "model": "claude",
            "content": [{"type": "text", "text": "Paris"}],
            "stop_reason": "max_tokens",
            "usage": {"input_tokens": 9, "output_tokens": 1},
        },
    }
    errored = {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad"}}}  # fmt: skip
    ok = anthropic_outcome(KEY, succeeded)
    assert ok.completion is not None and ok.completion.text == "Paris"
    assert ok.completion.finish_reason == "length" and ok.completion.usage.total_tokens == 10
    bad = anthropic_outcome(KEY, errored)
    assert (bad.error_type, bad.message, bad.retryable) == ("invalid_request_error", "bad", False)
    assert anthropic_outcome(KEY, {"type": "expired"}).retryable


def test_a_part_files_keys_are_read_whatever_the_key_order_of_its_lines(tmp_path: Path) -> None:
    """Keys are read from where request_line puts them (fast), and from the parsed line when a
    line is written otherwise (keys in another order, other spacing): the same keys."""
    ours = request_line(7, "m", [{"role": "user", "content": "hi"}], {})
    other = json.dumps({"method": "POST", "custom_id": custom_id(8), "url": "/v1/x"}).encode()
    spaced = b'{"custom_id":"' + custom_id(9).encode() + b'","method":"POST"}'
    foreign = json.dumps({"custom_id": "someone-else"}).encode()
    path = tmp_path / "part-000001.jsonl"
    path.write_bytes(b"\n".join([ours.rstrip(b"\n"), other, spaced, foreign, b""]) + b"\n")
    assert [key for key, _ in read_lines(path)] == [7, 8, 9]
