"""hamal.vm.finalize: commit the restore point, drop the older snapshot, record the chain.

Sent by the disk task that settled the run's last disk, and again by the scan when a
finalize died. Every step is idempotent, and the point is committed before any Redis
record says so, so a crash at any step is repaired by running it again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hamal_workers.celery_app import app
from hamal_workers.platforms.base import Platform, Snapshot
from hamal_workers.state import COMMITTED, DONE, FAILED, DiskStatus, LeaseKeeper, State
from hamal_workers.targets.base import TargetError
from hamal_workers.tasks.base import TRANSIENT_ERRORS, HamalTask

log = logging.getLogger("hamal.period")


@app.task(name="hamal.vm.finalize", bind=True, base=HamalTask, autoretry_for=TRANSIENT_ERRORS)
def finalize_run(self: HamalTask, run_id: str) -> dict[str, Any]:
    state = self.state
    lease = state.finalize_lease(run_id, self.lease_ttl)
    if not lease.acquire():
        return {"status": "skipped", "reason": "another finalize holds the lease"}
    try:
        with LeaseKeeper(lease):
            run = state.run(run_id)
            if run.get("status") in (COMMITTED, FAILED):
                return {"status": run["status"], "run_id": run_id}
            if state.pending_disks(run_id):
                return {"status": "waiting", "pending": state.pending_disks(run_id)}
            return _finalize(self, run_id, run)
    finally:
        lease.release()


def _finalize(task: HamalTask, run_id: str, run: dict[str, str]) -> dict[str, Any]:
    state = task.state
    vm_id, vm_name = run["vm_id"], run["vm_name"]
    snapshot = Snapshot.from_json(json.loads(run["snapshot"]))
    disks = {d: state.disk(run_id, d) for d in state.run_disks(run_id)}
    failed = {d: s.fields.get("error", "") for d, s in disks.items() if s.state != DONE}
    summary: dict[str, Any] = {
        "run_id": run_id,
        "vm_id": vm_id,
        "vm_name": vm_name,
        "started": float(run.get("started") or 0),
        "finished": time.time(),
        "disks": {d: s.fields for d, s in disks.items()},
    }
    if failed:
        error = "; ".join(f"{d}: {e}" for d, e in failed.items())
        return _fail(task, run_id, run, snapshot, summary, error)
    return _commit(task, run_id, run, snapshot, summary, disks)


def _fail(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    snapshot: Snapshot,
    summary: dict[str, Any],
    error: str,
) -> dict[str, Any]:
    state = task.state
    vm_id, vm_name = run["vm_id"], run["vm_name"]
    task.target.discard_point(vm_id, run_id)
    _drop_snapshot(state, task.platform(run["platform"]), snapshot)
    state.drop_checkpoints(run_id, summary["disks"])
    summary.update(status=FAILED, error=error)
    state.set_run_fields(run_id, error=error)
    state.finish_run(run_id, vm_id, FAILED, summary)
    task.vm_log(vm_name, vm_id).error("run %s: failed, no restore point: %s", run_id, error)
    log.error("vm %s: run %s failed: %s", vm_name, run_id, error)
    return {"status": FAILED, "run_id": run_id, "error": error}


def _commit(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    snapshot: Snapshot,
    summary: dict[str, Any],
    disks: dict[str, DiskStatus],
) -> dict[str, Any]:
    state = task.state
    vm_id, vm_name = run["vm_id"], run["vm_name"]
    vlog = task.vm_log(vm_name, vm_id)
    platform = task.platform(run["platform"])
    target = task.target
    try:
        target.sync()
        info = target.commit_point(
            vm_id,
            vm_name,
            run_id,
            snapshot.created,
            {"platform": platform.name, "snapshot_id": snapshot.snapshot_id},
        )
    except TargetError as exc:
        # The store refused the point (nothing staged, a bad manifest, a failed barrier):
        # finalizing again would fail the same way, so the run fails now, loudly.
        return _fail(task, run_id, run, snapshot, summary, f"commit refused: {exc}")
    for disk in disks:
        chain = state.chain(vm_id, disk)
        if not chain or chain[-1]["point_id"] != run_id:
            state.push_chain(
                vm_id,
                disk,
                {
                    "point_id": run_id,
                    "snapshot_id": snapshot.snapshot_id,
                    "created": snapshot.created,
                },
            )
    previous = state.vm(vm_id).get("base_snapshot")
    if previous:
        old = Snapshot.from_json(json.loads(previous))
        if old.snapshot_id != snapshot.snapshot_id:
            _drop_snapshot(state, platform, old)
    if platform.keeps_base_snapshot:
        state.set_vm_fields(vm_id, base_snapshot=json.dumps(snapshot.to_json()))
    else:
        state.set_vm_fields(vm_id, base_snapshot="")
        _drop_snapshot(state, platform, snapshot)
    if task.settings.sync.save_local_snapshot_metadata:
        _save_local_metadata(task, vm_id, run_id, snapshot, info.disks)
    state.set_vm_fields(vm_id, last_point=run_id, last_success=str(time.time()))
    state.drop_checkpoints(run_id, disks)
    summary.update(status=COMMITTED, point_id=info.point_id)
    state.finish_run(run_id, vm_id, COMMITTED, summary)
    total_read = sum(int(s.fields.get("bytes_read") or 0) for s in disks.values())
    total_stored = sum(int(s.fields.get("bytes_stored") or 0) for s in disks.values())
    vlog.info(
        "run %s: restore point %s committed (%d disks, %d bytes read, %d stored)",
        run_id,
        info.point_id,
        len(disks),
        total_read,
        total_stored,
    )
    log.info("vm %s: restore point %s committed", vm_name, info.point_id)
    return {"status": COMMITTED, "run_id": run_id, "point_id": info.point_id}


def _save_local_metadata(
    task: HamalTask, vm_id: str, point_id: str, snapshot: Snapshot, disks: dict[str, int]
) -> None:
    """[sync] save_local_snapshot_metadata: the point's snapshot record, beside Redis's copy."""
    folder = Path(task.settings.default.hamal_lib_dir) / "metadata" / vm_id
    folder.mkdir(parents=True, exist_ok=True)
    record = {"point_id": point_id, "snapshot": snapshot.to_json(), "disks": disks}
    tmp = folder / f".{point_id}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, folder / f"{point_id}.json")


def _drop_snapshot(state: State, platform: Platform, snapshot: Snapshot) -> None:
    platform.delete_snapshot(snapshot)
    state.snapshot_deleted(snapshot.key)
