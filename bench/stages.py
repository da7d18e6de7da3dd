"""Where a full sync's time goes: the engine's per-chunk steps, one at a time, one thread.

Replays what a reader and a writer thread do for every chunk of the full sync (preadv
into a reused buffer, zero check, blake3, the compression probe, zstd-1 where the probe
says so, put_chunk) on the same chunks in one thread, and adds up each step's wall time,
CPU time and minor page faults (getrusage of the thread). The engine's earlier ways of
doing two steps are measured alongside, for comparison only: a new buffer per read, and
zstd over every chunk.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
import zstandard

from hamal_workers.engine import pipeline
from hamal_workers.engine.extents import chunks_touched
from hamal_workers.platforms.local import data_extents
from hamal_workers.targets.base import CODEC_RAW, CODEC_ZSTD
from hamal_workers.targets.chunkstore import ChunkStore


@dataclass
class StepCost:
    name: str
    engine: bool  # False: an alternative, not what the engine does
    wall: float = 0.0
    cpu: float = 0.0
    faults: int = 0


class StepClock:
    """Times consecutive steps of one thread: call `lap(step)` at the end of each."""

    def __init__(self) -> None:
        self.mark = self._now()

    @staticmethod
    def _now() -> tuple[float, float, int]:
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt

    def lap(self, *steps: StepCost) -> None:
        """Charge the time since the last mark to each of `steps`."""
        now = self._now()
        for step in steps:
            step.wall += now[0] - self.mark[0]
            step.cpu += now[1] - self.mark[1]
            step.faults += now[2] - self.mark[2]
        self.mark = now

    def skip(self) -> None:
        self.mark = self._now()


def step_costs(image: Path, scratch: Path) -> list[StepCost]:
    """Run every step over every allocated chunk of `image`; chunks go to a store in scratch."""
    steps = {
        "read": StepCost("preadv into a reused buffer", True),
        "zero": StepCost("zero check", True),
        "hash": StepCost("blake3", True),
        "zstd": StepCost("probe, then zstd-1 where it compresses", True),
        "put": StepCost("put_chunk (write file, fdatasync, rename)", True),
        "sync": StepCost("target.sync() at the end", True),
        "fresh": StepCost("alt: pread into a new buffer", False),
        "every": StepCost("alt: zstd-1 of every chunk", False),
    }
    store = ChunkStore(scratch)
    chunk = store.chunk_size
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        indexes = chunks_touched(data_extents(fd, size), chunk, size)
        _replay(fd, indexes, chunk, store, steps)
    finally:
        os.close(fd)
    clock = StepClock()
    store.sync()
    clock.lap(steps["sync"])
    return list(steps.values())


def _replay(
    fd: int, indexes: list[int], chunk: int, store: ChunkStore, steps: dict[str, StepCost]
) -> None:
    compressor = zstandard.ZstdCompressor(level=pipeline.ZSTD_LEVEL)
    zero = bytes(chunk)
    buffer = bytearray(chunk)
    clock = StepClock()
    for index in indexes:
        fresh = os.pread(fd, chunk, index * chunk)
        clock.lap(steps["fresh"])
        del fresh
        clock.skip()
        length = os.preadv(fd, [buffer], index * chunk)
        data = memoryview(buffer)[:length]
        clock.lap(steps["read"])
        if length == chunk and buffer == zero:
            clock.lap(steps["zero"])
            continue
        clock.lap(steps["zero"])
        digest = blake3.blake3(data).digest()
        clock.lap(steps["hash"])
        compressor.compress(data)
        clock.lap(steps["every"])
        packed = b""
        if pipeline.worth_compressing(compressor, data):
            packed = compressor.compress(data)
        clock.lap(steps["zstd"])
        if packed and len(packed) < length * pipeline.COMPRESS_WORTH:
            store.put_chunk(digest, packed, CODEC_ZSTD, length)
        else:
            store.put_chunk(digest, data, CODEC_RAW, length)
        clock.lap(steps["put"])


def format_costs(costs: list[StepCost], cores: int) -> str:
    rows = [("step", "wall s", "CPU s", "minor faults")]
    for c in costs:
        rows.append((c.name, f"{c.wall:.2f}", f"{c.cpu:.2f}", f"{c.faults:,}"))
    engine = [c for c in costs if c.engine]
    rows.append(
        (
            "engine steps, total",
            f"{sum(c.wall for c in engine):.2f}",
            f"{sum(c.cpu for c in engine):.2f}",
            f"{sum(c.faults for c in engine):,}",
        )
    )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  " + "  ".join(r[0].ljust(width[0]) if i == 0 else r[i].rjust(width[i]) for i in range(4))
        for r in rows
    ]
    cpu = sum(c.cpu for c in engine)
    lines.append(
        f"  spread perfectly over {cores} cores, the engine steps need at least "
        f"{cpu / cores:.2f} s of wall time"
    )
    return "\n".join(lines)
