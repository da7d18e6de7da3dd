"""hamal.vm.sync: lease the VM, snapshot it, plan its disks, fan out one task per disk.

Sent with a VM (`hamal sync`), or without one by the scan: then it takes the request
that waits longest from hamal:requests and, while more wait, sends the next such task.

Idempotent: the VM's lease makes one delivery the one that works; a duplicate finds
the lease taken or the VM's run active and returns. Claiming the VM and creating its
run are one write, fenced by the lease, so no crash leaves a VM claimed by no run.
Every outcome is published as a `vm-sync` event, so `hamal sync --wait` hears it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hamal_workers import faults
from hamal_workers.celery_app import app
from hamal_workers.platforms.base import Platform, Snapshot, new_run_id, snapshot_name
from hamal_workers.state import (
    FAILED,
    STARTING,
    SYNCING,
    Lease,
    LeaseKeeper,
    LeaseLost,
    Writes,
    key,
)
from hamal_workers.tasks.base import PRIORITY_SCHEDULED, TRANSIENT_ERRORS, HamalTask

log = logging.getLogger("hamal.period")


def send_pull() -> None:
    """One more vm.sync that takes the oldest waiting request (see tasks/scan.py)."""
    sync_vm.apply_async(kwargs={}, priority=PRIORITY_SCHEDULED)


@app.task(name="hamal.vm.sync", bind=True, base=HamalTask)
def sync_vm(self: HamalTask, vm_id: str = "", platform: str = "") -> dict[str, Any]:
    """Sync `vm_id` (`hamal sync`), or, without one, the VM whose request waits longest."""
    if vm_id:
        return _sync_vm(self, vm_id, platform)
    state = self.state
    taken = state.take_request()
    if taken is None:
        return {"status": "idle"}
    try:
        return _sync_vm(self, taken, state.vm(taken).get("platform", ""))
    finally:
        # The chain goes on while requests wait; a lost link is replaced by the next scan.
        if state.requests_waiting():
            send_pull()


def _sync_vm(self: HamalTask, vm_id: str, platform: str) -> dict[str, Any]:
    state = self.state
    lease = state.vm_lease(vm_id, self.lease_ttl)
    if not lease.acquire():
        return _told(self, {"status": "busy", "vm_id": vm_id})
    try:
        with LeaseKeeper(lease) as keeper:
            active = state.vm(vm_id).get("active_run")
            if active:
                return _told(self, {"status": "running", "vm_id": vm_id, "run_id": active})
            return _told(self, start_run(self, vm_id, platform, lease, keeper))
    except LeaseLost as exc:
        log.warning("vm %s: %s", vm_id, exc)
        return _told(self, {"status": "lease-lost", "vm_id": vm_id})
    except TRANSIENT_ERRORS as exc:
        log.warning("vm %s: sync not started, retried later: %s", vm_id, exc)
        raise
    except Exception as exc:
        # Refused before a run existed (the VM is gone, the platform refused): say so.
        log.error("vm %s: sync not started: %s: %s", vm_id, type(exc).__name__, exc)
        error = f"{type(exc).__name__}: {exc}"
        state.mass_vm_report(vm_id, "failed", error=error[:500])
        return _told(self, {"status": FAILED, "vm_id": vm_id, "error": error})
    finally:
        lease.release()


def _told(task: HamalTask, result: dict[str, Any]) -> dict[str, Any]:
    task.state.publish({"event": "vm-sync", **result})
    return result


def start_run(
    task: HamalTask, vm_id: str, platform_name: str, lease: Lease, keeper: LeaseKeeper
) -> dict[str, Any]:
    state = task.state
    with task.platform(platform_name, vm_id) as platform:
        vm = platform.vm(vm_id)
        run_id = new_run_id()
        vlog = task.vm_log(vm.name, vm.vm_id)
        intent = Snapshot(snapshot_name(run_id), vm.vm_id, platform.name, time.time(), {})
        writes = Writes()
        writes.hset(key("vm", vm_id), {"name": vm.name, "platform": platform.name})
        writes.add("SADD", key("vms"), vm_id)
        state.start_run(
            writes,
            vm_id,
            run_id,
            {
                "vm_id": vm.vm_id,
                "vm_name": vm.name,
                "platform": platform.name,
                "point_id": run_id,
                "started": str(time.time()),
            },
        )
        # Recorded before it exists: a crash during creation leaves a record the sweep acts on.
        writes.add(
            "HSET", key("snapshots"), intent.key, json.dumps({**intent.to_json(), "run_id": run_id})
        )
        state.apply(writes, lease)
        vlog.info("run %s: started (%d disks)", run_id, len(vm.disks))
        log.info("vm %s (%s): run %s started", vm.name, vm.vm_id, run_id)
        faults.point("after-claim")
        try:
            snapshot = platform.create_snapshot(vm, intent.snapshot_id)
            keeper.check()
            faults.point("after-snapshot")
            writes = Writes()
            writes.add(
                "HSET",
                key("snapshots"),
                snapshot.key,
                json.dumps({**snapshot.to_json(), "run_id": run_id}, sort_keys=True),
            )
            disks = [disk.name for disk in vm.disks]
            state.plan_disks(writes, run_id, disks)
            fields = {"snapshot": json.dumps(snapshot.to_json()), "status": SYNCING}
            if vm.skipped:
                fields["skipped"] = json.dumps(list(vm.skipped))
            writes.hset(key("run", run_id), fields)
            state.apply(writes, lease)
            vlog.info("run %s: snapshot %s created", run_id, snapshot.snapshot_id)
            for why in vm.skipped:
                vlog.warning("run %s: not synced: %s", run_id, why)
            if snapshot.consistency == "disk":
                vlog.warning(
                    "run %s: disks not crash-consistent with each other: %s",
                    run_id,
                    snapshot.consistency_note or "each disk was snapshotted on its own",
                )
        except BaseException as exc:
            _undo(task, platform, intent, run_id, vm.vm_id, vm.name, exc, lease)
            raise
    from hamal_workers.tasks.disk_sync import dispatch_disk

    faults.point("after-plan")
    for disk_name in disks:
        dispatch_disk(run_id, vm.vm_id, vm.name, disk_name, platform.name)
    # Until this is set, a scan that finds the VM lease gone dispatches the disks itself.
    state.set_run_fields(run_id, lease, dispatched="1")
    log.info(
        "vm %s: run %s dispatched %d disk tasks to queue %s",
        vm.name,
        run_id,
        len(disks),
        platform.name,
    )
    state.publish({"event": "run-started", "run_id": run_id, "vm_id": vm.vm_id})
    return {"status": STARTING, "vm_id": vm.vm_id, "run_id": run_id, "disks": sorted(disks)}


def _undo(
    task: HamalTask,
    platform: Platform,
    intent: Snapshot,
    run_id: str,
    vm_id: str,
    vm_name: str,
    exc: BaseException,
    lease: Lease,
) -> None:
    """Undo the run entirely: a retry (transient errors) starts a clean one."""
    state = task.state
    platform.delete_snapshot(intent)
    state.snapshot_deleted(intent.key)
    reason = f"{type(exc).__name__}: {exc}"
    summary = {"run_id": run_id, "status": FAILED, "error": reason, "finished": time.time()}
    try:
        state.set_run_fields(run_id, lease, error=reason)
        state.finish_run(run_id, vm_id, FAILED, summary, lease)
    except LeaseLost:
        pass  # someone else owns the VM now; the scan finishes what is left of this run
    task.vm_log(vm_name, vm_id).error(
        "run %s: failed before any disk was synced: %s", run_id, reason
    )
    log.error("vm %s: run %s failed: %s", vm_name, run_id, reason)
