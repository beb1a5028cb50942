"""Single-label classification (``--labels``): the label set, the instruction that asks for
one label, and reading the label out of an answer (exact, normalised, "Label: x", or the one
label mentioned). Pure rules; it reads only a labels file.

The instruction ends in a line ``Labels: a | b | c`` (:data:`LABELS_MARKER`): a contract with
the simulator, which answers with one of them (a test holds the two in step).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError
from .structured import ParsedAnswer, shorten

LABELS_MARKER = "Labels:"
LABEL_SEPARATOR = " | "
_SNIPPET_CHARS = 80

# -- labels --------------------------------------------------------------------------------

# Stripped from both ends of an answer and a label before comparing: whitespace, ASCII
# punctuation (incl. quotes, markdown * and _, brackets) and typographic quotes.
_SURROUNDING = string.whitespace + string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb"
# "Label: positive" and the like: one of these words, a colon or equals sign, the label.
_LABEL_LEAD = re.compile(
    r"(?:the\s+)?(?:label|answer|category|class|classification|sentiment)\s*[:=]\s*(.+)",
    re.IGNORECASE | re.DOTALL,
)


def normalize_label(text: str) -> str:
    """Case-folded, NFKC, inner whitespace collapsed, surrounding space/punctuation stripped."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split()).strip(_SURROUNDING)


def load_labels(value: str) -> list[str]:
    """``--labels``: ``"a,b,c"``, or ``"@FILE"`` with one label per line (blank lines ignored).

    ConfigError on an empty label, fewer than two labels, labels equal after normalisation
    (case, surrounding punctuation), or a label containing ``|`` (the separator of the
    instruction's label line).
    """
    where = f"--labels {value!r}"
    if value.startswith("@"):
        path = Path(value[1:])
        where = f"--labels {value}"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"{where}: the file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read {path} as UTF-8 text ({exc}).") from None
        labels = [line.strip() for line in lines if line.strip()]
    else:
        labels = [item.strip() for item in value.split(",")]
        for number, label in enumerate(labels, 1):
            if not label:
                raise ConfigError(
                    f"{where}: label {number} is empty. Separate labels with single commas, "
                    "or use @FILE with one label per line."
                )
    if len(labels) < 2:
        raise ConfigError(f"{where}: a classification needs at least two labels.")
    seen: dict[str, str] = {}
    for label in labels:
        if "|" in label:
            raise ConfigError(f"{where}: the label {label!r} contains '|', which is reserved.")
        key = normalize_label(label)
        if not key:
            raise ConfigError(f"{where}: the label {label!r} has no letters or digits.")
        if key in seen:
            raise ConfigError(
                f"{where}: the labels {seen[key]!r} and {label!r} are the same once case and "
                "surrounding punctuation are ignored, so answers could not tell them apart."
            )
        seen[key] = label
    return labels


def label_instruction(labels: Sequence[str]) -> str:
    """Text to add to the system prompt of a classification run (ends in the labels line)."""
    return (
        "Classify the input into exactly one of the labels below. Answer with the label "
        "only: no explanation and no other text.\n"
        f"{LABELS_MARKER} {LABEL_SEPARATOR.join(labels)}"
    )


def match_label(text: str | None, labels: Sequence[str]) -> str | None:
    """The label ``text`` answers, or None.

    The answer must equal one label after :func:`normalize_label` (so ``" Positive."``,
    ``'"positive"'`` and ``"**POSITIVE**"`` all give ``"positive"``), optionally after a lead
    such as ``"Label:"``, ``"Answer:"``, ``"Category:"``, ``"Class:"`` or ``"Sentiment:"``.
    A sentence that merely mentions a label ("The answer is positive", "not positive") is
    no match: guessing there would misread negations and answers naming two labels.
    """
    if text is None:
        return None
    by_key = {normalize_label(label): label for label in labels}
    found = by_key.get(normalize_label(text))
    if found is not None:
        return found
    lead = _LABEL_LEAD.fullmatch(text.strip())
    if lead is not None:
        return by_key.get(normalize_label(lead.group(1)))
    return None


def parse_label(
    text: str | None, labels: Sequence[str], *, finish_reason: str | None = None
) -> ParsedAnswer:
    """:func:`match_label` as a :class:`ParsedAnswer` (values ``{"label": ...}``) with an error
    a model can act on: the labels to choose from, and which ones it named if several."""
    label = match_label(text, labels)
    if label is not None:
        return ParsedAnswer(True, {"label": label})
    listed = ", ".join(labels)
    if text is None or not text.strip():
        error = f"The answer is empty. Answer with exactly one of these labels: {listed}."
    else:
        named = [label for label in labels if _mentions(text, label)]
        snippet = shorten(text.strip(), _SNIPPET_CHARS)
        if len(named) > 1:
            error = (
                f"The answer {snippet!r} names more than one label ({', '.join(named)}). "
                f"Answer with exactly one of: {listed}."
            )
        else:
            error = (
                f"The answer {snippet!r} is not one of the labels. Answer with exactly one "
                f"of: {listed}."
            )
    if finish_reason == "length":
        error = f"The answer was cut off at the token limit (finish_reason length). {error}"
        return ParsedAnswer(False, {"label": None}, error, truncated=True)
    return ParsedAnswer(False, {"label": None}, error)


def _mentions(text: str, label: str) -> bool:
    key = re.escape(normalize_label(label))
    return re.search(rf"(?<!\w){key}(?!\w)", normalize_label(text)) is not None
