"""When a VM whose runs keep failing is tried again: the scan and `hamal status` agree on it.

After n failed runs in a row a VM waits interval x 2^(n-1) (at most an hour) after its
last failure. A run that failed because the store is full waits until the store has
room again (TARGET_ROOM_MARGIN more than when it filled up), at most an hour: reading
the whole disk again every interval would only fill the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MAX_BACKOFF_S = 3600
TARGET_ROOM_MARGIN = 256 * 1024 * 1024


@dataclass(frozen=True)
class Backoff:
    until: float  # unix time of the next try
    reason: str  # what an operator reads in `hamal status`


def backoff(
    record: dict[str, str], interval: float, now: float, free_bytes: Callable[[], int | None]
) -> Backoff | None:
    """The VM's backoff, or None when it may sync now. `free_bytes` is asked only if needed."""
    failures = int(float(record.get("failures") or 0))
    if failures <= 0:
        return None
    failed_at = float(record.get("last_failed_at") or 0)
    full_at = record.get("target_full_free")
    if full_at:
        free = free_bytes()
        if free is not None and free >= float(full_at) + TARGET_ROOM_MARGIN:
            return None
        until = failed_at + MAX_BACKOFF_S
        reason = "target full: waiting for room in the store"
    else:
        until = failed_at + min(interval * 2 ** (failures - 1), MAX_BACKOFF_S)
        reason = f"backing off after {failures} failed run{'s' if failures > 1 else ''} in a row"
    return Backoff(until, reason) if now < until else None
