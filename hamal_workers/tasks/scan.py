"""hamal.period.scan: every interval, start due VMs and repair what died since the last scan.

Repairs, because the broker's redelivery (the visibility timeout) is hours away by design:
- a disk that was running and whose lease expired (its worker died) is dispatched again
  and resumes from its checkpoint;
- a run whose disks are all settled but that was never finalized is finalized;
- a run that died while snapshotting is failed and its snapshot deleted;
- a run whose vm.sync died before sending every disk task gets them sent;
- a snapshot the proxy created that no run or VM needs any more is deleted (the sweep).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hamal_workers.celery_app import app
from hamal_workers.platforms import enabled_platforms
from hamal_workers.platforms.base import PlatformError, Snapshot
from hamal_workers.state import FAILED, FINALIZING, RUNNING, STARTING, SYNCING
from hamal_workers.tasks.base import HamalTask

log = logging.getLogger("hamal.period")


@app.task(name="hamal.period.scan", bind=True, base=HamalTask)
def scan(self: HamalTask) -> dict[str, Any]:
    number = self.state.record_scan()
    started = _start_due_vms(self)
    repaired = _repair_runs(self)
    swept = _sweep_snapshots(self)
    log.info(
        "scan %d: %d runs started, %d repairs, %d snapshots swept",
        number,
        len(started),
        len(repaired),
        len(swept),
    )
    return {"scan": number, "started": started, "repaired": repaired, "swept": swept}


def _start_due_vms(task: HamalTask) -> list[str]:
    from hamal_workers.tasks.vm_sync import sync_vm

    state = task.state
    interval = float(task.settings.period.interval)
    started = []
    for name in enabled_platforms(task.settings):
        try:
            vms = task.platform(name).discover()
        except PlatformError as exc:
            log.error("scan: platform %s: %s", name, exc)
            continue
        for vm in vms:
            state.record_vm(vm.vm_id, vm.name, vm.platform)
            if state.vm(vm.vm_id).get("active_run"):
                continue
            sync_vm.apply_async(
                kwargs={"vm_id": vm.vm_id, "platform": vm.platform}, expires=interval
            )
            started.append(vm.name)
    return started


def _repair_runs(task: HamalTask) -> list[str]:
    from hamal_workers.tasks.disk_sync import dispatch_disk
    from hamal_workers.tasks.finalize import finalize_run

    state = task.state
    ttl = task.lease_ttl
    repaired = []
    for run_id in state.active_runs():
        run = state.run(run_id)
        status, vm_id, vm_name = run.get("status"), run.get("vm_id", ""), run.get("vm_name", "")
        if status == STARTING:
            age = time.time() - float(run.get("started") or 0)
            if age > ttl and not state.vm_lease(vm_id, ttl).held_by_anyone():
                _fail_stalled_start(task, run_id, run)
                repaired.append(f"{run_id}: failed a run that died while snapshotting")
            continue
        pending = state.pending_disks(run_id)
        if status in (SYNCING, FINALIZING) and not pending:
            if not state.finalize_lease(run_id, ttl).held_by_anyone():
                finalize_run.apply_async(kwargs={"run_id": run_id})
                repaired.append(f"{run_id}: finalize sent again")
            continue
        if not run.get("dispatched") and not state.vm_lease(vm_id, ttl).held_by_anyone():
            # vm.sync died between planning and sending the disk tasks: send them.
            for disk in pending:
                dispatch_disk(run_id, vm_id, vm_name, disk, run.get("platform", ""))
            state.set_run_fields(run_id, dispatched="1")
            repaired.append(f"{run_id}: disk tasks sent for a run whose vm.sync died")
            continue
        for disk in pending:
            if state.disk(run_id, disk).state != RUNNING:
                continue  # queued: its message is still on the way to a worker
            if state.disk_lease(run_id, disk, ttl).held_by_anyone():
                continue
            state.redispatched(run_id, disk)
            dispatch_disk(run_id, vm_id, vm_name, disk, run.get("platform", ""))
            log.warning(
                "scan: run %s disk %s: lease expired (worker gone?): dispatched again", run_id, disk
            )
            task.vm_log(vm_name, vm_id).warning(
                "run %s: disk %s: its worker stopped renewing the lease; dispatched again, "
                "it resumes from its checkpoint",
                run_id,
                disk,
            )
            repaired.append(f"{run_id}/{disk}: dispatched again")
    return repaired


def _fail_stalled_start(task: HamalTask, run_id: str, run: dict[str, str]) -> None:
    state = task.state
    reason = "the task creating the snapshot stopped before the disks were planned"
    state.set_run_fields(run_id, error=reason)
    state.finish_run(
        run_id, run.get("vm_id", ""), FAILED, {"run_id": run_id, "status": FAILED, "error": reason}
    )
    log.error("scan: run %s of vm %s: %s", run_id, run.get("vm_name"), reason)


def _sweep_snapshots(task: HamalTask) -> list[str]:
    """Delete snapshots the proxy created that no active run and no VM's base refers to."""
    state = task.state
    needed = set()
    for vm_id in state.vm_ids():
        raw = state.vm(vm_id).get("base_snapshot")
        if raw:
            needed.add(Snapshot.from_json(json.loads(raw)).key)
    active = set(state.active_runs())
    swept = []
    for snap_key, record in state.live_snapshots().items():
        if snap_key in needed or record.get("run_id") in active:
            continue
        snapshot = Snapshot.from_json({k: v for k, v in record.items() if k != "run_id"})
        try:
            task.platform(snapshot.platform).delete_snapshot(snapshot)
        except PlatformError as exc:
            log.error("sweep: snapshot %s: %s", snap_key, exc)
            continue
        state.snapshot_deleted(snap_key)
        log.warning("sweep: deleted leftover snapshot %s", snap_key)
        swept.append(snap_key)
    return swept
