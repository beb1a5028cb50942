"""The keys of a row's units, (model, sample) pairs, made a slice at a time from the row
keys (which may themselves be read from a file a slice at a time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from .array_file import take
from .keys import key_salt, salted


class DerivedKeys:
    """The keys ``keys`` become when each is mixed with ``salts`` in turn (a model's name,
    then a sample's number: ``keys.key_salt``, ``keys.salted``), made when a
    slice is read (``len``, ``[a:b]``, ``take``), never held whole."""

    def __init__(self, keys: Any, salts: Sequence[np.uint64]) -> None:
        self.keys, self.salts = keys, tuple(salts)

    def __len__(self) -> int:
        return len(self.keys)

    def _derive(self, keys: np.ndarray) -> np.ndarray:
        out = np.array(keys, dtype=np.uint64)  # a copy: never the row keys themselves
        for salt in self.salts:
            salted(out, salt)
        return out

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._derive(self.keys[rows])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self._derive(take(self.keys, rows))


class UnitKeys(Sequence[Any]):
    """The keys of every (row, model, sample) unit ``u = model * n + sample`` of ``keys``:
    each unit's are the row keys themselves (one model, sample 0) or ``DerivedKeys`` of
    them, read a slice at a time."""

    def __init__(self, keys: Any, models: Sequence[str], n: int) -> None:
        self.keys, self.models, self.n = keys, list(models), n

    def __len__(self) -> int:
        return len(self.models) * self.n

    @overload
    def __getitem__(self, unit: int) -> Any: ...
    @overload
    def __getitem__(self, unit: slice) -> list[Any]: ...
    def __getitem__(self, unit: int | slice) -> Any:
        if isinstance(unit, slice):
            return [self[u] for u in range(*unit.indices(len(self)))]
        if not -len(self) <= unit < len(self):
            raise IndexError(unit)
        model, sample = divmod(unit % len(self), self.n)
        salts = [key_salt(self.models[model])] if len(self.models) > 1 else []
        if sample:
            salts.append(key_salt(f"sample {sample}"))
        return DerivedKeys(self.keys, salts) if salts else self.keys
