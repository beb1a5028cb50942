"""Unit tests of the simulator's Batch APIs: BatchService.handle driven with a fake clock."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from pipeline.batch_service import DROPPED, BatchService, BatchSimConfig


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A stand-in for the simulator's chat answer: deterministic text and usage."""
    text = body["messages"][-1]["content"]
    if "[fail400]" in text:
        error = {"message": "bad prompt", "type": "invalid_request_error", "param": None}
        return 400, {"error": {**error, "code": None}}
    content = f"Simulated answer to: {text}"
    prompt = sum(len(m["content"].split()) for m in body["messages"])
    completion = len(content.split())
    return 200, {
        "id": "chatcmpl-sim-1",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def make(**config: Any) -> tuple[BatchService, Clock]:
    clock = Clock()
    return BatchService(answer, clock, BatchSimConfig(**config)), clock


def call(service: BatchService, method: str, target: str, body: Any = None) -> tuple[int, Any]:
    raw = json.dumps(body).encode() if body is not None else b""
    reply = service.handle(method, target, {"content-type": "application/json"}, raw)
    assert reply is not None
    status, headers, data = reply
    if status == 0:
        return 0, None
    if ("content-type", "application/json") in headers:
        return status, json.loads(data)
    return status, data


def line(custom_id: str, prompt: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
    } | extra


def upload(service: BatchService, lines: list[Any], purpose: str = "batch") -> dict[str, Any]:
    content = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    request = httpx.Request(
        "POST",
        "http://sim/v1/files",
        data={"purpose": purpose},
        files={"file": ("part-1.jsonl", content.encode(), "application/jsonl")},
    )
    body = request.read()
    reply = service.handle("POST", "/v1/files", dict(request.headers), body)
    assert reply is not None and reply[0] == 200, reply
    return json.loads(reply[2])


def create(service: BatchService, file_id: str, **extra: Any) -> tuple[int, Any]:
    request = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    return call(service, "POST", "/v1/batches", request | {"completion_window": "24h"} | extra)


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(text) for text in data.decode().splitlines()]


def content(service: BatchService, file_id: str) -> list[dict[str, Any]]:
    status, data = call(service, "GET", f"/v1/files/{file_id}/content")
    assert status == 200
    return jsonl(data)


# -- routing and files ----------------------------------------------------------------------


def test_other_paths_are_not_batch_paths() -> None:
    service, _ = make()
    assert service.handle("POST", "/v1/chat/completions", {}, b"{}") is None
    assert service.handle("GET", "/v1/models", {}, b"") is None


def test_file_upload_get_list_content_delete() -> None:
    service, clock = make()
    record = upload(service, [line("a", "hi")])
    assert record == {
        "id": record["id"],
        "object": "file",
        "bytes": record["bytes"],
        "created_at": int(clock.now),
        "expires_at": None,
        "filename": "part-1.jsonl",
        "purpose": "batch",
        "status": "processed",
        "status_details": None,
    }
    assert call(service, "GET", f"/v1/files/{record['id']}") == (200, record)
    assert content(service, record["id"]) == [line("a", "hi")]
    status, listing = call(service, "GET", "/v1/files?purpose=batch")
    assert status == 200 and [f["id"] for f in listing["data"]] == [record["id"]]
    assert listing["object"] == "list" and listing["has_more"] is False
    assert call(service, "GET", "/v1/files?purpose=fine-tune")[1]["data"] == []
    deleted = {"id": record["id"], "object": "file", "deleted": True}
    assert call(service, "DELETE", f"/v1/files/{record['id']}") == (200, deleted)
    status, body = call(service, "GET", f"/v1/files/{record['id']}")
    assert status == 404 and "No such File object" in body["error"]["message"]
    assert service.counters["files_uploaded"] == 1


def test_upload_needs_purpose_and_file() -> None:
    service, _ = make()
    request = httpx.Request("POST", "http://sim/v1/files", data={"purpose": "batch"}, files={})
    reply = service.handle("POST", "/v1/files", dict(request.headers), request.read())
    assert reply is not None and reply[0] == 400
    request = httpx.Request(
        "POST", "http://sim/v1/files", data={"purpose": "x"}, files={"file": ("a", b"{}")}
    )
    reply = service.handle("POST", "/v1/files", dict(request.headers), request.read())
    assert reply is not None and reply[0] == 400
    assert json.loads(reply[2])["error"]["param"] == "purpose"


