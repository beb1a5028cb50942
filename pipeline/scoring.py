"""Scoring answers against an expected column, and the per-model summary of an evaluation run.

This module owns ``--score exact|contains|regex|json-field=PATH`` (one function per spec,
from answer text and expected value to a score in [0, 1] or None when there is nothing to
score) and :func:`summarize_scores`, which folds result rows into one
:class:`ModelSummary` per model: counts, mean score, tokens, cost and latency percentiles.
It reads plain mappings, so the runner can use it without pandas; ``pipeline/report.py``
feeds it the rows of an OUTPUT file. It neither reads nor writes files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from .errors import ConfigError
from .structured import extract_json_object

Scorer = Callable[[str | None, Any], float | None]

# The result-row keys summarize_scores reads besides status, tokens and latency_ms.
# "cost_usd" is the output's cost column; a row without a cost counts as unknown, not 0.
MODEL_KEY = "model"
SCORE_KEY = "score"
COST_KEY = "cost_usd"
# The label of rows that name no model (a single-model output without a model column).
ALL_ROWS = "(all)"
# Statuses whose rows got an answer from the model; their latency is the model's latency.
ANSWERED = ("ok", "invalid")

SCORER_HELP = "exact, contains, regex or json-field=PATH (for example json-field=answer.city)"


def make_scorer(spec: str) -> Scorer:
    """The scorer for ``--score SPEC``; ConfigError for an unknown spec.

    Every scorer returns None (not scored) when the answer or the expected value is missing
    (None or NaN), else 1.0 or 0.0. Text is compared normalised: stripped, case-folded, runs
    of whitespace as one space; a whole-number float expected value (``4.0``, as pandas reads
    an integer column with gaps) reads as ``4``.

    - ``exact``: the normalised answer equals the normalised expected value.
    - ``contains``: the normalised expected value occurs in the normalised answer.
    - ``regex``: the expected value is a Python regular expression *searched* for in the raw
      answer (anchor it with ``^...$`` for a full match; ``(?i)`` for case-insensitive).
      A pattern that does not compile scores None, not 0: it is the data's fault, not the
      model's.
    - ``json-field=PATH``: the answer is parsed as a JSON object (fences and prose around it
      tolerated) and PATH (``a.b.0.c``: keys, and list indexes where the value is a list) is
      looked up; the field equals the expected value as JSON values (``4`` == ``4.0`` ==
      ``"4"``, ``true`` == ``"true"``) or as normalised text. An answer that is not JSON
      or lacks the field scores 0.0.
    """
    name, sep, argument = spec.strip().partition("=")
    name = name.strip()
    if name == "json-field":
        path = argument.strip()
        if not sep or not path or any(not part for part in path.split(".")):
            raise ConfigError(
                f"--score {spec!r}: json-field needs a PATH of dot-separated keys, "
                "for example json-field=answer.city or json-field=items.0.name."
            )
        return _json_field_scorer(path.split("."))
    scorers: dict[str, Scorer] = {"exact": _exact, "contains": _contains, "regex": _regex}
    if sep or name not in scorers:
        raise ConfigError(f"--score {spec!r} is not a scorer. Use {SCORER_HELP}.")
    return scorers[name]


def _missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT: no value (a list or array, even empty, is a value)."""
    if value is None:
        return True
    if isinstance(value, str | list | dict | tuple) or getattr(value, "ndim", 0) > 0:
        return False
    try:
        return bool(value != value)  # NaN and NaT are not equal to themselves
    except (TypeError, ValueError):
        return True  # pd.NA refuses to be a bool


def _text(value: Any) -> str:
    """An expected value as text: whole-number floats without ``.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def normalize_text(text: str) -> str:
    """Stripped, case-folded, whitespace runs as one space."""
    return " ".join(text.casefold().split())


def _score(hit: bool) -> float:
    return 1.0 if hit else 0.0


def _exact(answer: str | None, expected: Any) -> float | None:
    if answer is None or _missing(expected):
        return None
    return _score(normalize_text(answer) == normalize_text(_text(expected)))


def _contains(answer: str | None, expected: Any) -> float | None:
    if answer is None or _missing(expected):
        return None
    return _score(normalize_text(_text(expected)) in normalize_text(answer))


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _regex(answer: str | None, expected: Any) -> float | None:
    if answer is None or _missing(expected):
        return None
    pattern = _compile(_text(expected))
    if pattern is None:
        return None
    return _score(pattern.search(answer) is not None)


_NOT_FOUND = object()


def _lookup(value: Any, path: Sequence[str]) -> Any:
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", part):
            index = int(part)
            if not -len(value) <= index < len(value):
                return _NOT_FOUND
            value = value[index]
        else:
            return _NOT_FOUND
    return value


def _as_json(value: Any) -> Any:
    """An expected value as a JSON value: strings that parse as JSON are parsed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return _NOT_FOUND
    if hasattr(value, "tolist"):  # numpy scalars and arrays read from Parquet
        return value.tolist()
    return value


