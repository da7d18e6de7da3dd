"""hamal.gc: one garbage collection pass, sent by the scan when one is due (hamal_workers/gc.py)."""

from __future__ import annotations

from typing import Any

from hamal_workers.celery_app import app
from hamal_workers.gc import collect_exclusively, pass_due, tell_vms, young_grace
from hamal_workers.tasks.base import PRIORITY_SCHEDULED, HamalTask


@app.task(name="hamal.gc", bind=True, base=HamalTask)
def gc_task(self: HamalTask) -> dict[str, Any]:
    self.state.gc_taken()
    young_s = young_grace(float(self.settings.data_sync_v2.fsync_period_frequency))
    report = collect_exclusively(self.target, self.state, self.lease_ttl, young_s)
    if report is None:
        return {"status": "skipped", "reason": "another garbage collection is running"}
    tell_vms(self.state, self.settings, report)
    return {"status": "refused" if report.refused else "done", **report.as_dict()}


def send_gc_if_due(task: HamalTask) -> bool:
    """From the scan: one pass at a time, behind the work that finishes runs."""
    state = task.state
    if not pass_due(state) or state.gc_lease(task.lease_ttl).held_by_anyone():
        return False
    # One in the queue at a time; if it is lost, the next scan after the ttl sends another.
    if not state.claim_gc_send(2 * float(task.settings.period.interval)):
        return False
    gc_task.apply_async(priority=PRIORITY_SCHEDULED)
    return True
