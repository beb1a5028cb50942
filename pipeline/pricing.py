"""Model prices and the cost of a request: the price table, and the spend a server reports.

Owns ``configs/prices.toml`` (USD per million tokens per model), a user's file that extends or
overrides it, the rule that finds a model's price, and the arithmetic of one row's cost. It
reads no input data and sends nothing; budgets and cost columns are the runner's business.

How a model id finds its price (ids and aliases compare case-insensitively):

1. the entry whose id, or one of whose ``aliases``, is the model id;
2. otherwise, when the id ends in a date (``-YYYY-MM-DD`` or ``-MMDD``), the entry for the
   id without it, but only if that entry says ``dated_snapshots = true`` (the table's
   author vouches that unlisted snapshots cost the same as the family).

Nothing else is guessed: an id that matches nothing has no price and no cost.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .records import (  # cost_source values, defined in records
    COST_BATCH,
    COST_BATCH_TABLE,
    COST_REPORTED,
    COST_TABLE,
    Cost,
)

# packaged with the code (configs/prices.toml at the top of the repository is the same file,
# kept as the user-facing example; tests/test_packaging.py checks they are equal)
DEFAULT_PRICES_PATH = Path(__file__).resolve().parent / "data" / "prices.toml"
PER_TOKENS = 1_000_000  # prices are USD per this many tokens


USD_SPENT_HEADER = "x-aimlapi-usd-spent"

_FIELDS = (
    "input",
    "output",
    "cached_input",
    "batch_input",
    "batch_output",
    "source",
    "date",
    "aliases",
    "dated_snapshots",
)
# batch mode's price as a share of the online price, for a model whose entry has no batch
# prices (the Batch APIs of OpenAI, Anthropic, Groq and Together all bill about half)
BATCH_PRICE_FACTOR = 0.5
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True, slots=True)
class Price:
    """One model's price.

    ``input``, ``output`` and ``cached_input`` are USD per million tokens; ``cached_input``
    is None when the table gives no separate rate (cached tokens then cost ``input``).
    ``source`` says where the figure comes from and ``date`` when it was recorded.
    """

    input: float
    output: float
    cached_input: float | None
    source: str
    date: str
    batch_input: float | None = None  # USD per 1M tokens through a Batch API
    batch_output: float | None = None

    def batch(self, share: float | None = None) -> tuple[Price, str]:
        """The price a Batch API bills, and the cost source that says which: the entry's
        own batch prices, else the provider's ``share`` of these (``PriceTable.batch_share``;
        both ``batch_table``), else ``BATCH_PRICE_FACTOR`` of these (``batch``)."""
        if self.batch_input is not None and self.batch_output is not None:
            return (
                Price(self.batch_input, self.batch_output, None, self.source, self.date),
                COST_BATCH_TABLE,
            )
        factor = BATCH_PRICE_FACTOR if share is None else share
        cached = None if self.cached_input is None else self.cached_input * factor
        return (
            Price(self.input * factor, self.output * factor, cached, self.source, self.date),
            COST_BATCH if share is None else COST_BATCH_TABLE,
        )

    def cost(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
    ) -> float:
        """USD for these token counts; ``cached_tokens`` are part of ``prompt_tokens``."""
        cached = min(max(cached_tokens or 0, 0), prompt_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (
            (prompt_tokens - cached) * self.input
            + cached * cached_rate
            + completion_tokens * self.output
        ) / PER_TOKENS


@dataclass(frozen=True, slots=True)
class _Entry:
    model: str
    price: Price
    aliases: tuple[str, ...]
    dated_snapshots: bool


class PriceTable:
    """Prices by model id; ``load`` reads the default table and an optional user file.

    ``notes`` holds remarks a caller should show (for example a missing default table).
    """

    def __init__(
        self,
        entries: Mapping[str, _Entry] | None = None,
        notes: tuple[str, ...] = (),
        batch_shares: Mapping[str, float] | None = None,
    ):
        # keyed by casefolded model id
        self._entries: dict[str, _Entry] = dict(entries or {})
        self.notes = notes
        self.batch_shares = dict(batch_shares or {})  # provider host -> batch price share
        self._index: dict[str, _Entry] = {}
        for entry in self._entries.values():  # aliases first, so that ids beat aliases
            for alias in entry.aliases:
                self._index[alias.casefold()] = entry
        for folded, entry in self._entries.items():
            self._index[folded] = entry

    @classmethod
    def load(cls, extra: str | Path | None = None) -> PriceTable:
        """The packaged ``configs/prices.toml``, then ``extra`` (a user file) over it."""
        notes: list[str] = []
        entries: dict[str, _Entry] = {}
        shares: dict[str, float] = {}
        if DEFAULT_PRICES_PATH.is_file():
            entries.update(read_price_file(DEFAULT_PRICES_PATH, require_source=True))
            shares = read_batch_shares(DEFAULT_PRICES_PATH, require_source=True)
        else:
            notes.append(
                f"No default price table at {DEFAULT_PRICES_PATH}; only prices from "
                "--prices FILE are known."
            )
        if extra is not None:
            user = read_price_file(Path(extra), require_source=False)
            # Every name the user file claims (id or alias) is taken from the defaults: a
            # default entry of that id goes, a default alias of that name is dropped.
            taken = {n.casefold() for e in user.values() for n in (e.model, *e.aliases)}
            merged: dict[str, _Entry] = {}
            for folded, entry in entries.items():
                if folded in taken:
                    continue
                kept = tuple(a for a in entry.aliases if a.casefold() not in taken)
                merged[folded] = _Entry(entry.model, entry.price, kept, entry.dated_snapshots)
            entries = {**merged, **user}
            shares |= read_batch_shares(Path(extra), require_source=False)
        return cls(entries, tuple(notes), shares)

    def batch_share(self, base_url: str) -> float | None:
        """The batch price share of the provider at ``base_url`` (``[batch."HOST"]``; a
        host matches its subdomains too), or None when the table gives none."""
        host = (urlsplit(base_url).hostname or base_url).lower()
        for known, share in self.batch_shares.items():
            if host == known or host.endswith("." + known):
                return share
        return None

    @property
    def models(self) -> list[str]:
        """The model ids with an entry (aliases not included), sorted."""
        return sorted((e.model for e in self._entries.values()), key=str.casefold)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.models)

    def resolve(self, model: str) -> tuple[str, Price] | None:
        """(the table's id that prices ``model``, its price), or None when none does."""
        folded = model.strip().casefold()
        entry = self._index.get(folded)
        if entry is None:
            family = _DATE_SUFFIX.sub("", folded)
            if family != folded:
                candidate = self._index.get(family)
                if candidate is not None and candidate.dated_snapshots:
                    entry = candidate
        return None if entry is None else (entry.model, entry.price)

    def price(self, model: str) -> Price | None:
        """The price of ``model`` by the rule in the module docstring, or None."""
        found = self.resolve(model)
        return None if found is None else found[1]

    def cost(
        self,
        model: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
    ) -> float | None:
        """USD for one request, or None when the model has no price or a count is unknown.

        Cached tokens are part of ``prompt_tokens`` and cost ``cached_input`` when the table
        has it, else ``input``. Negative counts (a confused server) give None, not a cost.
        """
        price = self.price(model)
        if price is None or prompt_tokens is None or completion_tokens is None:
            return None
        if prompt_tokens < 0 or completion_tokens < 0:
            return None
        return price.cost(prompt_tokens, completion_tokens, cached_tokens)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"Price file {path} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read price file {path}: {exc.strerror}.") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"Price file {path} is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Price file {path} is not valid TOML: {exc}.") from None