def _same_value(found: Any, expected: Any) -> bool:
    if isinstance(found, str):
        return normalize_text(found) == normalize_text(_text(expected))
    wanted = _as_json(expected)
    if isinstance(found, bool) or isinstance(wanted, bool):
        return found is wanted
    if isinstance(found, int | float) and isinstance(wanted, int | float):
        return float(found) == float(wanted)
    return bool(found == wanted)


def _json_field_scorer(path: list[str]) -> Scorer:
    def score(answer: str | None, expected: Any) -> float | None:
        if answer is None or _missing(expected):
            return None
        document, error = extract_json_object(answer)
        if error is not None:
            return 0.0
        found = _lookup(document, path)
        if found is _NOT_FOUND:
            return 0.0
        return _score(_same_value(found, expected))

    return score


# -- the per-model summary -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One model's results in an evaluation run.

    Fields:
        model: the model name (:data:`ALL_ROWS` for rows that name none).
        rows: result rows (one per input row, or per sample with ``--samples long``).
        ok, invalid, error: rows with that status; ``other`` counts the rest (skipped, pending).
        scored: scores counted in ``mean_score`` (a list-valued score counts each element).
        mean_score: mean of those scores, or None when none was scored.
        prompt_tokens, completion_tokens: sums (missing counts as 0).
        cost_usd: sum of the known ``cost_usd``, or None when no row has one.
        latency_p50_ms, latency_p90_ms, latency_p99_ms: percentiles (linear interpolation
            between closest ranks, as numpy's default) of ``latency_ms`` over answered rows
            (ok and invalid), or None when there are none.
    """

    model: str
    rows: int = 0
    ok: int = 0
    invalid: int = 0
    error: int = 0
    other: int = 0
    scored: int = 0
    mean_score: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None

    @property
    def invalid_rate(self) -> float | None:
        """Share of answered rows whose answer did not parse or validate, or None."""
        answered = self.ok + self.invalid
        return self.invalid / answered if answered else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view, ``invalid_rate`` included."""
        return {**asdict(self), "invalid_rate": self.invalid_rate}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _scores(value: Any) -> list[float]:
    """A row's score(s): a number, None/NaN, or a list or array of them (``--samples list``)."""
    if getattr(value, "ndim", 0):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [number for item in value if (number := _number(item)) is not None]
    number = _number(value)
    return [] if number is None else [number]


@dataclass(slots=True)
class _Tally:
    rows: int = 0
    ok: int = 0
    invalid: int = 0
    error: int = 0
    other: int = 0
    score_sum: float = 0.0
    scored: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    latencies: list[float] | None = None

    def add(self, record: Mapping[str, Any]) -> None:
        self.rows += 1
        status = record.get("status")
        if status == "ok":
            self.ok += 1
        elif status == "invalid":
            self.invalid += 1
        elif status == "error":
            self.error += 1
        else:
            self.other += 1
        for score in _scores(record.get(SCORE_KEY)):
            self.score_sum += score
            self.scored += 1
        self.prompt_tokens += int(_number(record.get("prompt_tokens")) or 0)
        self.completion_tokens += int(_number(record.get("completion_tokens")) or 0)
        cost = _number(record.get(COST_KEY))
        if cost is not None:
            self.cost = (self.cost or 0.0) + cost
        latency = _number(record.get("latency_ms"))
        if latency is not None and status in ANSWERED:
            if self.latencies is None:
                self.latencies = []
            self.latencies.append(latency)

    def summary(self, model: str) -> ModelSummary:
        latencies = self.latencies or []
        return ModelSummary(
            model=model,
            rows=self.rows,
            ok=self.ok,
            invalid=self.invalid,
            error=self.error,
            other=self.other,
            scored=self.scored,
            mean_score=self.score_sum / self.scored if self.scored else None,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost,
            latency_p50_ms=percentile(latencies, 50),
            latency_p90_ms=percentile(latencies, 90),
            latency_p99_ms=percentile(latencies, 99),
        )


def summarize_scores(records: Iterable[Mapping[str, Any]]) -> list[ModelSummary]:
    """One :class:`ModelSummary` per model, in the order models first appear.

    Each record is a result row as a mapping with the keys ``model``, ``status``, ``score``,
    ``prompt_tokens``, ``completion_tokens``, ``cost_usd`` and ``latency_ms``; any may be
    missing, None or NaN. A record without a model counts under :data:`ALL_ROWS`.
    """
    tallies: dict[str, _Tally] = {}
    for record in records:
        model = record.get(MODEL_KEY)
        name = ALL_ROWS if _missing(model) else str(model)
        tally = tallies.get(name)
        if tally is None:
            tally = tallies[name] = _Tally()
        tally.add(record)
    return [tally.summary(model) for model, tally in tallies.items()]


__all__ = [
    "ALL_ROWS",
    "ModelSummary",
    "Scorer",
    "make_scorer",
    "normalize_text",
    "percentile",
    "summarize_scores",
]
