"""Byte extents of a disk and the fixed chunk grid they fall on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Extent(NamedTuple):
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunks_touched(extents: Iterable[Extent], chunk_size: int, size: int) -> list[int]:
    """Sorted indexes of every chunk an extent overlaps: the chunks to read.

    Chunks sit at absolute offsets, so a change near a hole never shifts the grid.
    """
    last = chunk_count(size, chunk_size) - 1
    touched: set[int] = set()
    for ext in extents:
        if ext.length <= 0:
            continue
        first = ext.offset // chunk_size
        end = min((ext.end - 1) // chunk_size, last)
        touched.update(range(first, end + 1))
    return sorted(touched)


def to_runs(indexes: list[int]) -> list[list[int]]:
    """[[start, count], ...]: a plan small enough to keep in a checkpoint."""
    runs: list[list[int]] = []
    for i in indexes:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def from_runs(runs: Iterable[Iterable[int]]) -> Iterator[int]:
    for start, count in runs:
        yield from range(start, start + count)