def read_batch_shares(path: Path, *, require_source: bool) -> dict[str, float]:
    """``[batch."HOST"] share = 0.75`` tables: a provider's batch price as a share of the
    online price, for models without their own ``batch_input``/``batch_output``."""
    found: dict[str, float] = {}
    for host, table in (_read_toml(path).get("batch") or {}).items():
        where = f'Price file {path}: [batch."{host}"]'
        if not isinstance(table, dict) or set(table) - {"share", "source", "date"}:
            raise ConfigError(f"{where}: give share (and source, date) only.")
        share = table.get("share")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigError(
                f"{where}: share must be a number above 0, at most 1 (got {share!r})."
            )
        if require_source and not (table.get("source") and table.get("date")):
            raise ConfigError(f"{where}: say where the share comes from (source) and when (date).")
        found[host.lower()] = float(share)
    return found


def read_price_file(path: Path, *, require_source: bool) -> dict[str, _Entry]:
    """Parse one price file; every problem is a ConfigError naming file, model and field."""
    data = _read_toml(path)
    unknown = [k for k in data if k not in ("models", "batch")]
    if unknown:
        raise ConfigError(
            f"Price file {path}: unknown top-level key '{unknown[0]}'. Put each model under "
            '[models."MODEL-ID"], a provider\'s batch share under [batch."HOST"] (see '
            "configs/prices.toml)."
        )
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(
            f"Price file {path}: 'models' must be tables like [models.\"gpt-4o-mini\"]."
        )
    entries: dict[str, _Entry] = {}
    names: dict[str, str] = {}  # casefolded id or alias -> the model that claims it
    for model, table in models.items():
        entry = _parse_entry(path, model, table, require_source=require_source)
        for name in (model, *entry.aliases):
            folded = name.casefold()
            if folded in names:
                raise ConfigError(
                    f"Price file {path}: model '{model}': '{name}' is already the id or an "
                    f"alias of model '{names[folded]}' (ids compare case-insensitively). "
                    "Keep one."
                )
            names[folded] = model
        entries[model.casefold()] = entry
    return entries


