"""hamal.vm.sync: lease the VM, snapshot it, plan its disks, fan out one task per disk."""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from hamal_workers.celery_app import app
from hamal_workers.platforms.base import Snapshot
from hamal_workers.state import FAILED, STARTING, SYNCING, LeaseKeeper
from hamal_workers.tasks.base import TRANSIENT_ERRORS, HamalTask

log = logging.getLogger("hamal.period")


def new_run_id(now: float | None = None) -> str:
    """Sortable by time, unique across proxies: it is also the restore point id."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now or time.time()))
    return f"{stamp}-{secrets.token_hex(3)}"


@app.task(name="hamal.vm.sync", bind=True, base=HamalTask, autoretry_for=TRANSIENT_ERRORS)
def sync_vm(self: HamalTask, vm_id: str, platform: str) -> dict[str, Any]:
    state = self.state
    lease = state.vm_lease(vm_id, self.lease_ttl)
    if not lease.acquire():
        return {"status": "busy", "vm_id": vm_id}
    try:
        with LeaseKeeper(lease):
            active = state.vm(vm_id).get("active_run")
            if active:
                return {"status": "running", "vm_id": vm_id, "run_id": active}
            return start_run(self, vm_id, platform)
    finally:
        lease.release()


def start_run(task: HamalTask, vm_id: str, platform_name: str) -> dict[str, Any]:
    state = task.state
    platform = task.platform(platform_name)
    vm = platform.vm(vm_id)
    run_id = new_run_id()
    if not state.claim_vm_run(vm_id, run_id):
        return {"status": "running", "vm_id": vm_id}
    vlog = task.vm_log(vm.name, vm.vm_id)
    state.record_vm(vm.vm_id, vm.name, platform.name)
    vm_record = state.vm(vm_id)
    state.create_run(
        run_id,
        {
            "vm_id": vm.vm_id,
            "vm_name": vm.name,
            "platform": platform.name,
            "point_id": run_id,
            "started": str(time.time()),
            "base_snapshot": vm_record.get("base_snapshot", ""),
        },
    )
    vlog.info("run %s: started (%d disks)", run_id, len(vm.disks))
    log.info("vm %s (%s): run %s started", vm.name, vm.vm_id, run_id)
    intent = Snapshot(f"hamal-{run_id}", vm.vm_id, platform.name, time.time(), {})
    # Recorded before it exists: a crash during creation leaves a record the sweep acts on.
    state.snapshot_created(intent.key, {**intent.to_json(), "run_id": run_id})
    try:
        snapshot = platform.create_snapshot(vm, intent.snapshot_id)
        state.snapshot_created(snapshot.key, {**snapshot.to_json(), "run_id": run_id})
        vlog.info("run %s: snapshot %s created", run_id, snapshot.snapshot_id)
        disks = {}
        for disk in vm.disks:
            chain = state.chain(vm.vm_id, disk.name)
            disks[disk.name] = {"base_point": chain[-1]["point_id"] if chain else ""}
        state.plan_disks(run_id, disks)
        state.set_run_fields(run_id, snapshot=json.dumps(snapshot.to_json()), status=SYNCING)
    except BaseException as exc:
        # Undo the run entirely: a retry (transient errors) starts a clean one.
        platform.delete_snapshot(intent)
        state.snapshot_deleted(intent.key)
        reason = f"{type(exc).__name__}: {exc}"
        state.set_run_fields(run_id, error=reason)
        state.finish_run(
            run_id, vm.vm_id, FAILED, {"run_id": run_id, "status": FAILED, "error": reason}
        )
        vlog.error("run %s: failed before any disk was synced: %s", run_id, reason)
        log.error("vm %s: run %s failed: %s", vm.name, run_id, reason)
        raise
    from hamal_workers.tasks.disk_sync import dispatch_disk

    for disk_name in disks:
        dispatch_disk(run_id, vm.vm_id, vm.name, disk_name, platform.name)
    # Until this is set, a scan that finds the VM lease gone dispatches the disks itself.
    state.set_run_fields(run_id, dispatched="1")
    log.info(
        "vm %s: run %s dispatched %d disk tasks to queue %s",
        vm.name,
        run_id,
        len(disks),
        platform.name,
    )
    state.publish({"event": "run-started", "run_id": run_id, "vm_id": vm.vm_id})
    return {"status": STARTING, "vm_id": vm.vm_id, "run_id": run_id, "disks": sorted(disks)}
