"""hamal.period.mass: one exchange with the Mass management service (`hamal_workers/mass.py`),
sent by the beat every MASS_EVERY_S while `[mass] mass_endpoint` is set.

One exchange at a time (a lease): a slow Mass must not stack exchanges in the period queue.
"""

from __future__ import annotations

from typing import Any

from beat_schedule import MASS_EVERY_S
from hamal_workers.celery_app import app
from hamal_workers.mass import MassLink
from hamal_workers.tasks.base import HamalTask


@app.task(name="hamal.period.mass", bind=True, base=HamalTask)
def mass_exchange(self: HamalTask) -> dict[str, Any]:
    if not self.settings.mass.mass_endpoint:
        return {"status": "skipped", "reason": "[mass] mass_endpoint is empty: local mode"}
    lease = self.state.mass_lease(max(self.lease_ttl, 2 * MASS_EVERY_S))
    if not lease.acquire():
        return {"status": "skipped", "reason": "another exchange with Mass is running"}
    try:
        summary = MassLink(self.settings, self.state).exchange()
    finally:
        lease.release()
    self.state.publish(summary)
    return summary