def _parse_entry(path: Path, model: str, table: Any, *, require_source: bool) -> _Entry:
    where = f"Price file {path}: model '{model}'"
    if not model.strip():
        raise ConfigError(f"Price file {path}: a model id is empty.")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table with input and output prices, got {table!r}.")
    for key in table:
        if key not in _FIELDS:
            raise ConfigError(f"{where}: unknown field '{key}' (fields: {', '.join(_FIELDS)}).")

    def rate(field: str, required: bool) -> float | None:
        if field not in table:
            if required:
                raise ConfigError(
                    f"{where}: field '{field}' is missing (USD per 1M tokens, like {field} = 0.5)."
                )
            return None
        value = table[field]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(
                f"{where}: field '{field}' must be a number of USD per 1M tokens, 0 or more "
                f"(got {value!r})."
            )
        return float(value)

    def text(field: str, default: str) -> str:
        if field not in table:
            if require_source:
                raise ConfigError(
                    f"{where}: field '{field}' is missing; say where the price comes from and when."
                )
            return default
        value = table[field]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{where}: field '{field}' must be a non-empty string (got {value!r})."
            )
        return value

    input_rate = rate("input", True)
    output_rate = rate("output", True)
    assert input_rate is not None and output_rate is not None
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ConfigError(
            f"{where}: field 'aliases' must be a list of model ids (got {aliases!r})."
        )
    dated = table.get("dated_snapshots", False)
    if not isinstance(dated, bool):
        raise ConfigError(
            f"{where}: field 'dated_snapshots' must be true or false (got {dated!r})."
        )
    batch_rates = (rate("batch_input", False), rate("batch_output", False))
    if (batch_rates[0] is None) != (batch_rates[1] is None):
        raise ConfigError(f"{where}: give both batch_input and batch_output, or neither.")
    price = Price(
        batch_input=batch_rates[0],
        batch_output=batch_rates[1],
        input=input_rate,
        output=output_rate,
        cached_input=rate("cached_input", False),
        source=text("source", f"price file {path}"),
        date=text("date", "unspecified"),
    )
    return _Entry(model, price, tuple(aliases), dated)


def _usd(value: Any) -> float | None:
    """A non-negative finite USD amount from a number or a string like "0.0012" or "$0.0012"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().removeprefix("$").strip()
        try:
            value = float(text)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def reported_cost(headers: Mapping[str, str], body: Mapping[str, Any] | None) -> float | None:
    """What the server says this request cost in USD, or None when it does not say.

    Read from the ``x-aimlapi-usd-spent`` header (name matched case-insensitively), else from
    the body's ``meta.usage.usd_spent``. The header wins when both are present: it is the
    AI/ML API gateway's own billing figure and comes on every response, while ``meta`` is an
    optional part of the body. Values that are not a finite amount of 0 or more are ignored.
    """
    raw: Any = headers.get(USD_SPENT_HEADER)
    if raw is None:
        raw = next((v for k, v in headers.items() if k.lower() == USD_SPENT_HEADER), None)
    if raw is not None:
        found = _usd(raw)
        if found is not None:
            return found
    if not isinstance(body, Mapping):
        return None
    meta = body.get("meta")
    usage = meta.get("usage") if isinstance(meta, Mapping) else None
    spent = usage.get("usd_spent") if isinstance(usage, Mapping) else None
    return None if spent is None else _usd(spent)


def row_cost(
    prices: PriceTable,
    *,
    model: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cached_tokens: int | None = None,
    reported: float | None = None,
    response_model: str | None = None,
) -> Cost:
    """What one answered row cost: the one cost rule of the run.

    The server-reported spend ``reported`` when there is one (:data:`COST_REPORTED`); else
    usage priced by the table under the requested ``model``, or under ``response_model`` when
    only that one has a price (:data:`COST_TABLE`); else ``Cost(None, None)``.
    """
    if reported is not None:
        return Cost(reported, COST_REPORTED)
    for name in (model, response_model):
        if name:
            cost = prices.cost(name, prompt_tokens, completion_tokens, cached_tokens)
            if cost is not None:
                return Cost(cost, COST_TABLE)
    return Cost(None, None)
