"""How every operation is timed, medians, the results table and the targets.

Plain text, so it pastes into a README.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench import images

MB = 1_000_000  # MB/s in decimal megabytes, as TESTBEDS.md gives its peers' figures
MiB = 1024 * 1024

T = TypeVar("T")


@dataclass
class Measured:
    """Every run of one operation of one tool."""

    tool: str
    operation: str
    image_bytes: int | None  # what MB/s is computed over; None prints no MB/s
    seconds: list[float] = field(default_factory=list)
    disk_reads: list[int] = field(default_factory=list)  # bytes read from disk meanwhile

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mb_per_s(self) -> float | None:
        return self.image_bytes / MB / self.median if self.image_bytes else None


@dataclass(frozen=True)
class Goal:
    """A ratio the issue asks for, and whether this run met it."""

    name: str
    value: float
    wanted: str
    met: bool

    def line(self) -> str:
        verdict = "PASS" if self.met else "MISS"
        return f"{verdict}  {self.name}: {self.value:.2f}x (target {self.wanted})"


class Rows:
    """A bench's measured operations: its Measured attributes, in the order they print."""

    def __init__(self, image_bytes: int) -> None:
        self.image_bytes = image_bytes

    def row(self, tool: str, operation: str, rate: bool = True) -> Measured:
        """A row; with `rate` its MB/s is the image's apparent size over the median time."""
        return Measured(tool, operation, self.image_bytes if rate else None)

    def rows(self) -> list[Measured]:
        return [v for v in vars(self).values() if isinstance(v, Measured)]

    def round_line(self, n: int) -> str:
        """What round n (from 0) measured: every row that got its (n + 1)th time."""
        last = [r for r in self.rows() if len(r.seconds) == n + 1]
        times = ", ".join(f"{r.tool} {r.operation} {r.seconds[-1]:.2f} s" for r in last)
        return f"round {n + 1}: {times}"


def header(bench: str) -> str:
    """The first lines of a bench's output: which, when, on what."""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    # Anything else running on the machine skews every figure: say how busy it was.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{bench} — {now}\n"
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.platform()}; load average before the bench {load}\n"
    )


def measured(
    row: Measured,
    source: Path | None,
    operation: Callable[[], T],
    seconds_of: Callable[[T], float] = float,  # type: ignore[assignment]
) -> T:
    """Run one timed operation the same way for every tool, and record it in `row`.

    Nothing dirty is left for it to flush (`sync` first), its source was just read so
    it is in the page cache, and what it nevertheless read from disk is recorded: this
    machine pages out file pages idle for about a minute (a DAMON reclaim scheme).
    """
    os.sync()
    if source is not None:
        images.read_through(source)
    before = disk_reads()
    outcome = operation()
    row.disk_reads.append(disk_reads() - before)
    row.seconds.append(seconds_of(outcome))
    return outcome


def disk_reads() -> int:
    """Bytes read from block devices since boot, all processes (/proc/vmstat pgpgin, KiB)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == "pgpgin":
            return int(value) * 1024
    return 0


def table(rows: list[Measured]) -> str:
    header = ("tool", "operation", "seconds (median)", "runs", "MB/s", "read from disk, MiB")
    lines = [header]
    for row in rows:
        if not row.seconds:
            continue
        runs = ", ".join(f"{s:.2f}" for s in row.seconds)
        rate = f"{row.mb_per_s:,.0f}" if row.mb_per_s else "—"
        disk = ", ".join(f"{b / MiB:.0f}" for b in row.disk_reads)
        lines.append((row.tool, row.operation, f"{row.median:.2f}", runs, rate, disk))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def throughput_ratio(ours: Measured, peer: Measured, wanted: float) -> Goal | None:
    """Our MB/s over the peer's (same bytes, so the inverse ratio of their times)."""
    if not ours.seconds or not peer.seconds:
        return None
    value = peer.median / ours.median
    name = f"{ours.tool} {ours.operation} throughput / {peer.tool} {peer.operation} throughput"
    return Goal(name, value, f">= {wanted:g}x", value >= wanted)


def time_ratio(ours: Measured, peer: Measured, wanted: float) -> Goal | None:
    if not ours.seconds or not peer.seconds:
        return None
    value = ours.median / peer.median
    name = f"{ours.tool} {ours.operation} time / {peer.tool} {peer.operation} time"
    return Goal(name, value, f"< {wanted:g}x", value < wanted)
