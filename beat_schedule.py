"""The periodic schedule, built from hamal.conf: one scan every [period] interval.

RedBeat keeps it in Redis under a lock, so any number of beats emit one scan per interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hamal_workers.config import Settings

SCAN_ENTRY = "hamal-period-scan"
MASS_ENTRY = "hamal-period-mass"
# How often the proxy talks to Mass (heartbeat, task list, status reports) in Mass mode.
MASS_EVERY_S = 15.0


def build(settings: Settings) -> dict[str, dict[str, Any]]:
    interval = float(settings.period.interval)
    entries: dict[str, dict[str, Any]] = {
        SCAN_ENTRY: {
            "task": "hamal.period.scan",
            "schedule": interval,
            # A scan still queued when the next one is due is worthless: drop it.
            "options": {"queue": "period", "expires": interval},
        }
    }
    if settings.mass.mass_endpoint:
        entries[MASS_ENTRY] = {
            "task": "hamal.period.mass",
            "schedule": MASS_EVERY_S,
            "options": {"queue": "period", "expires": MASS_EVERY_S},
        }
    return entries
