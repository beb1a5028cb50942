"""Structured answers: a JSON Schema or a label set for the answer, and checking what came back.

This module owns the pure rules of a labeling run: how a JSON Schema is asked for (the
request's ``response_format`` and any system-prompt text), which typed columns its top-level
properties become, how an answer is parsed and validated, the message that re-asks for a
corrected answer (single-label classification, ``--labels``, is ``labels.py``'s). It does no
I/O besides reading a schema or labels file, and it does not send anything: the runner
decides when to re-ask and what to write.

Two texts here are a contract with ``pipeline/simulator/``, which recognises them to answer
in kind (a test holds the two in step):

- prompt-mode schema: a message containing :data:`SCHEMA_PROMPT_MARKER` followed by the schema
  as JSON;
- labels: a system message with a line ``Labels: a | b | c`` (``labels.LABELS_MARKER``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from .errors import ConfigError

SchemaMode = Literal["auto", "native", "prompt"]

SCHEMA_PROMPT_MARKER = "Answer with a JSON object that conforms to this JSON Schema:"

# A re-ask or a column never needs more of an answer than this to show what went wrong.
_MESSAGE_CHARS = 200
_MAX_ERRORS_SHOWN = 3
# How many "{" of a prose answer are tried as the start of the object (bounds the work).
_MAX_OBJECT_STARTS = 50


# -- the schema ----------------------------------------------------------------------------


def load_schema(path: str | Path) -> dict[str, Any]:
    """A copy of the JSON Schema at ``path``, read and checked once while the file is unchanged."""
    try:
        st = Path(path).stat()
    except OSError:
        return read_schema(path)  # which says what is wrong
    stamp = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if stamp not in _SCHEMAS:
        _SCHEMAS.clear()  # one schema at a time is the common case: keep the cache small
        _SCHEMAS[stamp] = read_schema(path)
    return copy.deepcopy(_SCHEMAS[stamp])


_SCHEMAS: dict[tuple[str, int, int], dict[str, Any]] = {}


def read_schema(path: str | Path) -> dict[str, Any]:
    """Read a JSON Schema for the answer from ``path`` (``--json-schema FILE``).

    The file holds either the schema itself or an OpenAI ``json_schema`` block
    (``{"name": ..., "schema": {...}}``), which is unwrapped. The schema must be valid for its
    draft (``$schema``, default 2020-12) and describe an object, because its top-level
    properties become output columns. Raises ConfigError naming the file otherwise.
    """
    where = f"--json-schema {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: the file does not exist.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: the file is not UTF-8 text ({exc.reason}).") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the file: {exc.strerror}.") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})."
        ) from None
    if not isinstance(schema, dict):
        raise ConfigError(
            f"{where}: the file must hold a JSON object (a JSON Schema), "
            f"not a JSON {_json_type_name(schema)}."
        )
    if isinstance(schema.get("schema"), dict) and "name" in schema:
        schema = schema["schema"]  # an OpenAI json_schema block: {"name", "schema", "strict"}
    # jsonschema is imported where it is used: a run without a schema never pays for it
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        location = _json_path(exc.absolute_path)
        raise ConfigError(
            f"{where}: not a valid JSON Schema: {shorten(exc.message)} (at {location} "
            "in the schema). Check it with any JSON Schema validator."
        ) from None
    if schema.get("type") != "object" and not isinstance(schema.get("properties"), dict):
        raise ConfigError(
            f"{where}: the schema must describe an object "
            '({"type": "object", "properties": {...}}): its top-level properties become '
            "the output columns."
        )
    return schema


# Structured Outputs (json_schema) by model name; see supports_native_schema for the rule.
_DATED = r"(-\d{4}-\d{2}-\d{2})?"
_NATIVE_FAMILIES = (
    re.compile(rf"gpt-4o-mini{_DATED}"),
    re.compile(r"gpt-4\.1(-mini|-nano)?" + _DATED),
    re.compile(r"gpt-5(\.\d+)?(-[a-z0-9-]+)?"),
)
_GPT_4O = re.compile(r"gpt-4o(?:-(\d{4}-\d{2}-\d{2}))?")
_FIRST_NATIVE_GPT_4O = "2024-08-06"
_O_SERIES = re.compile(r"o(\d+)(-[a-z0-9-]+)?")


def supports_native_schema(model: str) -> bool:
    """True when ``model`` accepts ``response_format: {"type": "json_schema", ...}``.

    The rule, by the name after any ``provider/`` prefix, case-insensitively: gpt-4o-mini,
    gpt-4o (the alias) and gpt-4o snapshots dated 2024-08-06 or later, the gpt-4.1 family
    (-mini, -nano), the gpt-5 family (gpt-5, gpt-5.1, -mini, -nano, ...), and the o-series
    reasoning models (o1, o3, o3-mini, o3-pro, o4-mini, ...) except o1-mini and o1-preview,
    which predate Structured Outputs. Everything else -- gpt-3.5-turbo, gpt-4, gpt-4-turbo,
    gpt-4o-2024-05-13, chatgpt-4o-latest, audio/realtime/search variants, other vendors'
    models -- is False, so ``auto`` falls back to JSON mode with the schema in the prompt,
    which works wherever JSON mode does.
    """
    name = model.rsplit("/", 1)[-1].strip().lower()
    if any(family.fullmatch(name) for family in _NATIVE_FAMILIES):
        return True
    gpt_4o = _GPT_4O.fullmatch(name)
    if gpt_4o is not None:
        return gpt_4o.group(1) is None or gpt_4o.group(1) >= _FIRST_NATIVE_GPT_4O
    o_series = _O_SERIES.fullmatch(name)
    if o_series is not None:
        variant = o_series.group(2) or ""
        return not (o_series.group(1) == "1" and variant.startswith(("-mini", "-preview")))
    return False


@dataclass(frozen=True, slots=True)
class SchemaPlan:
    """How a schema-constrained answer is asked for.

    Fields:
        mode: ``"native"`` (json_schema Structured Outputs) or ``"prompt"`` (JSON mode with
            the schema stated in the system prompt).
        response_format: the request body's ``response_format`` value.
        system_prompt: text to add to the system prompt (see ``prompts.add_system_text``), or
            None. In prompt mode it carries the word JSON, which OpenAI requires in some
            message whenever ``response_format`` is ``json_object``.
    """

    mode: Literal["native", "prompt"]
    response_format: dict[str, Any]
    system_prompt: str | None = None


def plan_schema_request(
    schema: dict[str, Any], model: str, mode: SchemaMode = "auto", *, name: str = "answer"
) -> SchemaPlan:
    """The request shape for ``schema`` on ``model`` (``--schema-mode auto|native|prompt``).

    ``auto`` picks native when :func:`supports_native_schema` says so, else prompt. Native
    sends ``strict: true`` only when the schema meets OpenAI's strict-mode rules (every
    object lists all its properties in ``required`` and sets ``additionalProperties:
    false``); a strict request with any other schema is refused with a 400, while a
    non-strict one still steers the model and the answer is validated here anyway.
    """
    if mode not in ("auto", "native", "prompt"):
        raise ConfigError(f"--schema-mode {mode!r} is not a mode. Use auto, native or prompt.")
    native = mode == "native" or (mode == "auto" and supports_native_schema(model))
    if native:
        block = {
            "name": re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "answer",
            "schema": schema,
            "strict": is_strict_schema(schema),
        }
        return SchemaPlan("native", {"type": "json_schema", "json_schema": block})
    text = (
        f"{SCHEMA_PROMPT_MARKER}\n{json.dumps(schema, ensure_ascii=False)}\n"
        "Reply with the JSON object only: no prose and no code fences."
    )
    return SchemaPlan("prompt", {"type": "json_object"}, text)


def is_strict_schema(schema: Any) -> bool:
    """True when every object in ``schema`` requires all its properties and allows no others."""
    if not isinstance(schema, dict):
        return True
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            return False
        if set(schema.get("required", [])) != set(properties or {}):
            return False
    return all(is_strict_schema(child) for child in _subschemas(schema))


def _subschemas(schema: dict[str, Any]) -> list[Any]:
    """The schemas nested directly in ``schema`` (by keyword, so ``const``/``default`` values
    that happen to be objects are not mistaken for schemas)."""
    children: list[Any] = []
    for keyword in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(keyword), dict):
            children.extend(schema[keyword].values())
    for keyword in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(keyword), list):
            children.extend(schema[keyword])
    for keyword in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(schema.get(keyword), dict):
            children.append(schema[keyword])
    return children


# -- typed columns -------------------------------------------------------------------------

_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
    "array": pa.string(),
    "object": pa.string(),
}


def _json_types(schema: Any) -> set[str]:
    """The JSON types a (sub)schema allows, as far as its type/enum/const/anyOf/oneOf say."""
    if not isinstance(schema, dict):
        return set()
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {item for item in declared if isinstance(item, str)}
    values = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if values is None and "const" in schema:
        values = [schema["const"]]
    if values is not None:
        return {_json_type_name(value) for value in values}
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list):
        return set().union(*(_json_types(branch) for branch in branches))
    return set()


def _column_type(schema: Any) -> pa.DataType:
    types = _json_types(schema) - {"null"}
    if types == {"integer", "number"}:
        return pa.float64()
    if len(types) == 1:
        return _ARROW_TYPES.get(types.pop(), pa.string())
    return pa.string()


def schema_columns(
    schema: dict[str, Any], prefix: str = "", *, taken: Collection[str] = ()
) -> list[tuple[str, pa.DataType]]:
    """The output columns of ``schema``'s top-level properties, in the schema's order.

    Column name: ``prefix + property``. Type, from the property's ``type`` (or ``enum`` /
    ``const`` values, or its ``anyOf``/``oneOf`` branches): string -> string, integer ->
    int64, number -> float64, boolean -> bool; array and object -> string holding the value
    as JSON; an enum of strings -> string. ``null`` is dropped from a union (every column
    is nullable), so ``["integer", "null"]`` is int64; integer + number is float64; any
    other mix, or no type at all (e.g. a ``$ref``), is a string column holding strings as
    they are and other values as JSON. ConfigError when a column name is in ``taken``.
    """
    properties = schema.get("properties") or {}
    columns: list[tuple[str, pa.DataType]] = []
    for name, subschema in properties.items():
        column = prefix + name
        if column in taken:
            raise ConfigError(
                f"The schema's property {name!r} would become the column {column!r}, which "
                "the output already has. Set a column prefix for the schema's columns."
            )
        columns.append((column, _column_type(subschema)))
    return columns


def _column_value(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_int64(arrow_type):
        return int(value)
    if pa.types.is_float64(arrow_type):
        return float(value)
    if pa.types.is_boolean(arrow_type):
        return bool(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# -- parsing and validating an answer ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedAnswer:
    """What an answer turned out to be.

    Fields:
        ok: the answer parsed and validated (or matched a label).
        values: top-level property -> value (a missing property is None); for labels
            ``{"label": label}``. Every value is None when ``ok`` is False, so a typed
            column never receives a value of the wrong type.
        error: a short message a model can act on (what is wrong and where), or None.
        truncated: the answer failed because it was cut at the token limit
            (``finish_reason`` "length"); re-asking with the same limit usually fails again.
    """

    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    truncated: bool = False


# Validators are built once per schema object: parse_answer runs once per row.
_validators: dict[int, tuple[dict[str, Any], Any]] = {}
_MAX_CACHED_VALIDATORS = 16


def _validator(schema: dict[str, Any]) -> Any:
    cached = _validators.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    if len(_validators) >= _MAX_CACHED_VALIDATORS:
        _validators.clear()
    _validators[id(schema)] = (schema, validator)
    return validator


def extract_json_object(text: str) -> tuple[Any, str | None]:
    """The JSON value of an answer, tolerating code fences and surrounding prose.

    Returns ``(value, None)`` when the whole answer is JSON (of any type) or contains a
    JSON object (the first ``{...}`` that decodes), else ``(None, error)`` with the parse
    error and its position.
    """
    stripped = text.strip()
    try:
        return json.loads(stripped), None
    except json.JSONDecodeError as exc:
        first_error = exc
    decoder = json.JSONDecoder()
    start = stripped.find("{")
    tries = 0
    while start >= 0 and tries < _MAX_OBJECT_STARTS:
        try:
            value, _ = decoder.raw_decode(stripped, start)
        except json.JSONDecodeError as exc:
            if tries == 0:
                first_error = exc
        else:
            if isinstance(value, dict):
                return value, None
        tries += 1
        start = stripped.find("{", start + 1)
    return None, (
        f"The answer is not valid JSON: {first_error.msg} at line {first_error.lineno} "
        f"column {first_error.colno}."
    )


def parse_answer(
    text: str | None, schema: dict[str, Any], *, finish_reason: str | None = None
) -> ParsedAnswer:
    """Parse ``text`` as a JSON object and validate it against ``schema``.

    The object may be wrapped in ```json fences or prose (see :func:`extract_json_object`).
    ``finish_reason="length"`` turns a failure into a ``truncated`` one whose message says
    the answer was cut off.
    """
    properties = list((schema.get("properties") or {}).keys())
    empty = dict.fromkeys(properties)

    def failed(error: str) -> ParsedAnswer:
        if finish_reason == "length":
            error = (
                "The answer was cut off at the token limit (finish_reason length) before it "
                f"was complete. {error}"
            )
            return ParsedAnswer(False, empty, error, truncated=True)
        return ParsedAnswer(False, empty, error)

    if text is None or not text.strip():
        return failed("The answer is empty; expected a JSON object.")
    value, error = extract_json_object(text)
    if error is not None:
        return failed(error)
    if not isinstance(value, dict):
        return failed(
            f"The answer is a JSON {_json_type_name(value)}, not an object; "
            "answer with one JSON object."
        )
    from jsonschema.exceptions import relevance

    errors = sorted(_validator(schema).iter_errors(value), key=relevance, reverse=True)
    if errors:
        shown = "; ".join(
            f"at {_json_path(e.absolute_path)}: {shorten(e.message)}"
            for e in errors[:_MAX_ERRORS_SHOWN]
        )
        more = len(errors) - _MAX_ERRORS_SHOWN
        extra = f" (and {more} more)" if more > 0 else ""
        return failed(f"The JSON does not match the schema: {shown}{extra}.")
    return ParsedAnswer(True, {name: value.get(name) for name in properties})


def answer_columns(
    parsed: ParsedAnswer, schema: dict[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """``parsed``'s values as ``{column: value}`` fitting :func:`schema_columns`' types.

    Objects and arrays become JSON text; all None when the answer is not ok.
    """
    result: dict[str, Any] = {}
    for name, arrow_type in schema_columns(schema):
        value = parsed.values.get(name) if parsed.ok else None
        result[prefix + name] = _column_value(value, arrow_type)
    return result


def reask_messages(
    messages: Sequence[dict[str, Any]], answer_text: str | None, error: str
) -> list[dict[str, Any]]:
    """The messages of a re-ask: the original ones, the answer, and the error fed back.

    Pass the original messages each time (not the previous re-ask's), so a row's requests
    stay the size of one exchange however many re-asks it takes.
    """
    feedback = (
        f"Your previous answer could not be used. {error}\n"
        "Answer again with only the corrected answer, nothing else."
    )
    return [
        *(dict(message) for message in messages),
        {"role": "assistant", "content": answer_text or ""},
        {"role": "user", "content": feedback},
    ]


# -- small helpers ---------------------------------------------------------------------------


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _json_path(parts: Any) -> str:
    """``$``, ``$.a.b``, ``$.items[0]``: where in a document an error is."""
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def shorten(text: str, limit: int = _MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "SCHEMA_PROMPT_MARKER",
    "ParsedAnswer",
    "SchemaMode",
    "SchemaPlan",
    "answer_columns",
    "extract_json_object",
    "is_strict_schema",
    "load_schema",
    "parse_answer",
    "plan_schema_request",
    "reask_messages",
    "schema_columns",
    "shorten",
    "supports_native_schema",
]
