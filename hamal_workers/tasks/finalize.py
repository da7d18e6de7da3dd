"""hamal.vm.finalize: commit the restore point, record the tokens, drop the older snapshot.

Sent by the disk task that settled the run's last disk, and again by the scan when a
finalize died. Every step is idempotent, and the point is committed in the store
before any Redis record says so, so a crash at any step is repaired by running it again.
The order is the one docs/CONTRACTS.md gives: commit -> record tokens -> drop the old
snapshot.

It never loops: a disk whose staged manifest is missing is synced again (a bounded
number of times); a failure that is not transient is retried with backoff a bounded
number of times, then the run fails cleanly (snapshot removed, VM freed, reason in its
status and log).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hamal_workers import faults, point_metadata
from hamal_workers.celery_app import app
from hamal_workers.mass_sources import mass_mode, task_of_vm
from hamal_workers.platforms.base import PlatformError, Snapshot
from hamal_workers.prune import base_reasons, delete_expired, plan_retention
from hamal_workers.retention import RetentionPolicy
from hamal_workers.state import (
    COMMITTED,
    DONE,
    FAILED,
    DiskStatus,
    Lease,
    LeaseKeeper,
    LeaseLost,
    Writes,
    key,
)
from hamal_workers.targets.base import MissingStagedDisk, TargetError, TargetFull
from hamal_workers.tasks.base import TRANSIENT_ERRORS, HamalTask
from hamal_workers.tasks.disk_sync import TARGET_FULL, dispatch_disk

log = logging.getLogger("hamal.period")
MAX_FINALIZE_ATTEMPTS = 5
# How often a disk whose staged manifest vanished is synced again before the run fails.
MAX_RESTAGES = 2


class FinalizeRetry(Exception):
    """A finalize that failed and will be tried again (attempt n of MAX_FINALIZE_ATTEMPTS)."""


@app.task(name="hamal.vm.finalize", bind=True, base=HamalTask)
def finalize_run(self: HamalTask, run_id: str) -> dict[str, Any]:
    state = self.state
    lease = state.finalize_lease(run_id, self.lease_ttl)
    if not lease.acquire():
        return {"status": "skipped", "reason": "another finalize holds the lease"}
    try:
        with LeaseKeeper(lease):
            run = state.run(run_id)
            if run.get("status") in (COMMITTED, FAILED) or not run:
                return {"status": run.get("status") or "unknown", "run_id": run_id}
            if state.pending_disks(run_id):
                return {"status": "waiting", "pending": state.pending_disks(run_id)}
            attempt = _count_attempt(self, run_id, lease)
            try:
                return _finalize(self, run_id, run, lease)
            except (LeaseLost, *TRANSIENT_ERRORS):
                raise
            except Exception as exc:
                return _after_error(self, run_id, run, lease, attempt, exc)
    except LeaseLost as exc:
        log.warning("run %s: finalize stopped: %s", run_id, exc)
        return {"status": "lease-lost", "run_id": run_id}
    finally:
        lease.release()


def _count_attempt(task: HamalTask, run_id: str, lease: Lease) -> int:
    writes = Writes()
    at = writes.add("HINCRBY", key("run", run_id), "finalize_attempts", 1)
    return int(task.state.apply(writes, lease)[at])


def _after_error(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    lease: Lease,
    attempt: int,
    exc: Exception,
) -> dict[str, Any]:
    reason = f"{type(exc).__name__}: {exc}"
    if attempt >= MAX_FINALIZE_ATTEMPTS:
        error = f"finalize gave up after {attempt} attempts: {reason}"
        return _fail(task, run_id, run, lease, error)
    task.state.set_run_fields(run_id, lease, finalize_error=reason)
    task.vm_log(run["vm_name"], run["vm_id"]).warning(
        "run %s: finalize attempt %d of %d failed, trying again: %s",
        run_id,
        attempt,
        MAX_FINALIZE_ATTEMPTS,
        reason,
    )
    # Short waits: the operator sees a failed run within minutes, not hours.
    countdown = min(float(task.settings.period.interval), 2.0**attempt)
    raise task.retry(exc=FinalizeRetry(reason), countdown=countdown, max_retries=None)


def _finalize(task: HamalTask, run_id: str, run: dict[str, str], lease: Lease) -> dict[str, Any]:
    state = task.state
    names = state.run_disks(run_id)
    disks = dict(zip(names, state.disks([(run_id, d) for d in names]), strict=True))
    failed = {d: s for d, s in disks.items() if s.state != DONE}
    if failed:
        error = "; ".join(f"{d}: {s.fields.get('error', '')}" for d, s in failed.items())
        full = any(s.fields.get("error_kind") == TARGET_FULL for s in failed.values())
        return _fail(task, run_id, run, lease, error, target_full=full)
    return _commit(task, run_id, run, lease, disks)


def _summary(run_id: str, run: dict[str, str], disks: dict[str, DiskStatus]) -> dict[str, Any]:
    summary = {
        "run_id": run_id,
        "vm_id": run["vm_id"],
        "vm_name": run["vm_name"],
        "started": float(run.get("started") or 0),
        "finished": time.time(),
        "disks": {d: s.fields for d, s in disks.items()},
    }
    skipped = json.loads(run.get("skipped") or "[]")
    if skipped:
        summary["skipped"] = skipped
    return summary


def _fail(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    lease: Lease,
    error: str,
    *,
    target_full: bool = False,
) -> dict[str, Any]:
    state = task.state
    vm_id, vm_name = run["vm_id"], run["vm_name"]
    try:
        task.target.discard_point(vm_id, run_id)
    except TargetError as exc:
        # The store is out of reach (S3 down): the run still ends and its snapshot still
        # goes; what it staged is the sweep's to remove once the store answers.
        log.warning("vm %s: run %s: staged data left for the sweep: %s", vm_name, run_id, exc)
    if run.get("snapshot"):
        snapshot = Snapshot.from_json(json.loads(run["snapshot"]))
        with task.platform(run["platform"], run.get("vm_id", "")) as platform:
            platform.delete_snapshot(snapshot)
        state.snapshot_deleted(snapshot.key)
    names = state.run_disks(run_id)
    disks = dict(zip(names, state.disks([(run_id, d) for d in names]), strict=True))
    summary = _summary(run_id, run, disks)
    summary.update(status=FAILED, error=error)
    vm_fields = {}
    if target_full:
        # The scan lets this VM try again once the store has room (see tasks/scan.py).
        vm_fields["target_full_free"] = str(task.target.free_bytes() or 0)
    state.drop_checkpoints(run_id, names)
    state.set_run_fields(run_id, lease, error=error)
    state.finish_run(run_id, vm_id, FAILED, summary, lease, vm_fields)
    task.vm_log(vm_name, vm_id).error("run %s: failed, no restore point: %s", run_id, error)
    log.error("vm %s: run %s failed: %s", vm_name, run_id, error)
    return {"status": FAILED, "run_id": run_id, "error": error}


def _commit(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    lease: Lease,
    disks: dict[str, DiskStatus],
) -> dict[str, Any]:
    state = task.state
    vm_id, vm_name = run["vm_id"], run["vm_name"]
    snapshot = Snapshot.from_json(json.loads(run["snapshot"]))
    vlog = task.vm_log(vm_name, vm_id)
    tokens = {disk: snapshot.token(disk) for disk in disks}
    meta: dict[str, object] = {
        "platform": run["platform"],
        "snapshot_id": snapshot.snapshot_id,
        "tokens": tokens,
    }
    # Whether the disks were caught at one instant, and what of the VM was not synced.
    if snapshot.consistency:
        meta["consistency"] = snapshot.consistency
    if snapshot.consistency_note:
        meta["consistency_note"] = snapshot.consistency_note
    skipped = json.loads(run.get("skipped") or "[]")
    if skipped:
        meta["skipped"] = skipped
    flags = {
        d: str(snapshot.disks[d]["identity"])
        for d in disks
        if snapshot.disks.get(d, {}).get("identity")
    }
    if flags:
        meta["flags"] = flags
    sync = task.settings.sync
    metadata: dict[str, Any] = {}
    if sync.save_local_snapshot_metadata or sync.upload_metadata_to_oss:
        metadata = point_metadata.build_record(
            run_id, vm_name, snapshot, {d: s.fields for d, s in disks.items()}, skipped
        )
        mass_task = task_of_vm(task.state, vm_id) if mass_mode(task.settings) else None
        if mass_task is not None:
            # What a recovery needs to re-address the VM, as Mass gave it for this point.
            metadata["mass_task"] = {"task_id": mass_task.task_id, "version": mass_task.version}
            metadata["ip_mapping"] = mass_task.ip_mapping
    if sync.save_local_snapshot_metadata:
        # Before the commit: a failure here is retried; after it, the point would exist
        # while its run failed.
        point_metadata.save_local(task.settings.default.hamal_lib_dir, metadata)
    try:
        info = task.target.commit_point(
            vm_id, vm_name, run_id, snapshot.created, sorted(disks), meta
        )
    except MissingStagedDisk as exc:
        return _restage(task, run_id, run, lease, list(exc.disks), str(exc))
    except TargetFull as exc:
        return _fail(task, run_id, run, lease, f"commit refused: {exc}", target_full=True)
    except TargetError as exc:
        # The store refused the point (a bad manifest, a failed barrier): finalizing
        # again would fail the same way, so the run fails now, loudly.
        return _fail(task, run_id, run, lease, f"commit refused: {exc}")
    faults.point("mid-finalize")
    _record_tokens_and_drop_old(task, run_id, run, lease, snapshot, tokens)
    summary = _summary(run_id, run, disks)
    summary.update(status=COMMITTED, point_id=info.point_id)
    if sync.upload_metadata_to_oss:
        summary["metadata"] = _upload_metadata(task, metadata)
    # While the run still holds the VM: no other sync of it can pick a base meanwhile.
    summary["retention"] = _apply_retention(task, vm_id, vm_name)
    state.drop_checkpoints(run_id, disks)
    state.finish_run(
        run_id,
        vm_id,
        COMMITTED,
        summary,
        lease,
        {
            "last_point": run_id,
            # The snapshot's time: how old the newest restorable state is (`hamal metrics`).
            "last_point_created": str(snapshot.created),
            "last_success": str(time.time()),
            "last_retention": json.dumps(summary["retention"], sort_keys=True),
        },
    )
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


def _apply_retention(task: HamalTask, vm_id: str, vm_name: str) -> dict[str, Any]:
    """[retention] for this VM after its commit; never fails the run, whose point exists."""
    policy = RetentionPolicy.from_settings(task.settings.retention)
    vlog = task.vm_log(vm_name, vm_id)
    try:
        scan = task.target.scan_points(vm_id)
        plans = plan_retention(scan, policy, base_reasons(task.state, vm_id), vm_id)
        deleted = delete_expired(task.target, plans[0]) if plans else []
        point_metadata.drop_local(task.settings.default.hamal_lib_dir, vm_id, deleted)
    except (TargetError, OSError, *TRANSIENT_ERRORS) as exc:
        vlog.warning("retention: nothing deleted this time: %s", exc)
        log.warning("vm %s: retention: nothing deleted this time: %s", vm_name, exc)
        return {"policy": policy.describe(), "error": str(exc), "deleted": []}
    kept = len(plans[0].kept) if plans else 0
    if deleted:
        # Their chunks go at the next two garbage collection passes.
        task.state.gc_due()
        vlog.info(
            "retention (%s): deleted %d restore points (%s), %d kept; "
            "their chunks no other point uses are freed by the next garbage collections",
            policy.describe(),
            len(deleted),
            ", ".join(deleted),
            kept,
        )
    return {"policy": policy.describe(), "deleted": deleted, "kept": kept}


def _record_tokens_and_drop_old(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    lease: Lease,
    snapshot: Snapshot,
    tokens: dict[str, str],
) -> None:
    """After the commit: the chains get the tokens, then the snapshot no one needs goes.

    Nothing here fails the run -- the point exists. A snapshot that cannot be deleted now
    keeps its record, and the sweep deletes it later.
    """
    state = task.state
    vm_id = run["vm_id"]
    with task.platform(run["platform"], run.get("vm_id", "")) as platform:
        writes = Writes()
        for disk, token in tokens.items():
            state.push_chain(
                writes,
                vm_id,
                disk,
                {
                    "point_id": run_id,
                    "snapshot_id": snapshot.snapshot_id,
                    "token": token,
                    "created": snapshot.created,
                },
            )
        previous = state.vm(vm_id).get("base_snapshot")
        base = json.dumps(snapshot.to_json()) if platform.keeps_base_snapshot else ""
        writes.hset(key("vm", vm_id), {"base_snapshot": base})
        state.apply(writes, lease)
        drop = []
        if previous:
            old = Snapshot.from_json(json.loads(previous))
            if old.snapshot_id != snapshot.snapshot_id:
                drop.append(old)
        if not platform.keeps_base_snapshot:
            drop.append(snapshot)
        else:
            try:
                platform.trim_snapshot(snapshot)
            except PlatformError as exc:
                # It goes with the whole snapshot when the next point is committed.
                log.warning("run %s: snapshot %s not trimmed yet: %s", run_id, snapshot.key, exc)
        for old in drop:
            try:
                platform.delete_snapshot(old)
            except PlatformError as exc:
                log.warning("run %s: snapshot %s stays for the sweep: %s", run_id, old.key, exc)
                continue
            state.snapshot_deleted(old.key)


def _restage(
    task: HamalTask,
    run_id: str,
    run: dict[str, str],
    lease: Lease,
    missing: list[str],
    reason: str,
) -> dict[str, Any]:
    """A disk settled as done has no readable staged manifest: sync it again, a few times."""
    restaged = int(run.get("restaged") or 0)
    if restaged >= MAX_RESTAGES:
        return _fail(task, run_id, run, lease, f"commit refused again: {reason}")
    state = task.state
    state.requeue_disks(run_id, missing, lease, f"synced again: {reason}")
    for disk in missing:
        dispatch_disk(run_id, run["vm_id"], run["vm_name"], disk, run["platform"])
    task.vm_log(run["vm_name"], run["vm_id"]).warning(
        "run %s: %s; syncing %s again", run_id, reason, ", ".join(missing)
    )
    log.warning("vm %s: run %s: %s; syncing again", run["vm_name"], run_id, reason)
    return {"status": "restaging", "run_id": run_id, "disks": missing}


def _upload_metadata(task: HamalTask, record: dict[str, Any]) -> str:
    """[sync] upload_metadata_to_oss, after the commit (the record goes beside the point).

    Never fails the run: its point exists and restores without it. What went wrong is in
    the run's summary and the VM's log, and `hamal points --json` shows no metadata.
    """
    try:
        task.target.save_point_metadata(record["vm_id"], record["point_id"], record)
    except (TargetError, OSError, *TRANSIENT_ERRORS) as exc:
        task.vm_log(record["vm_name"], record["vm_id"]).warning(
            "run %s: the point is committed, its metadata was not stored: %s",
            record["point_id"],
            exc,
        )
        log.warning("vm %s: point metadata not stored: %s", record["vm_name"], exc)
        return f"not stored: {exc}"
    return "stored"
