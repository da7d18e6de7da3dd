"""Which restore points of a VM retention keeps: restic `forget` and borg `prune` rules, in UTC.

`apply_policy` is given a VM's points (id, creation time) and a policy, and says for each point
whether it is kept and every reason why. A point is deleted only when nothing keeps it:

- The newest point (by creation time, then id) is always kept ("newest"), whatever the
  policy, so retention never leaves a VM without a restore point.
- keep_last N keeps the N newest points ("last").
- keep_hourly, keep_daily, keep_weekly and keep_monthly N each put every point in a bucket:
  its UTC hour (2026-11-25T14), UTC date (2026-11-25), ISO year and week (2026-W48) or UTC
  month (2026-11). Walking the points newest first, the newest point of each bucket is kept,
  for the first N buckets that hold a point ("daily 2026-11-25"): a day without a point does
  not use up keep_daily, as with restic's "the last N days which have one or more snapshots".
- keep_within D keeps every point created at most D seconds before the newest point
  ("within 2d"). D is measured from the newest point, not from the clock: a proxy that
  stopped syncing for longer than D still keeps D's worth of points instead of letting
  every point expire.
- A protected point (the base of a running sync, say) is kept with the reason given for it.

Points created in the same second are ordered by id: ids sort by time
(20261125T180344Z-1a2b3c). Nothing here reads the clock, so the same points and policy always
give the same verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py checks its [retention] section with this module
    from hamal_workers.config import RetentionSection

# Seconds per unit of a duration, largest first, so a duration is shown in the largest unit
# that divides it.
_UNIT_SECONDS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
# Units are lower case only: "M" would read as months to some and as minutes to others.
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)")


def duration_seconds(text: str) -> float:
    """Seconds in `text`: a number of seconds, or a number with unit s, m, h, d or w ("7d").

    Raises ValueError for anything else.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    number, unit = match.groups()
    return float(number) * _UNIT_SECONDS[unit or "s"]


def duration_text(seconds: float) -> str:
    """`seconds` as the shortest duration text duration_seconds reads back: 5400 is "90m"."""
    for unit, size in _UNIT_SECONDS.items():
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.15g}{unit}"
    return f"{seconds:.15g}s"


@dataclass(frozen=True)
class RetentionPolicy:
    """How many restore points of each kind are kept per VM; 0 turns a rule off."""

    keep_last: int = 24
    keep_hourly: int = 0
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 0
    keep_within_s: float = 0.0

    def __post_init__(self) -> None:
        # A negative count would slice from the wrong end and delete the newest points.
        if min(self._counts()) < 0 or self.keep_within_s < 0:
            raise ValueError(f"retention counts and keep_within must not be negative: {self}")

    @classmethod
    def from_settings(cls, section: RetentionSection) -> RetentionPolicy:
        return cls(
            keep_last=section.keep_last,
            keep_hourly=section.keep_hourly,
            keep_daily=section.keep_daily,
            keep_weekly=section.keep_weekly,
            keep_monthly=section.keep_monthly,
            keep_within_s=duration_seconds(section.keep_within),
        )

    def keeps_nothing(self) -> bool:
        """Whether every rule is off, so that only the newest point would be left."""
        return not any(self._counts()) and self.keep_within_s == 0

    def describe(self) -> str:
        """The rules in force, for logs and status: "last 24, 7 daily, 4 weekly"."""
        parts = [f"last {self.keep_last}"] if self.keep_last else []
        parts += [f"{count} {name}" for name, _, count in self.periods() if count]
        if self.keep_within_s:
            parts.append(f"within {duration_text(self.keep_within_s)}")
        return ", ".join(parts) or "newest only"

    def periods(self) -> tuple[tuple[str, str, int], ...]:
        """(name, strftime format of its UTC bucket, how many buckets keep a point) per period."""
        return (
            ("hourly", "%Y-%m-%dT%H", self.keep_hourly),
            ("daily", "%Y-%m-%d", self.keep_daily),
            # The ISO year (%G), not the calendar year: 2027-01-01 is in week 2026-W53.
            ("weekly", "%G-W%V", self.keep_weekly),
            ("monthly", "%Y-%m", self.keep_monthly),
        )

    def _counts(self) -> tuple[int, ...]:
        return (self.keep_last, *(count for _, _, count in self.periods()))


@dataclass(frozen=True)
class Verdict:
    """What retention does with one point: kept for every reason listed, or deleted (none)."""

    point_id: str
    created: float  # unix time
    keep: bool
    reasons: tuple[str, ...]


def apply_policy(
    points: Sequence[tuple[str, float]],
    policy: RetentionPolicy,
    protected: Mapping[str, str] | None = None,
) -> list[Verdict]:
    """A verdict per point of `points` ((id, created), in any order), oldest first.

    `protected` maps a point id to why it must be kept; ids that are not among the points are
    ignored. Raises ValueError when two points have the same id.
    """
    oldest_first = sorted(points, key=lambda point: (point[1], point[0]))
    reasons: dict[str, list[str]] = {point_id: [] for point_id, _ in oldest_first}
    if len(reasons) != len(oldest_first):
        raise ValueError("two restore points have the same id")
    newest_first = oldest_first[::-1]
    for point_id, reason in _reasons(newest_first, policy, protected or {}):
        reasons[point_id].append(reason)
    return [
        Verdict(point_id, created, bool(reasons[point_id]), tuple(reasons[point_id]))
        for point_id, created in oldest_first
    ]


def _reasons(
    newest_first: Sequence[tuple[str, float]],
    policy: RetentionPolicy,
    protected: Mapping[str, str],
) -> list[tuple[str, str]]:
    """(point id, reason) for every rule that keeps a point, rule by rule."""
    if not newest_first:
        return []
    newest_id, newest_created = newest_first[0]
    found = [(newest_id, "newest")]
    found += [(point_id, "last") for point_id, _ in newest_first[: policy.keep_last]]
    for name, bucket_format, count in policy.periods():
        found += [
            (point_id, f"{name} {bucket}")
            for point_id, bucket in _newest_of_buckets(newest_first, bucket_format, count)
        ]
    if policy.keep_within_s:
        oldest_kept = newest_created - policy.keep_within_s
        within = f"within {duration_text(policy.keep_within_s)}"
        found += [
            (point_id, within) for point_id, created in newest_first if created >= oldest_kept
        ]
    found += [
        (point_id, protected[point_id]) for point_id, _ in newest_first if point_id in protected
    ]
    return found


def _newest_of_buckets(
    newest_first: Sequence[tuple[str, float]], bucket_format: str, count: int
) -> list[tuple[str, str]]:
    """(point id, bucket) of the newest point in each of the `count` newest buckets."""
    kept: dict[str, str] = {}  # bucket -> its newest point
    for point_id, created in newest_first:
        if len(kept) == count:
            break
        bucket = datetime.fromtimestamp(created, UTC).strftime(bucket_format)
        kept.setdefault(bucket, point_id)
    return [(point_id, bucket) for bucket, point_id in kept.items()]
