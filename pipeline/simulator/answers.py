"""How the simulator answers a chat body: the answer mode (text, JSON object, a schema
or labels), deterministic right and wrong answers from the prompt, the completion object
with honest usage. No I/O."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import (
    ANSWER_PREFIX,
    LABELS_LINE,
    SCHEMA_PROMPT_MARKER,
    WRONG_JSON_TEXT,
    WRONG_TEXT,
    count_tokens,
    dumps,
)

if TYPE_CHECKING:  # the app passes itself: its config, random draws and counters
    from .app import Simulator
    from .directives import Directives


def last_user_text(messages: list[Any], texts: list[str]) -> str:
    """The text a plain answer quotes: the last user message (else the last message)."""
    for message, text in zip(reversed(messages), reversed(texts), strict=True):
        if isinstance(message, dict) and message.get("role") == "user":
            return text
    return texts[-1]


def validation_problem(body: dict[str, Any] | None) -> str | None:
    """What makes ``body`` an invalid chat request, in aimlapi's words; None if it is fine."""
    if body is None:
        return "Expected a JSON object body."
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "'model': Required (expected a non-empty string)."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages': Required (expected a non-empty array)."
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"'messages[{index}]': Expected an object with a 'role'."
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 1
        ):
            return f"'{name}': Expected a number >= 1, received {value!r}."
    return None


@dataclass(frozen=True, slots=True)
class _AnswerMode:
    """How a request wants its answer: ``kind`` is text | json_object | schema | labels."""

    kind: str
    schema: dict[str, Any] | None = None
    labels: tuple[str, ...] = ()


TEXT_MODE = _AnswerMode("text")
_JSON_OBJECT_MODE = _AnswerMode("json_object")


def _prompt_schema(text: str) -> dict[str, Any] | None:
    """The JSON Schema stated after ``SCHEMA_PROMPT_MARKER`` in ``text``, if any."""
    at = text.find(SCHEMA_PROMPT_MARKER)
    if at < 0:
        return None
    start = at + len(SCHEMA_PROMPT_MARKER)
    while start < len(text) and text[start].isspace():
        start += 1
    try:
        schema, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return schema if isinstance(schema, dict) else None


def answer_mode(body: dict[str, Any], messages: list[Any], texts: list[str]) -> _AnswerMode:
    """The answer mode of a request; see "Answers" in the module docstring."""
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        assert isinstance(response_format, dict)
        block = response_format.get("json_schema")
        schema = block.get("schema") if isinstance(block, dict) else None
        return _AnswerMode("schema", schema if isinstance(schema, dict) else {})
    if kind == "json_object":
        for text in texts:
            stated = _prompt_schema(text)
            if stated is not None:
                return _AnswerMode("schema", stated)
        return _JSON_OBJECT_MODE
    for message, text in zip(messages, texts, strict=True):
        if "Labels:" in text and message.get("role") in ("system", "developer"):
            line = LABELS_LINE.search(text)
            if line is not None:
                labels = tuple(label.strip() for label in line.group(1).split("|"))
                labels = tuple(label for label in labels if label)
                if labels:
                    return _AnswerMode("labels", labels=labels)
    return TEXT_MODE


