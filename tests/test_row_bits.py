"""The send bits of a plan (``RowBits``) read back exactly what a bool matrix would: any
slice of rows, the count and the first row with a bit, after puts and clears."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.row_bits import RowBits


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(min_value=0, max_value=70),
    units=st.integers(min_value=1, max_value=3),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    chunk=st.sampled_from([8, 16, 64]),
)
def test_row_bits_read_back_as_the_bool_matrix_they_stand_for(
    rows: int, units: int, seed: int, chunk: int
) -> None:
    rng = np.random.default_rng(seed)
    expected = rng.random((rows, units)) < 0.5
    bits = RowBits(rows, units)
    for unit in range(units):
        for start in range(0, rows, chunk):  # as a plan puts them, a chunk of rows at a time
            bits.put(unit, start, expected[start : start + chunk, unit])
    cleared = rng.integers(0, max(rows, 1), size=rows // 3) if rows else np.zeros(0, int)
    for unit in range(units):
        bits.clear(unit, cleared)
        expected[cleared, unit] = False

    for _ in range(10):
        a, b = sorted(rng.integers(0, rows + 1, size=2).tolist())
        assert bits[a:b].tolist() == expected[a:b].tolist()
    assert bits[:].tolist() == expected.tolist()
    assert bits.count() == int(expected.sum())
    anywhere = np.flatnonzero(expected.any(axis=1))
    assert bits.first_row() == (int(anywhere[0]) if len(anywhere) else None)


def test_a_put_that_does_not_start_on_a_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="not by 8s"):
        RowBits(20, 1).put(0, 3, np.ones(5, dtype=bool))
