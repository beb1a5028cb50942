"""The simulator behaves like an OpenAI-compatible provider, and its faults do what they say.

Everything here goes over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import email.utils
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from pipeline.simulator import SimulatorConfig, SimulatorThread, format_go_duration

MakeSimulator = Callable[..., SimulatorThread]
REPO = Path(__file__).resolve().parents[1]
SPEC = Path(__file__).parent / "spec" / "aimlapi-gpt-3.5-turbo.openapi.json"


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": prompt}], **extra}


@pytest.fixture
def client(simulator: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=simulator.base_url, timeout=5) as http:
        yield http


def post(sim: SimulatorThread, prompt: str, timeout: float = 5, **extra: Any) -> httpx.Response:
    """One chat request on a fresh connection."""
    with httpx.Client(base_url=sim.base_url, timeout=timeout) as http:
        return http.post("/chat/completions", json=chat_body(prompt, **extra))


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string such as 1h2m3.5s or 250ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def words(text: str) -> int:
    return len(text.split())


# -- a successful completion -------------------------------------------------------------


def test_completion_has_the_documented_shape(client: httpx.Client) -> None:
    response = client.post(
        "/chat/completions",
        json={
            "model": "gpt-3.5-turbo-0125",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
        },
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-sim-")
    assert body["object"] == "chat.completion"
    assert abs(body["created"] - time.time()) < 60
    assert body["model"] == "gpt-3.5-turbo-0125"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Simulated answer to: What is the capital of France?",
                "refusal": None,
            },
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 ``nullable: true`` becomes a JSON Schema ``null`` type."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if converted.pop("nullable", False) and isinstance(converted.get("type"), str):
        converted["type"] = [converted["type"], "null"]
    return converted


def test_completion_validates_against_the_provider_schema(client: httpx.Client) -> None:
    spec = json.loads(SPEC.read_text())
    operation = spec["paths"]["/v1/chat/completions"]["post"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]

    body = client.post("/chat/completions", json=chat_body("Hello", n=2)).json()

    jsonschema.validate(body, _nullable_to_json_schema(schema))


def test_both_chat_paths_answer(simulator: SimulatorThread) -> None:
    root = simulator.base_url.removesuffix("/v1")
    for path in ("/v1/chat/completions", "/chat/completions"):
        assert httpx.post(root + path, json=chat_body("hi")).status_code == 200


def test_usage_is_honest_word_counts(client: httpx.Client) -> None:
    short = client.post("/chat/completions", json=chat_body("one two")).json()
    long = client.post("/chat/completions", json=chat_body("one two three four five six")).json()

    for body in (short, long):
        usage = body["usage"]
        content = body["choices"][0]["message"]["content"]
        assert usage["completion_tokens"] == words(content)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert short["usage"]["prompt_tokens"] == 2
    assert long["usage"]["prompt_tokens"] == 6


def test_prompt_tokens_sum_all_messages_and_text_parts(client: httpx.Client) -> None:
    body = {
        "model": "gpt-3.5-turbo",
        "messages": [
            {"role": "system", "content": "three short words"},
            {"role": "user", "content": [{"type": "text", "text": "two words"}]},
        ],
    }
    completion = client.post("/chat/completions", json=body).json()
    assert completion["usage"]["prompt_tokens"] == 5
    assert completion["choices"][0]["message"]["content"] == "Simulated answer to: two words"


def test_answer_quotes_at_most_200_characters_of_the_prompt(client: httpx.Client) -> None:
    prompt = "x" * 500
    content = client.post("/chat/completions", json=chat_body(prompt)).json()["choices"][0]
    assert content["message"]["content"] == "Simulated answer to: " + "x" * 200


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_truncates_with_finish_reason_length(
    client: httpx.Client, limit_field: str
) -> None:
    prompt = "tell me a long story about a dragon"
    body = client.post("/chat/completions", json=chat_body(prompt, **{limit_field: 5})).json()

    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "Simulated answer to: tell me"
    assert body["usage"]["completion_tokens"] == 5


def test_token_limit_above_the_answer_changes_nothing(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json=chat_body("hi", max_tokens=100)).json()
    assert body["choices"][0]["finish_reason"] == "stop"


def test_n_returns_n_distinct_choices_and_bills_each(client: httpx.Client) -> None:
    one = client.post("/chat/completions", json=chat_body("hello there")).json()
    three = client.post("/chat/completions", json=chat_body("hello there", n=3)).json()

    contents = [choice["message"]["content"] for choice in three["choices"]]
    assert [choice["index"] for choice in three["choices"]] == [0, 1, 2]
    assert contents[0] == one["choices"][0]["message"]["content"]  # choice 0 as without n
    assert len(set(contents)) == 3
    assert three["usage"]["completion_tokens"] == sum(words(text) for text in contents)
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # one prompt


def test_ignore_n_answers_one_choice_like_servers_without_n(make_simulator: MakeSimulator):
    sim = make_simulator(ignore_n=True)
    with httpx.Client(base_url=sim.base_url) as http:
        body = http.post("/chat/completions", json=chat_body("hello there", n=3)).json()
    assert len(body["choices"]) == 1
    assert body["choices"][0]["message"]["content"] == "Simulated answer to: hello there"


def test_json_object_response_format_answers_a_json_object(client: httpx.Client) -> None:
    body = chat_body("Reply in JSON", response_format={"type": "json_object"})
    content = client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert json.loads(content) == {"answer": "Simulated answer to: Reply in JSON"}


def test_inference_id_always_and_client_request_id_echoed(client: httpx.Client) -> None:
    first = client.post(
        "/chat/completions", json=chat_body("a"), headers={"X-Client-Request-Id": "row-1:a"}
    )
    second = client.post("/chat/completions", json=chat_body("a"))
    invalid = client.post(
        "/chat/completions", json=chat_body("a"), headers={"X-Client-Request-Id": "has space"}
    )

    assert first.headers["x-client-request-id"] == "row-1:a"
    assert "x-client-request-id" not in second.headers
    # aimlapi drops an id outside [A-Za-z0-9._:-]{1,128} instead of echoing it.
    assert "x-client-request-id" not in invalid.headers
    ids = {r.headers["x-inference-id"] for r in (first, second, invalid)}
    assert len(ids) == 3


def test_requests_are_recorded_in_arrival_order(
    simulator: SimulatorThread, client: httpx.Client
) -> None:
    client.post("/chat/completions", json=chat_body("first"), headers={"X-Trace": "T"})
    client.post("/chat/completions", content=b"not json")

    recorded = simulator.simulator.requests
    assert [r.path for r in recorded] == ["/v1/chat/completions", "/v1/chat/completions"]
    assert recorded[0].headers["x-trace"] == "T"
    assert recorded[0].body == chat_body("first")
    assert recorded[1].body is None
    assert simulator.simulator.stats["requests"] == 2


def test_record_false_keeps_nothing(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(record=False)
    assert post(sim, "hi").status_code == 200
    assert sim.simulator.requests == []


# -- other endpoints and invalid requests -----------------------------------------------


def test_health_and_models(client: httpx.Client, simulator: SimulatorThread) -> None:
    health = httpx.get(simulator.base_url.removesuffix("/v1") + "/health")
    assert (health.status_code, health.text) == (200, "ok")
    models = client.get("/models").json()
    assert models["object"] == "list"
    assert "gpt-3.5-turbo" in [model["id"] for model in models["data"]]


def test_unknown_path_is_404_with_openai_error_body(client: httpx.Client) -> None:
    response = client.post("/embeddings", json={})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "/v1/embeddings" in error["message"]


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[1, 2]",
        b'{"messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "m"}',
    ],
    ids=["not-json", "not-an-object", "no-model", "no-messages"],
)
def test_invalid_body_is_400_with_aimlapi_flat_body(client: httpx.Client, content: bytes) -> None:
    response = client.post("/chat/completions", content=content)

    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"message", "path", "requestId", "statusCode", "timestamp"}
    assert body["message"].startswith("Body validation error!")
    assert body["statusCode"] == 400
    assert body["path"] == "/v1/chat/completions"


# -- prompt directives -------------------------------------------------------------------


def test_status_directive_answers_that_status_with_openai_body(simulator: SimulatorThread) -> None:
    bad = post(simulator, "x [[sim:status=400]]")
    unavailable = post(simulator, "x [[sim:status=503]]")

    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert unavailable.status_code == 503
    assert unavailable.json()["error"]["type"] == "server_error"
    assert simulator.simulator.stats["400"] == simulator.simulator.stats["503"] == 1


def test_context_length_directive(simulator: SimulatorThread) -> None:
    response = post(simulator, "huge [[sim:context_length]]")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


def test_aimlapi_status_directive_uses_the_flat_body(simulator: SimulatorThread) -> None:
    response = post(simulator, "x [[sim:aimlapi_status=403]]")

    assert response.status_code == 403
    body = response.json()
    assert "error" not in body
    assert body["statusCode"] == 403
    assert "credits" in body["message"]
    assert body["path"] == "/v1/chat/completions"


def test_quota_directive_is_429_insufficient_quota_without_retry_after(
    simulator: SimulatorThread,
) -> None:
    response = post(simulator, "x [[sim:quota]]")

    assert response.status_code == 429
    assert response.json() == {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    assert "retry-after" not in response.headers
    assert "retry-after-ms" not in response.headers


def test_fail_directive_fails_the_first_n_attempts_per_prompt(simulator: SimulatorThread) -> None:
    statuses = [post(simulator, "row 1 [[sim:fail=2,status=500]]").status_code for _ in range(4)]
    other_prompt = post(simulator, "row 2 [[sim:fail=2,status=500]]").status_code
    default_status = post(simulator, "row 3 [[sim:fail=1]]").status_code

    assert statuses == [500, 500, 200, 200]
    assert other_prompt == 500  # attempts are counted per distinct prompt
    assert default_status == 503


def test_reset_forgets_fail_counters_and_stats(simulator: SimulatorThread) -> None:
    assert post(simulator, "[[sim:fail=1]]").status_code == 503
    assert post(simulator, "[[sim:fail=1]]").status_code == 200

    simulator.simulator.reset()

    assert simulator.simulator.requests == []
    assert simulator.simulator.stats["requests"] == 0
    assert post(simulator, "[[sim:fail=1]]").status_code == 503


def test_retry_after_directive_in_seconds(simulator: SimulatorThread) -> None:
    response = post(simulator, "x [[sim:fail=1,status=429,retry_after=2]]")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "2000"


def test_retry_after_directive_as_http_date(simulator: SimulatorThread) -> None:
    response = post(simulator, "x [[sim:status=503,retry_after=3,retry_after_date=1]]")

    assert response.status_code == 503
    moment = email.utils.parsedate_to_datetime(response.headers["retry-after"])
    assert 2 <= moment.timestamp() - time.time() <= 5
    assert "retry-after-ms" not in response.headers  # clients would prefer it over the date


def test_drop_directive_closes_without_a_response(simulator: SimulatorThread) -> None:
    with pytest.raises(httpx.TransportError):
        post(simulator, "x [[sim:drop]]")
    assert simulator.simulator.stats["drop"] == 1


def test_drop_then_success_with_fail(simulator: SimulatorThread) -> None:
    with pytest.raises(httpx.TransportError):
        post(simulator, "x [[sim:fail=1,drop]]")
    assert post(simulator, "x [[sim:fail=1,drop]]").status_code == 200


def test_malformed_directive_is_200_with_invalid_json(simulator: SimulatorThread) -> None:
    response = post(simulator, "x [[sim:malformed]]")
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


def test_timeout_directive_never_answers(simulator: SimulatorThread) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(simulator, "x [[sim:timeout]]", timeout=0.3)
    assert simulator.simulator.stats["timeout"] == 1


def test_sleep_ms_directive_delays_the_answer(simulator: SimulatorThread) -> None:
    started = time.perf_counter()
    assert post(simulator, "x [[sim:sleep_ms=200]]").status_code == 200
    assert time.perf_counter() - started >= 0.2


@pytest.mark.parametrize(
    ("directive", "named"),
    [
        ("stauts=500", "stauts"),
        ("status=200", "status=200"),
        ("fail=two", "fail='two'"),
        ("drop,timeout", "conflicting"),
    ],
)
def test_a_directive_it_cannot_obey_is_a_loud_400(
    simulator: SimulatorThread, directive: str, named: str
) -> None:
    response = post(simulator, f"x [[sim:{directive}]]")
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]


# -- random faults and latency -----------------------------------------------------------


def test_rate_429_answers_429_with_retry_after(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(rate_429=1.0, retry_after_s=0.25)
    response = post(sim, "hi")

    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "0.25"
    assert response.headers["retry-after-ms"] == "250"


@pytest.mark.parametrize(("rate", "status"), [("rate_500", 500), ("rate_503", 503)])
def test_server_error_rates(make_simulator: MakeSimulator, rate: str, status: int) -> None:
    sim = make_simulator(**{rate: 1.0})
    response = post(sim, "hi")
    assert response.status_code == status
    assert response.json()["error"]["type"] == "server_error"


def test_rate_drop_malformed_timeout_and_length(make_simulator: MakeSimulator) -> None:
    with pytest.raises(httpx.TransportError):
        post(make_simulator(rate_drop=1.0), "hi")
    with pytest.raises(json.JSONDecodeError):
        json.loads(post(make_simulator(rate_malformed=1.0), "hi").content)
    with pytest.raises(httpx.ReadTimeout):
        post(make_simulator(rate_timeout=1.0), "hi", timeout=0.3)

    cut = post(make_simulator(rate_length=1.0), "a b c d e f").json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert words(cut["choices"][0]["message"]["content"]) < words(
        "Simulated answer to: a b c d e f"
    )


def test_seeded_faults_replay_identically(make_simulator: MakeSimulator) -> None:
    def statuses(sim: SimulatorThread) -> list[int]:
        with httpx.Client(base_url=sim.base_url) as http:
            return [
                http.post("/chat/completions", json=chat_body("x")).status_code for _ in range(30)
            ]

    first = make_simulator(rate_500=0.5, seed=7)
    run = statuses(first)
    assert run == statuses(make_simulator(rate_500=0.5, seed=7))
    assert {200, 500} <= set(run)
    first.simulator.reset()
    assert statuses(first) == run


def test_config_can_be_replaced_at_runtime(simulator: SimulatorThread) -> None:
    assert post(simulator, "hi").status_code == 200
    simulator.simulator.config = replace(simulator.simulator.config, rate_503=1.0)
    assert post(simulator, "hi").status_code == 503


def test_latency_delays_every_answer(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(latency_ms=150)
    started = time.perf_counter()
    assert post(sim, "hi").status_code == 200
    assert time.perf_counter() - started >= 0.15


# -- rate limits and auth ----------------------------------------------------------------


def test_rps_limit_turns_the_excess_into_429(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(rps_limit=10)
    started = time.monotonic()
    with httpx.Client(base_url=sim.base_url) as http:
        responses = [http.post("/chat/completions", json=chat_body("x")) for _ in range(30)]
    elapsed = time.monotonic() - started

    ok = sum(response.status_code == 200 for response in responses)
    limited = [response for response in responses if response.status_code == 429]
    assert limited
    # Bucket of 10 (one second's burst) plus 10/s refill while we were sending.
    assert ok <= 10 + 10 * elapsed + 1
    assert ok + len(limited) == 30
    for response in limited:
        assert int(response.headers["retry-after"]) >= 1
        assert 0 < float(response.headers["retry-after-ms"]) <= 100
        assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_tpm_limit_turns_the_excess_into_429(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(tpm_limit=20)
    # 3 prompt tokens + 6 completion tokens ("Simulated answer to: a b c") = 9 per request.
    statuses = [post(sim, "a b c").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_go_durations_read_like_openai_headers(value: float, text: str) -> None:
    assert format_go_duration(value) == text
    assert parse_go_duration(text) == pytest.approx(value)


def test_rate_limit_headers_are_present_and_consistent(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(rate_limit_headers=True, rps_limit=5, tpm_limit=1000)
    response = post(sim, "count these four words")
    headers = response.headers

    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "4"
    assert 0 < parse_go_duration(headers["x-ratelimit-reset-requests"]) <= 1
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    spent = response.json()["usage"]["total_tokens"]
    assert int(headers["x-ratelimit-remaining-tokens"]) == 1000 - spent
    assert 0 < parse_go_duration(headers["x-ratelimit-reset-tokens"]) <= 60


def test_rate_limit_headers_only_when_asked(make_simulator: MakeSimulator) -> None:
    nominal = post(make_simulator(rate_limit_headers=True), "hi").headers
    assert int(nominal["x-ratelimit-remaining-requests"]) > 0
    parse_go_duration(nominal["x-ratelimit-reset-requests"])
    assert "x-ratelimit-limit-tokens" not in nominal  # no tpm_limit, no token trio

    plain = post(make_simulator(rps_limit=5), "hi").headers
    assert not [name for name in plain if name.startswith("x-ratelimit")]


def test_require_api_key_gives_401_without_the_key(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(require_api_key="sk-test")
    with httpx.Client(base_url=sim.base_url) as http:
        missing = http.post("/chat/completions", json=chat_body("hi"))
        wrong = http.post(
            "/chat/completions", json=chat_body("hi"), headers={"Authorization": "Bearer sk-no"}
        )
        right = http.post(
            "/chat/completions", json=chat_body("hi"), headers={"Authorization": "Bearer sk-test"}
        )

    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200


def test_request_log_gets_one_json_line_per_request(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    log_path = tmp_path / "requests.jsonl"
    sim = make_simulator(request_log=str(log_path))
    with httpx.Client(base_url=sim.base_url) as http:
        for row in range(3):
            http.post(
                "/chat/completions",
                json=chat_body(f"row {row}"),
                headers={"X-Client-Request-Id": f"row-{row}"},
            )
        # Read while the simulator is still running: every line must already be flushed.
        lines = log_path.read_text().splitlines()

    entries = [json.loads(line) for line in lines]
    assert [entry["client_request_id"] for entry in entries] == ["row-0", "row-1", "row-2"]
    assert [entry["body"] for entry in entries] == [chat_body(f"row {row}") for row in range(3)]
    assert all(abs(entry["t"] - time.time()) < 60 for entry in entries)


# -- answer modes: JSON, labels, wrong answers, samples ---------------------------------

LABELS_SYSTEM = "Answer with one label.\nLabels: positive | negative | neutral"
LABELS = {"positive", "negative", "neutral"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad"]},
        "nickname": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "home": {"$ref": "#/$defs/place"},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


def answer(sim: SimulatorThread, messages: list[dict[str, Any]], **extra: Any) -> str:
    return choices(sim, messages, **extra)[0]


def choices(sim: SimulatorThread, messages: list[dict[str, Any]], **extra: Any) -> list[str]:
    body = {"model": "gpt-4o-mini", "messages": messages, **extra}
    # Plain HTTP: without loading the CA bundle a fresh client is ~25x cheaper to make.
    with httpx.Client(base_url=sim.base_url, timeout=5, verify=False) as http:
        response = http.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return [choice["message"]["content"] for choice in response.json()["choices"]]


def labelled(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": LABELS_SYSTEM}, {"role": "user", "content": prompt}]


def user(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def conforms(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_a_labels_line_in_the_system_prompt_gets_one_label(simulator: SimulatorThread) -> None:
    answers = [answer(simulator, labelled(f"review {row}")) for row in range(30)]

    assert set(answers) <= LABELS
    assert len(set(answers)) == 3  # spread over the labels by the prompt's hash
    assert answers == [answer(simulator, labelled(f"review {row}")) for row in range(30)]


def test_a_labels_line_outside_the_system_prompt_is_just_text(simulator: SimulatorThread) -> None:
    content = answer(simulator, user("Labels: a | b"))
    assert content == "Simulated answer to: Labels: a | b"


def test_label_directive_answers_exactly_that(simulator: SimulatorThread) -> None:
    assert answer(simulator, labelled("great [[sim:label=neutral]]")) == "neutral"
    assert answer(simulator, user("q [[sim:label=Paris]]")) == "Paris"


def test_answer_directive_keeps_commas_brackets_and_spaces(simulator: SimulatorThread) -> None:
    text = ' {"tags": ["a", "b"], "grid": [[1, 2]]} '
    content = answer(
        simulator, user(f"q [[sim:answer={text}]]"), response_format={"type": "json_object"}
    )
    assert content == text


def test_answer_directive_after_other_items_and_directives(simulator: SimulatorThread) -> None:
    prompt = "q [[sim:sleep_ms=1]] then [[sim:fail=1,status=500,answer=a, b]]"
    first = post(simulator, prompt)
    second = post(simulator, prompt)

    assert first.status_code == 500
    assert second.json()["choices"][0]["message"]["content"] == "a, b"


def test_json_schema_format_answers_the_plain_conforming_object(simulator: SimulatorThread) -> None:
    content = answer(simulator, user("Describe Ann"), response_format=JSON_SCHEMA_FORMAT)

    assert json.loads(content) == {
        "name": "x",
        "age": 18,  # 1, raised to the minimum
        "score": 1,
        "member": True,
        "mood": "happy",
        "nickname": "x",
        "tags": ["x"],
        "home": {"city": "x"},
    }
    assert conforms(content)


def test_json_object_with_the_schema_stated_in_the_prompt(simulator: SimulatorThread) -> None:
    system = (
        "Answer with a JSON object that conforms to this JSON Schema:\n"
        + json.dumps(SCHEMA)
        + "\nReply with the JSON object only."
    )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Ann"}]
    content = answer(simulator, messages, response_format={"type": "json_object"})
    assert conforms(content)


def test_json_answers_are_cut_by_the_token_limit_into_invalid_json(
    simulator: SimulatorThread,
) -> None:
    body = chat_body("Ann [[sim:length]]", response_format=JSON_SCHEMA_FORMAT)
    reply = httpx.post(simulator.base_url + "/chat/completions", json=body).json()
    choice = reply["choices"][0]

    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])
    assert reply["usage"]["completion_tokens"] == words(choice["message"]["content"])


def test_wrong_rate_one_makes_every_answer_invalid(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(wrong_rate=1.0, seed=3)

    label_answers = {answer(sim, labelled(f"r{row}")) for row in range(10)}
    json_answers = [
        answer(sim, user(f"p{row}"), response_format=JSON_SCHEMA_FORMAT) for row in range(20)
    ]

    assert label_answers == {"I do not know."}
    assert not any(conforms(text) for text in json_answers)
    parsed = [text for text in json_answers if text.startswith("{")]
    assert parsed and len(parsed) < 20  # both kinds occur: prose and a missing field
    assert all("name" not in json.loads(text) for text in parsed)  # first required: gone
    assert answer(sim, user("hi")) == "I do not know."
    assert sim.simulator.stats["wrong"] == 31


def test_wrong_kind_different_answers_well_formed_but_wrong(make_simulator: MakeSimulator) -> None:
    right = make_simulator()
    wrong = make_simulator(wrong_rate=1.0, wrong_kind="different")

    for row in range(10):
        correct = answer(right, labelled(f"r{row}"))
        other = answer(wrong, labelled(f"r{row}"))
        assert other in LABELS and other != correct
    correct = answer(right, user("Ann"), response_format=JSON_SCHEMA_FORMAT)
    other = answer(wrong, user("Ann"), response_format=JSON_SCHEMA_FORMAT)
    assert conforms(other) and other != correct
    assert answer(wrong, labelled("x [[sim:label=negative]]")) == "neutral"  # the next label


def test_wrong_rate_is_a_rate_and_replays_with_the_seed(make_simulator: MakeSimulator) -> None:
    def run(sim: SimulatorThread) -> list[str]:
        return [answer(sim, labelled("same prompt [[sim:label=positive]]")) for _ in range(200)]

    first = run(make_simulator(wrong_rate=0.3, seed=11))
    share = sum(text != "positive" for text in first) / len(first)

    assert 0.2 < share < 0.4
    assert run(make_simulator(wrong_rate=0.3, seed=11)) == first


def test_wrong_n_counts_a_conversation_and_its_reasks(simulator: SimulatorThread) -> None:
    messages = labelled("great! [[sim:wrong=1,label=positive]]")
    first = answer(simulator, messages)
    reask = [
        *messages,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "That is not a label. Answer again."},
    ]

    assert first == "I do not know."
    assert answer(simulator, reask) == "positive"
    assert answer(simulator, labelled("other [[sim:wrong=1,label=positive]]")) == "I do not know."


def test_bare_wrong_and_wrong_kind_directives(simulator: SimulatorThread) -> None:
    messages = labelled("x [[sim:wrong,wrong_kind=different,label=neutral]]")
    assert [answer(simulator, messages) for _ in range(3)] == ["positive"] * 3


def test_seed_changes_the_sample(simulator: SimulatorThread) -> None:
    texts = {answer(simulator, user("hi"), seed=seed) for seed in range(1, 6)}
    objects = {
        answer(simulator, user("Ann"), seed=seed, response_format=JSON_SCHEMA_FORMAT)
        for seed in range(1, 6)
    }

    assert len(texts) == 5 and len(objects) == 5
    assert all(conforms(text) for text in objects)
    assert answer(simulator, user("hi"), seed=3) == answer(simulator, user("hi"), seed=3)
    assert answer(simulator, user("hi")) == "Simulated answer to: hi"  # no seed: as before


def test_n_draws_labels_and_objects_per_choice_and_bills_each(
    simulator: SimulatorThread,
) -> None:
    body = chat_body("Ann", n=4, response_format=JSON_SCHEMA_FORMAT)
    reply = httpx.post(simulator.base_url + "/chat/completions", json=body).json()
    contents = [choice["message"]["content"] for choice in reply["choices"]]
    labels = choices(simulator, labelled("review"), n=12)

    assert len(contents) == 4 and len(set(contents)) > 1
    assert all(conforms(text) for text in contents)
    assert reply["usage"]["completion_tokens"] == sum(words(text) for text in contents)
    assert set(labels) <= LABELS and len(set(labels)) > 1


@pytest.mark.parametrize(
    ("directive", "named"),
    [
        ("wrong=two", "wrong='two'"),
        ("wrong_kind=maybe", "wrong_kind='maybe'"),
        ("label=", "label= needs a value"),
        ("label=a,answer=b", "conflicting answers"),
    ],
)
def test_an_answer_directive_it_cannot_obey_is_a_loud_400(
    simulator: SimulatorThread, directive: str, named: str
) -> None:
    response = post(simulator, f"x [[sim:{directive}]]")
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("wrong_rate", 1.5), ("wrong_rate", -0.1), ("wrong_kind", "bogus")]
)
def test_wrong_answer_settings_are_checked(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SimulatorConfig(**{field: value})


# -- HTTP/1.1 connection handling --------------------------------------------------------


def test_keep_alive_serves_50_requests_on_one_connection(
    simulator: SimulatorThread, client: httpx.Client
) -> None:
    for row in range(50):
        assert client.post("/chat/completions", json=chat_body(f"row {row}")).status_code == 200
    assert simulator.simulator.stats["connections"] == 1
    assert simulator.simulator.stats["ok"] == 50


def test_connection_close_is_honoured(simulator: SimulatorThread, client: httpx.Client) -> None:
    for _ in range(3):
        response = client.post(
            "/chat/completions", json=chat_body("hi"), headers={"Connection": "close"}
        )
        assert response.headers["connection"] == "close"
    assert simulator.simulator.stats["connections"] == 3


def _raw_request(body: bytes, path: str = "/v1/chat/completions") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, Any]]]:
    """Read ``count`` HTTP responses with Content-Length bodies from ``sock``."""
    buffer = b""
    responses: list[tuple[int, dict[str, Any]]] = []
    while len(responses) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode()
            match = re.search(r"content-length: (\d+)", head, re.IGNORECASE)
            assert match, head
            length = int(match[1])
            if len(buffer) >= head_end + 4 + length:
                body = buffer[head_end + 4 : head_end + 4 + length]
                responses.append((int(head.split(" ")[1]), json.loads(body)))
                buffer = buffer[head_end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        buffer += chunk
    return responses


def test_pipelined_requests_are_answered_in_order(simulator: SimulatorThread) -> None:
    slow = json.dumps(chat_body("slow [[sim:sleep_ms=150]]")).encode()
    fast = json.dumps(chat_body("fast")).encode()
    with socket.create_connection(("127.0.0.1", simulator.port), timeout=5) as sock:
        sock.sendall(_raw_request(slow) + _raw_request(fast))
        answers = _read_responses(sock, 2)

    contents = [body["choices"][0]["message"]["content"] for _, body in answers]
    assert contents == [
        "Simulated answer to: slow [[sim:sleep_ms=150]]",
        "Simulated answer to: fast",
    ]


def test_a_request_split_into_tiny_writes_is_reassembled(simulator: SimulatorThread) -> None:
    request = _raw_request(json.dumps(chat_body("piece by piece")).encode())
    with socket.create_connection(("127.0.0.1", simulator.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 7):
            sock.sendall(request[start : start + 7])
            time.sleep(0.001)
        [(status, body)] = _read_responses(sock, 1)

    assert status == 200
    assert body["choices"][0]["message"]["content"] == "Simulated answer to: piece by piece"


# -- standalone server -------------------------------------------------------------------


@pytest.mark.slow
def test_run_simulator_serves_until_sigterm() -> None:
    code = (
        "from pipeline.simulator import SimulatorConfig, run_simulator; "
        "run_simulator(SimulatorConfig(), port=0)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
            assert match, line
            response = httpx.post(match[1] + "/chat/completions", json=chat_body("hi"))
            assert response.status_code == 200
            process.terminate()
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
