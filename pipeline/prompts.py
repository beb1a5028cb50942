"""Row -> chat ``messages``: from a prompt column, a ``{column}`` template, or a messages column.

Owns the prompt source and its validation against the input's columns (done once, before
any request). A null or empty prompt makes the row *skipped*; a messages cell that is not a
list of ``{role, content}`` makes it *invalid*. It never sends anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .errors import InputError
from .records import Message, PromptRow

ROLES = {"system", "developer", "user", "assistant", "tool"}
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True, slots=True)
class Template:
    """A prompt template with ``{column}`` placeholders; ``{{`` and ``}}`` are literal braces."""

    text: str
    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, literal text or column name)

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[tuple[bool, str]] = []
        pos = 0
        for match in _TOKEN.finditer(text):
            if match.start() > pos:
                parts.append((False, text[pos : match.start()]))
            token = match.group(0)
            if token in ("{{", "}}"):
                parts.append((False, token[0]))
            elif token in ("{", "}"):
                raise InputError(
                    f"--template: unmatched '{token}' at character {match.start() + 1}. "
                    "Write {{ or }} for a literal brace."
                )
            else:
                name = match.group(1)
                if not name.strip():
                    raise InputError(
                        f"--template: empty placeholder '{{}}' at character {match.start() + 1}. "
                        "Name a column, like {text}."
                    )
                parts.append((True, name))
            pos = match.end()
        if pos < len(text):
            parts.append((False, text[pos:]))
        return cls(text=text, parts=tuple(parts))

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for is_field, value in self.parts:
            if is_field:
                seen[value] = None
        return list(seen)

    def render(self, row: dict[str, Any]) -> str:
        return "".join(_as_text(row[v]) if is_field else v for is_field, v in self.parts)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _missing_column(name: str, option: str, columns: Sequence[str], source: str) -> InputError:
    return InputError(
        f"{source} has no column '{name}' (columns: {', '.join(columns)}). "
        f"Fix {option}, or use another prompt source (--prompt-column, --template, "
        "--messages-column)."
    )


class PromptBuilder:
    """Turns record batches into ``PromptRow``s for one prompt source."""

    def __init__(
        self,
        kind: str,
        value: str,
        *,
        system: str | None,
        columns: Sequence[str],
        source_name: str,
    ) -> None:
        self.kind = kind
        self.system = system
        self.template: Template | None = None
        if kind == "template":
            self.template = Template.parse(value)
            missing = [c for c in self.template.columns if c not in columns]
            if missing:
                raise InputError(
                    f"--template uses {', '.join('{' + m + '}' for m in missing)} but "
                    f"{source_name} has no such column (columns: {', '.join(columns)}). "
                    "Fix the placeholder names; write {{ or }} for a literal brace."
                )
            self.columns = self.template.columns
        else:
            option = "--prompt-column" if kind == "column" else "--messages-column"
            if value not in columns:
                raise _missing_column(value, option, columns, source_name)
            self.columns = [value]
        self.value = value

    def build(self, batch: pa.RecordBatch, keys: Any, indices: Any) -> list[PromptRow]:
        """One PromptRow per row of ``batch`` (which holds at least ``self.columns``).

        ``keys`` and ``indices`` give each row's key and its position in the input.
        """
        data = {name: batch.column(name).to_pylist() for name in self.columns}
        rows: list[PromptRow] = []
        for i in range(batch.num_rows):
            key, index = int(keys[i]), int(indices[i])
            if self.kind == "column":
                rows.append(self._from_text(key, index, data[self.value][i], self.value))
            elif self.kind == "template":
                rows.append(self._from_template(key, index, {c: data[c][i] for c in self.columns}))
            else:
                rows.append(self._from_messages(key, index, data[self.value][i]))
        return rows

    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.system:
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def _from_text(self, key: int, index: int, value: Any, column: str) -> PromptRow:
        if value is None:
            return PromptRow(key, index, skip_reason=f"column '{column}' is null")
        text = _as_text(value)
        if not text.strip():
            return PromptRow(key, index, skip_reason=f"column '{column}' is empty")
        return PromptRow(
            key, index, messages=self._with_system([{"role": "user", "content": text}])
        )

    def _from_template(self, key: int, index: int, row: dict[str, Any]) -> PromptRow:
        assert self.template is not None
        # A placeholder with nothing in it would send a prompt about nothing: skip the row.
        empty = [
            c
            for c in self.template.columns
            if row[c] is None or (isinstance(row[c], str) and not row[c].strip())
        ]
        if empty:
            return PromptRow(
                key, index, skip_reason=f"template column(s) {', '.join(empty)} empty or null"
            )
        text = self.template.render(row)
        return PromptRow(
            key, index, messages=self._with_system([{"role": "user", "content": text}])
        )

    def _from_messages(self, key: int, index: int, value: Any) -> PromptRow:
        column = self.value
        if value is None or (isinstance(value, str) and not value.strip()):
            return PromptRow(key, index, skip_reason=f"column '{column}' is empty")
        parsed = value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                return PromptRow(
                    key,
                    index,
                    invalid_reason=f"column '{column}' is not valid JSON ({exc.msg} at "
                    f"character {exc.pos + 1}); expected a list of {{role, content}} objects",
                )
        problem = _check_messages(parsed)
        if problem:
            return PromptRow(key, index, invalid_reason=f"column '{column}': {problem}")
        if not parsed:
            return PromptRow(key, index, skip_reason=f"column '{column}' is an empty list")
        return PromptRow(key, index, messages=self._with_system(list(parsed)))


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"expected a JSON list of {{role, content}} objects, got {type(value).__name__}"
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            return f"message {i} is a {type(msg).__name__}, not an object"
        role = msg.get("role")
        if role not in ROLES:
            return f"message {i} has role {role!r}; use one of {', '.join(sorted(ROLES))}"
        if "content" not in msg and role != "assistant":
            return f"message {i} ({role}) has no 'content'"
    return None


def add_system_text(messages: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``messages`` with ``text`` appended to the first system (or developer) message.

    When there is no such message with string content, a system message is put first.
    The input list and its messages are not changed.
    """
    result = [dict(message) for message in messages]
    for message in result:
        if message.get("role") in ("system", "developer") and isinstance(
            message.get("content"), str
        ):
            message["content"] = f"{message['content'].rstrip()}\n\n{text}".lstrip()
            return result
    return [{"role": "system", "content": text}, *result]
