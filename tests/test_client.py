"""One attempt on the wire: responses parse, both error shapes map to the right error type."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Callable

import httpx
import pytest

from pipeline import errors
from pipeline.client import ChatClient, error_from_response, parse_completion, parse_retry_after
from pipeline.transport import RawHeaders, RawResponse

SEED_RESPONSE = {
    "id": "chatcmpl-BKKS4Aulz4SaVm81hHo7HMKEcQmtk",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
                "annotations": [],
            },
        }
    ],
    "created": 1744184876,
    "model": "gpt-3.5-turbo-0125",
    "usage": {
        "prompt_tokens": 50,
        "completion_tokens": 126,
        "total_tokens": 176,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "system_fingerprint": None,
}


def _map(status: int, body: object, headers: dict[str, str] | None = None) -> errors.RequestError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return error_from_response(status, raw, httpx.Headers(headers or {}))


def test_the_providers_documented_response_parses_with_usage_details() -> None:
    completion = parse_completion(json.dumps(SEED_RESPONSE).encode())
    assert completion.text == "Hello! How can I assist you today?"
    assert completion.finish_reason == "stop"
    assert completion.model == "gpt-3.5-turbo-0125"
    assert completion.response_id == "chatcmpl-BKKS4Aulz4SaVm81hHo7HMKEcQmtk"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (50, 126)
    assert completion.usage.total_tokens == 176
    assert completion.usage.cached_tokens == 0
    assert completion.usage.reasoning_tokens == 0


def test_missing_usage_details_are_null_not_an_error() -> None:
    body = dict(
        SEED_RESPONSE, usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    )
    completion = parse_completion(json.dumps(body).encode())
    assert completion.usage.cached_tokens is None
    assert completion.usage.reasoning_tokens is None


def test_null_content_with_tool_calls_keeps_the_calls_as_text() -> None:
    choice = {
        "index": 0,
        "finish_reason": "tool_calls",
        "message": {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
        },
    }
    completion = parse_completion(json.dumps(dict(SEED_RESPONSE, choices=[choice])).encode())
    assert completion.finish_reason == "tool_calls"
    assert completion.text is not None and '"name": "f"' in completion.text


def test_every_choice_is_parsed_in_index_order_with_its_own_finish_reason() -> None:
    def choice(index: int, text: str, reason: str) -> dict[str, object]:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": reason}

    body = dict(SEED_RESPONSE, choices=[choice(1, "second", "length"), choice(0, "first", "stop")])
    completion = parse_completion(json.dumps(body).encode())
    assert [(c.text, c.finish_reason) for c in completion.choices] == [
        ("first", "stop"),
        ("second", "length"),
    ]
    assert (completion.text, completion.finish_reason) == ("first", "stop")
    assert completion.usage.completion_tokens == 126  # one usage for the whole response


def test_a_later_choice_without_a_message_is_malformed() -> None:
    first = SEED_RESPONSE["choices"][0]
    body = dict(SEED_RESPONSE, choices=[first, {"index": 1}])
    with pytest.raises(errors.MalformedResponse, match=r"choices\[1\]"):
        parse_completion(json.dumps(body).encode())


@pytest.mark.parametrize(
    "encode", [lambda text: text.encode("utf-8-sig"), lambda text: text.encode("utf-16")]
)
def test_a_200_in_json_with_a_byte_order_mark_still_parses(encode: Callable[[str], bytes]) -> None:
    completion = parse_completion(encode(json.dumps(SEED_RESPONSE)))
    assert completion.text == "Hello! How can I assist you today?"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"[]",
        b'{"id": "x"}',
        b'{"choices": []}',
        b'{"choices": [{"index": 0}]}',
    ],
)
def test_a_200_that_is_not_a_completion_is_malformed_and_retryable(body: bytes) -> None:
    with pytest.raises(errors.MalformedResponse) as info:
        parse_completion(body)
    assert isinstance(info.value, errors.RetryableError)


def test_openai_error_shape_gives_message_type_and_code() -> None:
    error = _map(
        400,
        {
            "error": {
                "message": "This model's maximum context length is 16385 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )
    assert isinstance(error, errors.BadRequest)
    assert error.code == "context_length_exceeded"
    assert "maximum context length" in error.message and "400" in error.message


def test_aimlapi_flat_error_shape_gives_its_message() -> None:
    error = _map(
        403,
        {
            "message": "You are out of credits",
            "path": "/v1/chat/completions",
            "requestId": "abc",
            "statusCode": 403,
            "timestamp": "2026-01-01T00:00:00Z",
        },
    )
    assert isinstance(error, errors.PermissionDenied)
    assert "out of credits" in error.message


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.BadRequest),
        (404, errors.BadRequest),
        (422, errors.BadRequest),
        (408, errors.ServerError),
        (409, errors.ServerError),
        (500, errors.ServerError),
        (502, errors.ServerError),
        (503, errors.ServerError),
        (504, errors.ServerError),
        (429, errors.RateLimited),
        (401, errors.AuthenticationError),
        (403, errors.PermissionDenied),
    ],
)
def test_status_codes_map_to_retry_classes(status: int, expected: type) -> None:
    assert type(_map(status, {"error": {"message": "x", "type": "t"}})) is expected


def test_insufficient_quota_429_stops_the_run_while_a_rate_limit_429_is_retried() -> None:
    quota = _map(
        429,
        {
            "error": {
                "message": "You exceeded your current quota",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
                "param": None,
            }
        },
    )
    assert isinstance(quota, errors.FatalError)
    limited = _map(429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}})
    assert isinstance(limited, errors.RetryableError)


def test_flat_429_that_talks_about_credits_is_a_quota_stop() -> None:
    error = _map(429, {"message": "Insufficient credits. Top up your balance", "statusCode": "429"})
    assert isinstance(error, errors.QuotaExceeded)


def test_x_should_retry_true_makes_a_4xx_retryable() -> None:
    error = _map(400, {"error": {"message": "try again"}}, {"x-should-retry": "true"})
    assert isinstance(error, errors.RetryableError)


def test_a_non_json_error_body_keeps_its_text() -> None:
    error = _map(502, b"<html>Bad Gateway</html>")
    assert isinstance(error, errors.ServerError)
    assert "Bad Gateway" in error.message


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert parse_retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert parse_retry_after(httpx.Headers({"retry-after": "0.25"})) == 0.25
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    waited = parse_retry_after(httpx.Headers({"retry-after": date}), now=now)
    assert waited is not None and 28 <= waited <= 31
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_the_api_key_never_reaches_an_error_message() -> None:
    key = "sk-secret-123456"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {key}"
        return httpx.Response(
            401, json={"error": {"message": f"Incorrect API key provided: {key}"}}
        )

    client = ChatClient(
        "https://api.example.test/v1",
        api_key=key,
        timeout=5,
        transport=httpx.MockTransport(handler),
    )
    with pytest.raises(errors.AuthenticationError) as info:
        asyncio.run(client.send(b"{}", "bpp-1"))
    assert key not in str(info.value)
    assert "***" in str(info.value)


def test_each_request_carries_the_client_request_id_and_json_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=SEED_RESPONSE)

    client = ChatClient(
        "http://127.0.0.1:9/v1/", api_key=None, timeout=5, transport=httpx.MockTransport(handler)
    )
    asyncio.run(client.send(b'{"model": "m"}', "bpp-00ff"))
    (request,) = seen
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions"
    assert request.headers["x-client-request-id"] == "bpp-00ff"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers


class FakeRoute:
    """A whole backend for ChatClient: answers from a list, records what it was sent."""

    def __init__(self, *answers: RawResponse | errors.RequestError) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[bytes, dict[bytes, bytes], float]] = []
        self.closed = False

    async def post(self, body: bytes, headers: RawHeaders, *, total: float) -> RawResponse:
        self.sent.append((body, dict(headers), total))
        answer = self.answers.pop(0)
        if isinstance(answer, errors.RequestError):
            raise answer
        return answer

    async def aclose(self) -> None:
        self.closed = True


def test_any_route_is_a_backend_and_its_errors_reach_the_caller_without_the_key() -> None:
    ok = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()
    route = FakeRoute(
        RawResponse(200, [(b"x-ratelimit-remaining-requests", b"9")], ok),
        errors.ConnectFailed("refused while sending sk-secret"),
        RawResponse(503, [(b"retry-after", b"2")], b'{"error": {"message": "busy"}}'),
    )
    client = ChatClient("http://api.test/v1", api_key="sk-secret", timeout=7, transport=route)

    async def scenario() -> None:
        completion = await client.send(b"{}", "row-1")
        assert completion.choices[0].text == "hi"
        assert completion.headers == {"x-ratelimit-remaining-requests": "9"}
        with pytest.raises(errors.ConnectFailed) as failed:
            await client.send(b"{}", "row-2")
        assert "sk-secret" not in str(failed.value)
        with pytest.raises(errors.ServerError) as busy:
            await client.send(b"{}", "row-3")
        assert busy.value.retry_after == 2
        await client.aclose()

    asyncio.run(scenario())
    assert [headers[b"X-Client-Request-Id"] for _, headers, _ in route.sent] == [
        b"row-1",
        b"row-2",
        b"row-3",
    ]
    assert {total for _, _, total in route.sent} == {7}
    assert route.closed
