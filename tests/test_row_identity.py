"""Row identity across reruns, as a seeded randomized property: whatever the edits between
runs on one OUTPUT (rows appended, inserted, deleted, reordered, duplicated, edited, brought
back), no output row ever carries another row's answer, and nothing answered is paid for
again.

Each example is a few ``pipeline.run`` calls on the same OUTPUT, each with a frame derived
from the last by random edits, under one setup (one or two models, one or two samples,
``id_column`` or not, ``dedup`` or not) and a random OUTPUT layout per run (``wide``,
``samples``: they only shape OUTPUT). A model of the job says, after every run, what OUTPUT
holds (row for row) and which requests the run sent; the simulator's answer names its
prompt, the model echoes back, and a sample's seed or choice tags its text, so a misplaced
answer shows. Small parts (``checkpoint_rows``, one request at a time) spread the answers
over many parts. Everything goes over real HTTP to the simulator on 127.0.0.1.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import pipeline
from pipeline import array_file, index_join, repeats, result_index, spill, todo
from pipeline import keys as keys_module
from pipeline.simulator import SimulatorThread

PREFIX = "Simulated answer to: "
MODELS = ("gpt-3.5-turbo", "gpt-4o-mini")
MAX_ROWS = 40
# texts that are close but not equal: a row of one must never get the answer of another
WORDS = ["alpha", "Alpha", "alpha ", "be,ta", 'say "hi"', "naïve", "émoji 🚀", "x\ny", "a;b"]

Row = dict[str, Any]  # {"tag": int, "id": int, "prompt": str}
# a model's view of one OUTPUT cell: (tag, model, sample, completion, response_model, status)
Cell = tuple[int, str, int, str, str, str]
# a request as the simulator got it: (prompt, model, n, seed)
Sent = tuple[str, str, int | None, int | None]


@dataclass(frozen=True)
class Setup:
    """What stays the same over an example's runs (the checkpoint's fingerprint and keys)."""

    models: tuple[str, ...]
    n: int
    seeds: bool  # n_mode "seeds" (K requests a row) rather than the default (one with n=K)
    ids: bool  # id_column="id"
    dedup: bool
    checkpoint_rows: int
    concurrency: int

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "model": list(self.models) if len(self.models) > 1 else self.models[0],
            "dedup": self.dedup,
            "checkpoint_rows": self.checkpoint_rows,
            "concurrency": self.concurrency,
        }
        if self.n > 1:
            options["n"] = self.n
            options["n_mode"] = "seeds" if self.seeds else "auto"
        if self.ids:
            options["id_column"] = "id"
        return options

    def answer(self, prompt: str, sample: int) -> str:
        if self.n > 1 and self.seeds:
            return f"{PREFIX}{prompt} (seed {1 + sample})"
        return PREFIX + prompt + (f" (choice {sample})" if sample else "")


@dataclass(frozen=True)
class Layout:
    """How OUTPUT holds the results: changing it between runs costs no request."""

    wide: bool = False
    long: bool = False  # samples="long"

    def options(self, setup: Setup) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if len(setup.models) > 1:
            options["wide"] = self.wide
        if setup.n > 1:
            options["samples"] = "long" if self.long else "list"
        return options


@dataclass
class Job:
    """The model of one OUTPUT: which units have an answer, and what a run should send."""

    setup: Setup
    # units with a stored answer, by the tool's row key: (id, prompt) with id_column, else
    # (prompt, occurrence among equal prompts)
    answered: set[tuple[Any, Any, str, int]] = field(default_factory=set)

    def row_keys(self, rows: list[Row]) -> list[tuple[Any, Any]]:
        if self.setup.ids:
            return [(row["id"], row["prompt"]) for row in rows]
        seen: Counter[str] = Counter()
        keys = []
        for row in rows:
            seen[row["prompt"]] += 1
            keys.append((row["prompt"], seen[row["prompt"]]))
        return keys

    def expected_requests(self, rows: list[Row]) -> Counter[Sent]:
        """What a run over ``rows`` sends: each (prompt, model, sample) no run has answered
        (with dedup: once, however many rows hold it), or without dedup each such unit of a
        row whose key has no answer."""
        setup = self.setup
        units: list[tuple[str, str, int]] = []
        if setup.dedup:
            # a unit of a prompt is free when one of the prompt's rows here has its answer
            # (with ids, an answer under an id that left the input is not this input's)
            keys_of: dict[str, list[tuple[Any, Any]]] = {}
            for row, key in zip(rows, self.row_keys(rows), strict=True):
                keys_of.setdefault(row["prompt"], []).append(key)
            for prompt, keys in keys_of.items():
                for model in setup.models:
                    for s in range(setup.n):
                        if not any((*key, model, s) in self.answered for key in keys):
                            units.append((prompt, model, s))
        else:
            for row, key in zip(rows, self.row_keys(rows), strict=True):
                for model in setup.models:
                    for s in range(setup.n):
                        if (*key, model, s) not in self.answered:
                            units.append((row["prompt"], model, s))
        sent: Counter[Sent] = Counter()
        for prompt, model, s in units:
            if setup.n == 1:
                sent[(prompt, model, None, None)] += 1
            elif setup.seeds:
                sent[(prompt, model, None, 1 + s)] += 1
            elif s == 0:  # one request with n=K answers every sample of the unit
                sent[(prompt, model, setup.n, None)] += 1
        return sent

    def record(self, rows: list[Row]) -> None:
        for key in self.row_keys(rows):
            for model in self.setup.models:
                for s in range(self.setup.n):
                    self.answered.add((*key, model, s))

    def expected_cells(self, rows: list[Row], layout: Layout) -> list[Cell]:
        """OUTPUT's cells in OUTPUT's order: input order, then model and sample (``wide``
        and long: sample, then model)."""
        setup = self.setup
        cells: list[Cell] = []
        for row in rows:
            pairs = [(m, s) for m in setup.models for s in range(setup.n)]
            if layout.wide and layout.long:
                pairs = [(m, s) for s in range(setup.n) for m in setup.models]
            for m, s in pairs:
                cells.append((row["tag"], m, s, setup.answer(row["prompt"], s), m, "ok"))
        return cells


def output_cells(frame: pd.DataFrame, setup: Setup, layout: Layout) -> list[Cell]:
    """OUTPUT (a file read back, or ``pipeline.run``'s frame) as cells in its own order."""
    cells: list[Cell] = []
    several = len(setup.models) > 1
    for record in frame.to_dict("records"):
        for m in setup.models:
            prefix = f"{m}__" if several and layout.wide else ""
            if several and not layout.wide and record["model"] != m:
                continue
            completion = record[prefix + "completion"]
            if setup.n > 1 and not layout.long:
                samples, texts = list(range(setup.n)), list(completion)
            else:
                samples, texts = [int(record["sample"]) if setup.n > 1 else 0], [completion]
            for s, text in zip(samples, texts, strict=True):
                cells.append(
                    (
                        int(record["tag"]),
                        m,
                        s,
                        str(text),
                        str(record[prefix + "response_model"]),
                        str(record[prefix + "status"]),
                    )
                )
    return cells


class Edits:
    """Random edits of a frame; prompts and ids never seen before come from counters."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.next_tag = 0
        self.next_id = 1000
        self.next_text = 0
        self.gone: list[Row] = []  # rows deleted, that may come back as they were

    def fresh_text(self) -> str:
        self.next_text += 1
        return f"{self.rng.choice(WORDS)} #{self.next_text}"

    def new_row(self, prompt: str | None = None) -> Row:
        self.next_tag += 1
        self.next_id += self.rng.randint(1, 3)
        return {"tag": self.next_tag, "id": self.next_id, "prompt": prompt or self.fresh_text()}

    def text_for(self, rows: list[Row]) -> str:
        """A fresh prompt, or now and then one that a row (present or gone) already has."""
        known = [row["prompt"] for row in rows + self.gone]
        if known and self.rng.random() < 0.3:
            return self.rng.choice(known)
        return self.fresh_text()

    def first(self, count: int) -> list[Row]:
        rows = [self.new_row() for _ in range(count)]
        for _ in range(self.rng.randint(0, 3)):  # a few equal prompts from the start
            rows.insert(
                self.rng.randint(0, len(rows)), self.new_row(self.rng.choice(rows)["prompt"])
            )
        return rows

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[str]]:
        rows = list(rows)
        done = []
        for _ in range(self.rng.randint(1, 3)):
            kind = self.rng.choice(
                ["append", "insert", "delete", "reorder", "duplicate", "edit", "restore", "none"]
            )
            k = self.rng.randint(1, 4)
            room = MAX_ROWS - len(rows)
            if kind == "append" and room:
                rows += [self.new_row(self.text_for(rows)) for _ in range(min(k, room))]
            elif kind == "insert" and room:
                for _ in range(min(k, room)):
                    rows.insert(self.rng.randint(0, len(rows)), self.new_row(self.text_for(rows)))
            elif kind == "delete" and len(rows) > 1:
                for _ in range(min(k, len(rows) - 1)):
                    self.gone.append(rows.pop(self.rng.randrange(len(rows))))
            elif kind == "reorder":
                if self.rng.random() < 0.5:
                    self.rng.shuffle(rows)
                else:
                    i, j = self.rng.randrange(len(rows)), self.rng.randrange(len(rows))
                    rows[i], rows[j] = rows[j], rows[i]
            elif kind == "duplicate" and room:
                for _ in range(min(k, room)):
                    copy = self.new_row(self.rng.choice(rows)["prompt"])
                    rows.insert(self.rng.randint(0, len(rows)), copy)
            elif kind == "edit":
                for _ in range(k):
                    i = self.rng.randrange(len(rows))
                    self.gone.append(rows[i])
                    self.next_tag += 1  # the same id, another text: another row
                    rows[i] = {**rows[i], "tag": self.next_tag, "prompt": self.text_for(rows)}
            elif kind == "restore" and room and self.gone:
                back = self.gone.pop(self.rng.randrange(len(self.gone)))
                if all(row["id"] != back["id"] for row in rows):
                    self.next_tag += 1
                    rows.insert(self.rng.randint(0, len(rows)), {**back, "tag": self.next_tag})
            else:
                kind = "none"
            done.append(kind)
        return rows, done


def frame_of(rows: list[Row], setup: Setup) -> pd.DataFrame:
    columns = ["tag", "id", "prompt"] if setup.ids else ["tag", "prompt"]
    return pd.DataFrame([{c: row[c] for c in columns} for row in rows], columns=columns)


def run_and_check(
    sim: SimulatorThread, out: Path, job: Job, rows: list[Row], layout: Layout, what: str
) -> None:
    """One run over ``rows``: OUTPUT and the returned frame hold exactly the rows' own
    answers, in order, and the run sent exactly what no earlier run had answered."""
    setup = job.setup
    expected_sent = job.expected_requests(rows)
    sim.simulator.reset()
    data = frame_of(rows, setup)
    result = pipeline.run(
        data,
        out,
        base_url=sim.base_url,
        progress=False,
        quiet=True,
        **setup.options(),
        **layout.options(setup),
    )
    job.record(rows)
    expected = job.expected_cells(rows, layout)
    copies = (1 if layout.wide else len(setup.models)) * (setup.n if layout.long else 1)
    tags = [row["tag"] for row in rows for _ in range(copies)]
    written = pd.read_parquet(out)
    assert written["tag"].tolist() == tags, f"OUTPUT's rows after {what}"
    assert result["tag"].tolist() == tags, f"pipeline.run's rows after {what}"
    assert output_cells(written, setup, layout) == expected, f"OUTPUT after {what}"
    assert output_cells(result, setup, layout) == expected, f"pipeline.run's frame after {what}"
    sent = Counter(
        (str(b["messages"][-1]["content"]), str(b["model"]), b.get("n"), b.get("seed"))
        for b in (r.body for r in sim.simulator.requests)
        if b is not None
    )
    assert sent == expected_sent, f"requests of the run after {what}"


def setup_of(seed: int, rng: random.Random) -> Setup:
    """Every combination of models, samples, ids and dedup once in 16 seeds."""
    return Setup(
        models=MODELS[: 1 + (seed & 1)],
        n=1 + (seed >> 1 & 1),
        seeds=rng.random() < 0.5,
        ids=bool(seed >> 2 & 1),
        dedup=not seed >> 3 & 1,
        checkpoint_rows=rng.randint(1, 4),
        concurrency=rng.choice([1, 1, 2, 4]),
    )


def random_layout(setup: Setup, rng: random.Random) -> Layout:
    return Layout(
        wide=len(setup.models) > 1 and rng.random() < 0.4,
        long=setup.n > 1 and rng.random() < 0.4,
    )


def in_tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a run of millions of rows does a piece at a time, done a few rows at a time:
    keys made 3 rows at a time, duplicates and the index sorted in buckets of 2 keys, the
    plan looked up 8 rows at a time and its repeats 2 at a time, the index joined block by
    block, columns gathered 4 values at a time, OUTPUT's rows found 5 at a time."""
    monkeypatch.setattr(keys_module, "CHUNK", 3)
    monkeypatch.setattr(repeats, "READ", 5)
    monkeypatch.setattr(spill, "BUCKET_KEYS", 2)
    monkeypatch.setattr(todo, "PLAN_ROWS", 8)
    monkeypatch.setattr(todo, "DEDUP_ROWS", 2)
    monkeypatch.setattr(result_index, "CACHED_KEYS", 4)
    monkeypatch.setattr(result_index, "LOOKUP_CHUNK", 3)
    monkeypatch.setattr(index_join, "PLACES_WINDOW", 5)
    monkeypatch.setattr(index_join, "MIN_WINDOW_ROWS", 2)
    monkeypatch.setattr(array_file, "GATHER", 4)


@pytest.mark.parametrize("seed", range(24))
def test_no_row_gets_another_rows_answer_and_no_answer_is_paid_twice(
    simulator: SimulatorThread, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if seed % 2:  # every other example as a run of millions of rows would go
        in_tiny_pieces(monkeypatch)
    rng = random.Random(seed)
    setup = setup_of(seed, rng)
    job, edits = Job(setup), Edits(rng)
    out = tmp_path / "o.parquet"
    rows = edits.first(rng.randint(3, 12))
    history = [f"{setup}", f"run 1: {len(rows)} rows"]
    run_and_check(simulator, out, job, rows, random_layout(setup, rng), "; ".join(history))
    for number in range(2, rng.randint(3, 6) + 1):
        rows, done = edits.apply(rows)
        history.append(f"run {number}: {', '.join(done)} -> {len(rows)} rows")
        run_and_check(simulator, out, job, rows, random_layout(setup, rng), "; ".join(history))
    history.append("the same frame again")
    assert job.expected_requests(rows) == Counter()
    run_and_check(simulator, out, job, rows, random_layout(setup, rng), "; ".join(history))