def draw_number(*parts: object) -> int:
    """A stable 64-bit hash of ``parts`` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


_MAX_EXAMPLE_DEPTH = 8


def _resolve_ref(root: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _example(schema: Any, variant: int, root: dict[str, Any], depth: int = 0) -> Any:
    """A plausible value for ``schema``; variant 0 is the plain one ("x", 1, true, first enum)."""
    if not isinstance(schema, dict) or depth > _MAX_EXAMPLE_DEPTH:
        return "x" if variant == 0 else f"x{variant}"
    if isinstance(schema.get("$ref"), str):
        target = _resolve_ref(root, schema["$ref"])
        return _example(target, variant, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[variant % len(enum)]
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword)
        if isinstance(branches, list) and branches:
            usable = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            return _example((usable or branches)[0], variant, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for branch in schema["allOf"]:
            if isinstance(branch, dict):
                merged.update(branch)
        rest = {key: value for key, value in schema.items() if key != "allOf"}
        return _example({**merged, **rest}, variant, root, depth + 1)

    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), "null")
    if declared is None:
        declared = (
            "object" if "properties" in schema else "array" if "items" in schema else "string"
        )
    if declared == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        value = {name: _example(sub, variant, root, depth + 1) for name, sub in properties.items()}
        for name in schema.get("required", []):
            value.setdefault(name, "x")
        return value
    if declared == "array":
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [_example(sub, variant, root, depth + 1) for sub in prefix]
        count = max(1, int(schema.get("minItems", 1)))
        count = min(count, int(schema.get("maxItems", count)))
        return [_example(schema.get("items"), variant, root, depth + 1)] * count
    if declared in ("integer", "number"):
        number = 1 + variant
        if isinstance(schema.get("minimum"), int | float):
            number = max(number, math.ceil(schema["minimum"]))
        if isinstance(schema.get("exclusiveMinimum"), int | float):
            number = max(number, math.floor(schema["exclusiveMinimum"]) + 1)
        if isinstance(schema.get("maximum"), int | float):
            number = min(number, math.floor(schema["maximum"]))
        if isinstance(schema.get("exclusiveMaximum"), int | float):
            number = min(number, math.ceil(schema["exclusiveMaximum"]) - 1)
        return number
    if declared == "boolean":
        return variant % 2 == 0
    if declared == "null":
        return None
    formats = {"date": "2024-01-01", "date-time": "2024-01-01T00:00:00Z", "email": "x@example.com"}
    text = formats.get(schema.get("format", ""), "x" if variant == 0 else f"x{variant}")
    min_length = int(schema.get("minLength", 0))
    text = text.ljust(min_length, "x")
    if isinstance(schema.get("maxLength"), int):
        text = text[: schema["maxLength"]]
    return text


def _json_text(value: Any) -> str:
    # Spaced like json.dumps: a JSON answer is several "tokens", so the token limit cuts it.
    return json.dumps(value, ensure_ascii=False)


def right_answer(
    mode: _AnswerMode, fixed: str | None, source: str, seed: Any, draw: int, choice: int
) -> tuple[str, int]:
    """The right answer of one choice, and the schema variant it used."""
    variant = 0 if seed is None and choice == 0 else 1 + draw % 997
    if fixed is not None:
        return fixed, 0
    if mode.kind == "labels":
        return mode.labels[draw % len(mode.labels)], 0
    if mode.kind == "schema":
        assert mode.schema is not None
        return _json_text(_example(mode.schema, variant, mode.schema)), variant
    text = ANSWER_PREFIX + source[:200]
    if seed is not None:
        text += f" (seed {seed})"
    if choice:
        text += f" (choice {choice})"
    if mode.kind == "json_object":
        return dumps({"answer": text}).decode(), 0
    return text, 0


def wrong_answer(mode: _AnswerMode, kind: str, right: str, variant: int, prose: bool) -> str:
    """A wrong answer of ``kind`` (invalid | different) in place of ``right``."""
    if mode.kind == "labels":
        if kind == "invalid":
            return WRONG_TEXT
        labels = mode.labels
        index = labels.index(right) if right in labels else -1
        return labels[(index + 1) % len(labels)]
    if mode.kind == "schema":
        assert mode.schema is not None
        if kind == "different":
            return _json_text(_example(mode.schema, variant + 1, mode.schema))
        required = [name for name in mode.schema.get("required", []) if isinstance(name, str)]
        value = _example(mode.schema, variant, mode.schema)
        if prose or not required or not isinstance(value, dict):
            return WRONG_JSON_TEXT
        value.pop(required[0], None)
        return _json_text(value)
    if mode.kind == "json_object":
        return WRONG_JSON_TEXT if kind == "invalid" else dumps({"answer": WRONG_TEXT}).decode()
    return WRONG_TEXT


def conversation_key(messages: list[Any], texts: list[str]) -> str:
    """The messages before the first assistant message: a re-ask's original request."""
    original: list[str] = []
    for message, text in zip(messages, texts, strict=True):
        if isinstance(message, dict) and message.get("role") == "assistant":
            break
        original.append(text)
    return "\x00".join(original)


def completion_body(
    body: dict[str, Any],
    texts: list[str],
    answers: list[str],
    sequence: int,
    wall_time: float,
    force_length: bool,
) -> tuple[dict[str, Any], int]:
    """The 200 body for a valid request (one choice per answer) and its token total."""
    limits = [int(body[name]) for name in ("max_tokens", "max_completion_tokens") if body.get(name)]
    base_limit = min(limits) if limits else None
    choices = []
    completion_tokens = 0
    for index, answer in enumerate(answers):
        finish_reason = "stop"
        tokens = count_tokens(answer)
        limit = base_limit
        if force_length:
            limit = min(limit or tokens, max(1, tokens // 2))
        if limit is not None and tokens > limit:
            answer = " ".join(answer.split()[:limit])
            tokens = count_tokens(answer)
            finish_reason = "length"
        completion_tokens += tokens
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        )
    prompt_tokens = sum(count_tokens(text) for text in texts)
    total_tokens = prompt_tokens + completion_tokens
    completion = {
        "id": f"chatcmpl-sim-{sequence}",
        "object": "chat.completion",
        "created": int(wall_time),
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    return completion, total_tokens


def choose_answers(
    simulator: Simulator,
    body: dict[str, Any],
    messages: list[Any],
    texts: list[str],
    directive: Directives | None,
) -> list[str]:
    """The content of each choice: right, or wrong as the config and directives say."""
    config = simulator.config
    mode = answer_mode(body, messages, texts)
    choices = 1 if config.ignore_n else int(body.get("n") or 1)
    if mode is TEXT_MODE and directive is None and config.wrong_rate == 0:
        # The hot path of throughput benchmarks: no hashing.
        source, seed = last_user_text(messages, texts), body.get("seed")
        return [right_answer(mode, None, source, seed, 0, c)[0] for c in range(choices)]

    conversation = conversation_key(messages, texts)
    seed = body.get("seed")
    fixed = directive.answer if directive is not None else None
    kind = (directive.wrong_kind if directive is not None else None) or config.wrong_kind
    forced = False
    prose = False
    if directive is not None and directive.wrong:
        simulator.wrong_counts[conversation] += 1
        count = simulator.wrong_counts[conversation]
        forced = directive.wrong_first is None or count <= directive.wrong_first
        prose = count % 2 == 1
    source = last_user_text(messages, texts)
    answers = []
    for choice in range(choices):
        draw = draw_number(conversation, seed, choice)
        answer, variant = right_answer(mode, fixed, source, seed, draw, choice)
        wrong, choice_prose = forced, prose
        if config.wrong_rate > 0:
            roll = simulator.rng.random()  # drawn for every choice, so a seed replays
            if not wrong and roll < config.wrong_rate:
                wrong, choice_prose = True, roll < config.wrong_rate / 2
        if wrong:
            answer = wrong_answer(mode, kind, answer, variant, choice_prose)
            simulator.stats["wrong"] += 1
        answers.append(answer)
    return answers