# -- OpenAI batches: states ----------------------------------------------------------------


def test_batch_completes_at_once_with_exact_objects() -> None:
    service, clock = make()
    record = upload(service, [line("r1", "one two"), line("r2", "three")])
    status, batch = create(service, record["id"], metadata={"bpp_job": "j", "bpp_part": "1"})
    assert status == 200
    t0 = int(clock.now)
    assert batch == {
        "id": batch["id"],
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "errors": None,
        "input_file_id": record["id"],
        "completion_window": "24h",
        "status": "completed",
        "output_file_id": batch["output_file_id"],
        "error_file_id": None,
        "created_at": t0,
        "expires_at": t0 + 86400,
        "in_progress_at": t0,
        "finalizing_at": t0,
        "completed_at": t0,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 2, "completed": 2, "failed": 0},
        "usage": {
            "input_tokens": 3,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 12,
        },
        "metadata": {"bpp_job": "j", "bpp_part": "1"},
    }
    output = content(service, batch["output_file_id"])
    assert [x["custom_id"] for x in output] == ["r1", "r2"]
    first = output[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert first["response"]["body"] == answer(line("r1", "one two")["body"])[1]
    assert first["id"].startswith("batch_req_") and first["response"]["request_id"]
    assert call(service, "GET", f"/v1/files/{batch['output_file_id']}")[1]["purpose"] == (
        "batch_output"
    )
    assert service.counters["lines_answered"] == 2
    assert service.batches_by_tag[(("bpp_job", "j"), ("bpp_part", "1"))] == 1


def test_batch_walks_through_its_states_on_the_clock() -> None:
    service, clock = make(batch_seconds=100)
    record = upload(service, [line(f"r{i}", f"p {i}") for i in range(4)])
    t0 = clock.now
    _, batch = create(service, record["id"])
    assert batch["status"] == "validating"
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["output_file_id"] is None and batch["in_progress_at"] is None

    def get() -> dict[str, Any]:
        return call(service, "GET", f"/v1/batches/{batch['id']}")[1]

    clock.now = t0 + 10
    assert get()["status"] == "in_progress" and get()["in_progress_at"] == int(t0 + 10)
    assert get()["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
    clock.now = t0 + 50  # lines finish at 30, 50, 70, 90 (0.1 S + (k + 1) / 4 * 0.8 S)
    assert get()["request_counts"] == {"total": 4, "completed": 2, "failed": 0}
    assert service.counters["lines_answered"] == 2
    clock.now = t0 + 95
    now = get()
    assert now["status"] == "finalizing" and now["finalizing_at"] == int(t0 + 90)
    assert now["output_file_id"] is None
    clock.now = t0 + 100
    done = get()
    assert done["status"] == "completed" and done["completed_at"] == int(t0 + 100)
    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert len(content(service, done["output_file_id"])) == 4
    assert get()["output_file_id"] == done["output_file_id"]  # files written once
    assert service.counters["lines_answered"] == 4


def test_cancel_keeps_finished_lines_and_ends_cancelled() -> None:
    service, clock = make(batch_seconds=100, cancel_seconds=5)
    record = upload(service, [line(f"r{i}", f"p {i}") for i in range(4)])
    t0 = clock.now
    batch = create(service, record["id"])[1]
    clock.now = t0 + 55
    status, cancelling = call(service, "POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 200 and cancelling["status"] == "cancelling"
    assert cancelling["cancelling_at"] == int(t0 + 55)
    clock.now = t0 + 60
    cancelled = call(service, "GET", f"/v1/batches/{batch['id']}")[1]
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] == int(t0 + 60)
    assert cancelled["request_counts"] == {"total": 4, "completed": 2, "failed": 0}
    assert [x["custom_id"] for x in content(service, cancelled["output_file_id"])] == ["r0", "r1"]
    assert cancelled["error_file_id"] is None
    status, body = call(service, "POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 200 and body["status"] == "cancelled"


def test_cancel_of_a_completed_batch_is_refused() -> None:
    service, _ = make()
    batch = create(service, upload(service, [line("a", "x")])["id"])[1]
    status, body = call(service, "POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 409 and "completed" in body["error"]["message"]


def test_list_is_newest_first_with_cursor() -> None:
    service, clock = make()
    file_id = upload(service, [line("a", "x")])["id"]
    ids = []
    for _ in range(5):
        clock.now += 1
        ids.append(create(service, file_id)[1]["id"])
    status, page = call(service, "GET", "/v1/batches?limit=2")
    assert status == 200 and [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["object"] == "list" and page["has_more"] is True
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page = call(service, "GET", f"/v1/batches?limit=2&after={page['last_id']}")[1]
    assert [b["id"] for b in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    page = call(service, "GET", f"/v1/batches?limit=2&after={ids[1]}")[1]
    assert [b["id"] for b in page["data"]] == [ids[0]] and page["has_more"] is False
    assert call(service, "GET", "/v1/batches?limit=0")[0] == 400


def test_unknown_batch_and_file_are_404() -> None:
    service, _ = make()
    status, body = call(service, "GET", "/v1/batches/batch_nope")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert call(service, "POST", "/v1/batches/batch_nope/cancel")[0] == 404
    assert call(service, "GET", "/v1/files/file-nope/content")[0] == 404
    assert create(service, "file-nope")[0] == 404


# -- OpenAI create and input validation ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"completion_window": "48h"}, "completion_window"),
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
def test_create_validates_its_body(change: dict[str, Any], param: str) -> None:
    service, _ = make()
    file_id = upload(service, [line("a", "x")])["id"]
    status, body = create(service, file_id, **change)
    assert status == 400 and body["error"]["param"] == param
    assert service.counters["batches_created"] == 0


def test_create_accepts_sixteen_metadata_pairs() -> None:
    service, _ = make()
    file_id = upload(service, [line("a", "x")])["id"]
    metadata = {f"k{i}": "v" * 512 for i in range(16)}
    assert create(service, file_id, metadata=metadata)[0] == 200


def failed_errors(service: BatchService, lines: list[Any], **config: Any) -> list[dict[str, Any]]:
    batch = create(service, upload(service, lines)["id"])[1]
    assert batch["status"] == "failed" and batch["failed_at"] == batch["created_at"]
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["errors"]["object"] == "list"
    return list(batch["errors"]["data"])


def test_validation_failures_name_code_and_line() -> None:
    service, _ = make(max_requests=3)
    dup = failed_errors(service, [line("a", "x"), line("b", "y"), line("a", "z")])
    assert [(e["code"], e["line"], e["param"]) for e in dup] == [
        ("duplicate_custom_id", 3, "custom_id")
    ]
    assert "line 3" in dup[0]["message"] and "'a'" in dup[0]["message"]
    mixed = failed_errors(service, [line("a", "x"), line("b", "y", model="gpt-4o")])
    assert [(e["code"], e["line"]) for e in mixed] == [("model_mismatch", 2)]
    url = failed_errors(service, [line("a", "x", url="/v1/embeddings")])
    assert [(e["code"], e["line"]) for e in url] == [("url_mismatch", 1)]
    bad = failed_errors(service, [line("a", "x"), "{not json", '{"custom_id": "c"}'])
    assert [(e["code"], e["line"]) for e in bad] == [
        ("invalid_json_line", 2),
        ("invalid_json_line", 3),
    ]
    assert [e["code"] for e in failed_errors(service, [])] == ["empty_file"]
    many = [line(f"r{i}", "x") for i in range(4)]
    assert [e["code"] for e in failed_errors(service, many)] == ["too_many_tasks"]
    assert service.counters["lines_answered"] == 0


def test_validation_failure_takes_the_validating_phase() -> None:
    service, clock = make(batch_seconds=100)
    batch = create(service, upload(service, [line("a", "x"), line("a", "y")])["id"])[1]
    assert batch["status"] == "validating" and batch["errors"] is not None
    clock.now += 10
    failed = call(service, "GET", f"/v1/batches/{batch['id']}")[1]
    assert failed["status"] == "failed" and failed["failed_at"] == batch["created_at"] + 10


# -- OpenAI line outcomes and faults -------------------------------------------------------


def test_http_error_and_expired_lines_in_the_error_file() -> None:
    service, _ = make()
    lines = [
        line("ok", "fine"),
        line("bad", "[fail400] no"),
        line("boom", "x [batch:http500]"),
        line("late", "y [batch:expire]"),
    ]
    batch = create(service, upload(service, lines)["id"])[1]
    assert batch["status"] == "expired" and batch["expired_at"] == batch["created_at"]
    assert batch["completed_at"] is None
    assert batch["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    assert [x["custom_id"] for x in content(service, batch["output_file_id"])] == ["ok"]
    errors = {x["custom_id"]: x for x in content(service, batch["error_file_id"])}
    assert errors["bad"]["error"] is None
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"] == {
        "message": "bad prompt",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert errors["boom"]["response"]["status_code"] == 500
    assert set(errors["boom"]["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    assert errors["boom"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["late"] == {
        "id": errors["late"]["id"],
        "custom_id": "late",
        "response": None,
        "error": {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        },
    }


def test_fail_all_completes_with_output_file_null() -> None:
    service, _ = make(fail_all=True)
    batch = create(service, upload(service, [line(f"r{i}", "x") for i in range(9)])["id"])[1]
    assert batch["status"] == "completed"
    assert batch["output_file_id"] is None and batch["error_file_id"] is not None
    assert batch["request_counts"] == {"total": 9, "completed": 0, "failed": 9}
    lines = content(service, batch["error_file_id"])
    assert len(lines) == 9 and {x["response"]["status_code"] for x in lines} == {500}


def test_expire_fraction_is_reproducible() -> None:
    results = []
    for _ in range(2):
        service, _ = make(expire_fraction=0.5)
        lines = [line(f"r{i}", "x") for i in range(40)]
        batch = create(service, upload(service, lines)["id"])[1]
        assert batch["status"] == "expired"
        expired = [x["custom_id"] for x in content(service, batch["error_file_id"])]
        assert 5 < len(expired) < 35
        results.append(expired)
    assert results[0] == results[1]


def test_shuffled_output_order_is_seeded() -> None:
    orders = []
    for seed in (1, 1, 2):
        service, _ = make(shuffle_seed=seed)
        batch = create(service, upload(service, [line(f"r{i}", "x") for i in range(20)])["id"])[1]
        orders.append([x["custom_id"] for x in content(service, batch["output_file_id"])])
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(f"r{i}" for i in range(20))
    assert orders[0] != [f"r{i}" for i in range(20)]


def test_dropped_create_commits_the_batch() -> None:
    service, _ = make(drop_create_responses=1)
    file_id = upload(service, [line("a", "x")])["id"]
    tag = {"bpp_job": "j", "bpp_part": "3", "bpp_attempt": "1"}
    assert create(service, file_id, metadata=tag) == (0, None)
    request = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    raw = json.dumps(request | {"completion_window": "24h"}).encode()
    assert service.handle("POST", "/v1/batches", {}, raw) != DROPPED  # only the first
    page = call(service, "GET", "/v1/batches")[1]
    assert [b["metadata"] for b in page["data"]] == [None, tag]
    assert service.batches_by_tag[tuple(sorted(tag.items()))] == 1
    assert service.counters["creates_dropped"] == 1


def test_enqueued_token_limit_refuses_create_until_batches_end() -> None:
    service, clock = make(batch_seconds=100, enqueued_token_limit=10)
    file_id = upload(service, [line("a", "one two three"), line("b", "four five six")])["id"]
    assert create(service, file_id)[0] == 200  # 6 tokens enqueued
    status, body = create(service, file_id)
    assert status == 400 and body["error"]["code"] == "token_limit_exceeded"
    assert body["error"]["message"].startswith("Enqueued token limit reached for gpt-4o-mini ")
    other = upload(service, [line("c", "a b c d e", model="gpt-4o")])["id"]
    assert create(service, other)[0] == 200  # the limit is per model
    clock.now += 100
    assert create(service, file_id)[0] == 200
    assert service.counters["creates_refused"] == 1


# -- Anthropic message batches -------------------------------------------------------------


def request(custom_id: str, prompt: str, **params: Any) -> dict[str, Any]:
    base = {"model": "claude-sonnet-4", "max_tokens": 100}
    messages = [{"role": "user", "content": prompt}]
    return {"custom_id": custom_id, "params": base | {"messages": messages} | params}


def test_message_batch_lifecycle_and_results() -> None:
    service, clock = make(batch_seconds=100)
    t0 = clock.now
    reqs = [request("a", "hello there", system="be brief"), request("b", "[fail400] x")]
    reqs.append(request("c", "[batch:expire] y"))
    status, batch = call(service, "POST", "/v1/messages/batches", {"requests": reqs})
    assert status == 200
    assert batch == {
        "id": batch["id"],
        "type": "message_batch",
        "processing_status": "in_progress",
        "request_counts": {
            "processing": 3,
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": None,
        "created_at": "2023-11-14T22:13:20Z",
        "expires_at": "2023-11-15T22:13:20Z",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": None,
    }
    results = f"/v1/messages/batches/{batch['id']}/results"
    status, body = call(service, "GET", results)
    assert status == 400 and body["type"] == "error"
    clock.now = t0 + 100
    ended = call(service, "GET", f"/v1/messages/batches/{batch['id']}")[1]
    assert ended["processing_status"] == "ended" and ended["ended_at"] == "2023-11-14T22:15:00Z"
    assert ended["request_counts"] == {
        "processing": 0,
        "succeeded": 1,
        "errored": 1,
        "canceled": 0,
        "expired": 1,
    }
    assert ended["results_url"].endswith(results)
    status, data = call(service, "GET", results)
    by_id = {x["custom_id"]: x["result"] for x in jsonl(data)}
    chat = answer(
        {
            "model": "claude-sonnet-4",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"},
            ],
        }
    )[1]
    assert by_id["a"] == {
        "type": "succeeded",
        "message": {
            "id": "msg_sim_a",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4",
            "content": [{"type": "text", "text": chat["choices"][0]["message"]["content"]}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 4, "output_tokens": 5, "service_tier": "batch"},
        },
    }
    assert by_id["b"] == {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "bad prompt"},
        },
    }
    assert by_id["c"] == {"type": "expired"}


def test_message_batch_cancel_list_and_404() -> None:
    service, clock = make(batch_seconds=100)
    ids = []
    for _ in range(3):
        clock.now += 1
        reqs = [request("a", "x"), request("b", "y")]
        ids.append(call(service, "POST", "/v1/messages/batches", {"requests": reqs})[1]["id"])
    clock.now += 50  # a (finishes at +50 of its batch) is done in the first batch only
    status, canceling = call(service, "POST", f"/v1/messages/batches/{ids[0]}/cancel")
    assert status == 200 and canceling["processing_status"] == "ended"  # cancel_seconds=0
    assert canceling["request_counts"]["canceled"] == 1
    assert canceling["request_counts"]["succeeded"] == 1
    results = call(service, "GET", f"/v1/messages/batches/{ids[0]}/results")[1]
    assert [x["result"]["type"] for x in jsonl(results)] == ["succeeded", "canceled"]
    page = call(service, "GET", "/v1/messages/batches?limit=2")[1]
    assert [b["id"] for b in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    assert page["first_id"] == ids[2] and page["last_id"] == ids[1]
    page = call(service, "GET", f"/v1/messages/batches?limit=2&after_id={ids[1]}")[1]
    assert [b["id"] for b in page["data"]] == [ids[0]] and page["has_more"] is False
    status, body = call(service, "GET", "/v1/messages/batches/msgbatch_nope")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    # dialects do not see each other's batches
    assert call(service, "GET", f"/v1/batches/{ids[0]}")[0] == 404


def test_message_batch_canceling_state() -> None:
    service, clock = make(batch_seconds=100, cancel_seconds=10)
    batch = call(service, "POST", "/v1/messages/batches", {"requests": [request("a", "x")]})[1]
    clock.now += 20
    canceling = call(service, "POST", f"/v1/messages/batches/{batch['id']}/cancel")[1]
    assert canceling["processing_status"] == "canceling"
    assert canceling["cancel_initiated_at"] == "2023-11-14T22:13:40Z"
    clock.now += 10
    ended = call(service, "GET", f"/v1/messages/batches/{batch['id']}")[1]
    assert ended["processing_status"] == "ended"
    assert ended["request_counts"]["canceled"] == 1


@pytest.mark.parametrize(
    "requests",
    [
        [],
        [request("a b", "x")],
        [request("a", "x"), request("a", "y")],
        [{"custom_id": "a", "params": {"model": "m", "messages": []}}],
    ],
)
def test_message_batch_create_is_validated(requests: list[Any]) -> None:
    service, _ = make()
    status, body = call(service, "POST", "/v1/messages/batches", {"requests": requests})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert service.counters["batches_created"] == 0


def test_message_batch_faults_fail_all_drop_and_token_limit() -> None:
    service, _ = make(fail_all=True, drop_create_responses=1, enqueued_token_limit=3)
    reqs = {"requests": [request("a", "one two")]}
    assert call(service, "POST", "/v1/messages/batches", reqs) == (0, None)
    batch = call(service, "GET", "/v1/messages/batches")[1]["data"][0]
    results = call(service, "GET", f"/v1/messages/batches/{batch['id']}/results")[1]
    result = jsonl(results)[0]["result"]
    assert result["type"] == "errored" and result["error"]["error"]["type"] == "api_error"
    status, body = call(service, "POST", "/v1/messages/batches", reqs)
    assert status == 200  # the first batch ended at once: nothing is enqueued
    service, _ = make(batch_seconds=10, enqueued_token_limit=3)
    assert call(service, "POST", "/v1/messages/batches", reqs)[0] == 200
    status, body = call(service, "POST", "/v1/messages/batches", reqs)
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "Enqueued token limit reached for claude-sonnet-4" in body["error"]["message"]


def test_cancel_while_validating_ends_cancelled_even_for_an_invalid_file() -> None:
    service, clock = make(batch_seconds=100)
    batch = create(service, upload(service, [line("a", "x"), line("a", "y")])["id"])[1]
    clock.now += 5
    cancelling = call(service, "POST", f"/v1/batches/{batch['id']}/cancel")[1]
    assert cancelling["status"] == "cancelled" and cancelling["in_progress_at"] is None
    assert cancelling["output_file_id"] is None and cancelling["error_file_id"] is None


def test_aimlapi_batches_answer_in_their_documented_shapes() -> None:
    service, clock = make(batch_seconds=100)
    params = {
        "model": "claude-x",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    status, created = call(
        service, "POST", "/v1/batches", {"requests": [{"custom_id": "a", "params": params}]}
    )
    assert status == 200 and created["processing_status"] == "in_progress"
    batch_id = created["id"]
    status, running = call(service, "GET", f"/v1/batches?batch_id={batch_id}")
    assert (status, running) == (200, [{"id": batch_id, "status": "generating"}])
    clock.now += 100
    status, results = call(service, "GET", f"/v1/batches?batch_id={batch_id}")
    line = json.loads(results)
    assert line["custom_id"] == "a" and line["result"]["type"] == "succeeded"
    status, refused = call(service, "POST", f"/v1/batches/cancel/{batch_id}")
    assert status == 400 and "already finished" in refused["error"]["message"]
    assert call(service, "GET", f"/v1/messages/batches/{batch_id}")[0] == 404  # not Anthropic's


def test_a_cancelled_aimlapi_batch_is_its_object_with_status_cancelled() -> None:
    service, _ = make(batch_seconds=100)
    params = {
        "model": "claude-x",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    _, created = call(
        service, "POST", "/v1/batches", {"requests": [{"custom_id": "a", "params": params}]}
    )
    status, cancelling = call(service, "POST", f"/v1/batches/cancel/{created['id']}")
    assert status == 200 and cancelling["processing_status"] in ("canceling", "ended")
    _, after = call(service, "GET", f"/v1/batches?batch_id={created['id']}")
    assert after["status"] == "cancelled" and after["id"] == created["id"]
