"""Medians, the results table and the targets: plain text, so it pastes into a README."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MB = 1_000_000  # MB/s in decimal megabytes, as TESTBEDS.md gives its peers' figures
MiB = 1024 * 1024


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
