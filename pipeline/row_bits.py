"""A yes or no per (row, unit), packed 8 to a byte: which units of a plan are sent costs an
eighth of a byte a row and unit (a bool array took a byte)."""

from __future__ import annotations

import numpy as np

READ_ROWS = 1 << 20  # rows unpacked at once by a count


class RowBits:
    """``rows`` x ``units`` bits, all clear at first. ``put`` sets a unit's bits from a
    row on (a multiple of 8), ``clear`` clears some; ``bits[a:b]`` reads rows ``a:b`` of
    every unit as a bool array (rows, units), as a bool matrix's would."""

    def __init__(self, rows: int, units: int) -> None:
        self.rows, self.units = rows, units
        self.packed = np.zeros((units, (rows + 7) // 8), dtype=np.uint8)

    def put(self, unit: int, start: int, values: np.ndarray) -> None:
        """Set unit ``unit``'s bits of rows ``start..`` to ``values`` (``start % 8 == 0``)."""
        if start % 8 or start + len(values) > self.rows:
            raise ValueError(f"rows {start}..{start + len(values)} of {self.rows}, not by 8s")
        packed = np.packbits(np.asarray(values, dtype=bool))
        self.packed[unit, start // 8 : start // 8 + len(packed)] = packed

    def clear(self, unit: int, rows: np.ndarray) -> None:
        """Clear unit ``unit``'s bits of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        masks = (np.uint8(0x80) >> (rows & 7).astype(np.uint8)).astype(np.uint8)
        np.bitwise_and.at(self.packed[unit], rows >> 3, ~masks)

    def get(self, unit: int, rows: np.ndarray) -> np.ndarray:
        """Unit ``unit``'s bits of ``rows`` (a bool array)."""
        rows = np.asarray(rows, dtype=np.int64)
        masks = (np.uint8(0x80) >> (rows & 7).astype(np.uint8)).astype(np.uint8)
        return (self.packed[unit, rows >> 3] & masks) != 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.rows)
        stop = max(start, stop)
        first = start // 8
        unpacked = np.unpackbits(self.packed[:, first : (stop + 7) // 8], axis=1)
        skip = start - 8 * first
        return np.ascontiguousarray(unpacked[:, skip : skip + stop - start].T.astype(bool))

    def count(self) -> int:
        """How many bits are set."""
        total = 0
        for start in range(0, self.packed.shape[1], READ_ROWS // 8):
            total += int(np.unpackbits(self.packed[:, start : start + READ_ROWS // 8]).sum())
        return total

    def first_row(self) -> int | None:
        """The first row with a bit set in any unit (None: no bit is set)."""
        if not self.units:
            return None
        anywhere = np.bitwise_or.reduce(self.packed, axis=0)
        nonzero = np.flatnonzero(anywhere)
        if not len(nonzero):
            return None
        byte = int(nonzero[0])
        return 8 * byte + int(np.flatnonzero(np.unpackbits(anywhere[byte : byte + 1]))[0])


class RowMask:
    """A yes or no per row, packed 8 to a byte: ``[a:b]`` reads a bool array, ``count()``
    how many are yes (a shard's rows, of a job of any size)."""

    def __init__(self, rows: int) -> None:
        self.bits = RowBits(rows, 1)

    def __len__(self) -> int:
        return self.bits.rows

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.bits[rows][:, 0]

    def put(self, start: int, values: np.ndarray) -> None:
        """Rows ``start..`` (``start % 8 == 0``)."""
        self.bits.put(0, start, values)

    def count(self) -> int:
        return self.bits.count()
