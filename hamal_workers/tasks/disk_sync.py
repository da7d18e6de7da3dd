"""hamal.disk.sync: lease one disk, run the engine from its checkpoint, stage its manifest.

Any delivery of this task may be a duplicate (the broker's redelivery, the scan's
re-dispatch of a disk whose lease expired, a retry). The lease makes one of them the
writer; the others return at once. The disk that settles the run's last pending disk
sends the finalize task: no chord, no task waiting on another.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hamal_workers.celery_app import app
from hamal_workers.engine.checkpoint import RedisCheckpoint
from hamal_workers.engine.pipeline import DiskResult, sync_disk
from hamal_workers.engine.plan import plan_disk
from hamal_workers.platforms.base import Snapshot
from hamal_workers.state import DONE, FAILED, FINALIZING, QUEUED, SYNCING, LeaseKeeper, LeaseLost
from hamal_workers.targets.base import MissingPoint
from hamal_workers.tasks.base import TRANSIENT_ERRORS, HamalTask

log = logging.getLogger("hamal.period")


def dispatch_disk(run_id: str, vm_id: str, vm_name: str, disk: str, platform: str) -> None:
    """Send one disk's task to its platform's queue; safe to call again for the same disk."""
    sync_disk_task.apply_async(
        kwargs={
            "run_id": run_id,
            "vm_id": vm_id,
            "vm_name": vm_name,
            "disk": disk,
            "platform": platform,
        },
        queue=platform,
    )


@app.task(
    name="hamal.disk.sync",
    bind=True,
    base=HamalTask,
    Request="hamal_workers.tasks.progress:DiskSyncRequest",
)
def sync_disk_task(
    self: HamalTask, run_id: str, vm_id: str, vm_name: str, disk: str, platform: str
) -> dict[str, Any]:
    state = self.state
    run = state.run(run_id)
    if run.get("status") != SYNCING:
        return {"status": "skipped", "reason": f"run is {run.get('status') or 'unknown'}"}
    if state.disk(run_id, disk).state in (DONE, FAILED):
        return {"status": "skipped", "reason": "disk already settled"}
    lease = state.disk_lease(run_id, disk, self.lease_ttl)
    if not lease.acquire():
        return {"status": "skipped", "reason": "another task holds the disk's lease"}
    vlog = self.vm_log(vm_name, vm_id)
    settled_last = False
    try:
        with LeaseKeeper(lease) as keeper:
            # Settled between our first look and the lease: a duplicate delivery.
            if state.disk(run_id, disk).state in (DONE, FAILED):
                return {"status": "skipped", "reason": "disk already settled"}
            attempt = state.start_disk(run_id, disk, self.worker_name)
            vlog.info(
                "run %s: disk %s started (attempt %d) on %s",
                run_id,
                disk,
                attempt,
                self.worker_name,
            )
            try:
                result = _sync(self, run, disk, keeper)
            except LeaseLost:
                raise
            except TRANSIENT_ERRORS as exc:
                state.set_disk_fields(run_id, disk, state=QUEUED, error=f"retrying: {exc}")
                vlog.warning("run %s: disk %s: transient error, retrying: %s", run_id, disk, exc)
                # Explicit retry (not autoretry): the disk must be marked queued first.
                countdown = min(600, 5 * 2**self.request.retries)
                raise self.retry(exc=exc, countdown=countdown) from exc
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                vlog.error("run %s: disk %s failed: %s", run_id, disk, reason)
                log.error("vm %s: run %s: disk %s failed: %s", vm_name, run_id, disk, reason)
                settled_last = state.settle_disk(run_id, disk, {"state": FAILED, "error": reason})
                return {"status": FAILED, "error": reason}
            keeper.check()
            self.target.stage_disk(vm_id, run_id, result.manifest)
            outcome = _outcome(result)
            settled_last = state.settle_disk(run_id, disk, {"state": DONE, **outcome})
            vlog.info(
                "run %s: disk %s done: %s read, %s stored, %d new chunks, %d resumed, %.1f s",
                run_id,
                disk,
                outcome["bytes_read"],
                outcome["bytes_stored"],
                result.chunks_new,
                result.chunks_resumed,
                result.seconds,
            )
            return {"status": DONE, "disk": disk, **outcome}
    except LeaseLost as exc:
        vlog.warning("run %s: disk %s: %s", run_id, disk, exc)
        return {"status": "lease-lost"}
    finally:
        lease.release()
        if settled_last:
            state.set_run_fields(run_id, status=FINALIZING)
            from hamal_workers.tasks.finalize import finalize_run

            finalize_run.apply_async(kwargs={"run_id": run_id})


def _sync(task: HamalTask, run: dict[str, str], disk: str, keeper: LeaseKeeper) -> DiskResult:
    state = task.state
    run_id, vm_id = run["point_id"], run["vm_id"]
    platform = task.platform(run["platform"])
    snapshot = Snapshot.from_json(json.loads(run["snapshot"]))
    base_snapshot = (
        Snapshot.from_json(json.loads(run["base_snapshot"])) if run.get("base_snapshot") else None
    )
    target = task.target
    base_point = state.disk(run_id, disk).fields.get("base_point", "")
    base_manifest = None
    if base_point:
        try:
            base_manifest = target.manifest(vm_id, base_point, disk)
        except MissingPoint:
            base_manifest = None  # retention removed it: read everything allocated
    checkpoint = RedisCheckpoint(state, run_id, disk, snapshot.snapshot_id)
    saved = checkpoint.saved_plan()
    plan = plan_disk(
        platform,
        snapshot,
        disk,
        target.chunk_size,
        base_snapshot,
        base_manifest,
        saved_to_read=saved,
    )
    if saved is None:
        checkpoint.start(plan)
    vm_name = run.get("vm_name", "")

    def progress(done: int, total: int) -> None:
        state.set_disk_fields(
            run_id, disk, done_bytes=str(done), total_bytes=str(total), updated_at=str(time.time())
        )
        task.progress(vm=vm_name, disk=disk, run_id=run_id, done_bytes=done, total_bytes=total)

    return sync_disk(
        plan,
        lambda: platform.open_reader(snapshot, disk),
        target,
        task.engine_settings(platform.name),
        checkpoint,
        keeper.check,
        progress,
    )


def _outcome(result: DiskResult) -> dict[str, str]:
    return {
        "bytes_read": str(result.bytes_read),
        "bytes_stored": str(result.bytes_stored),
        "chunks_read": str(result.chunks_read),
        "chunks_new": str(result.chunks_new),
        "chunks_zero": str(result.chunks_zero),
        "chunks_resumed": str(result.chunks_resumed),
        "planned_chunks": str(result.planned_chunks),
        "seconds": f"{result.seconds:.3f}",
        "mode": result.mode,
        "size": str(result.manifest.size),
    }
