"""The keys of a row's units, (model, sample) pairs, made one unit at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np

from .keys import model_row_keys, sample_row_keys


class UnitKeys(Sequence[np.ndarray]):
    """The keys of every (row, model, sample) unit ``u = model * n + sample`` of ``keys``,
    each made when it is asked for (8 bytes a row, for as long as the caller holds it):
    a run over several models or samples does not hold them all at once."""

    def __init__(self, keys: np.ndarray, models: Sequence[str], n: int) -> None:
        self.keys, self.models, self.n = keys, list(models), n

    def __len__(self) -> int:
        return len(self.models) * self.n

    @overload
    def __getitem__(self, unit: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, unit: slice) -> list[np.ndarray]: ...
    def __getitem__(self, unit: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(unit, slice):
            return [self[u] for u in range(*unit.indices(len(self)))]
        if not -len(self) <= unit < len(self):
            raise IndexError(unit)
        model, sample = divmod(unit % len(self), self.n)
        keys = self.keys if len(self.models) == 1 else model_row_keys(self.keys, self.models[model])
        return sample_row_keys(keys, sample)
