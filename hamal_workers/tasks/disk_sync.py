"""hamal.disk.sync: lease one disk, run the engine from its checkpoint, stage its manifest.

Any delivery of this task may be a duplicate (the broker's redelivery, the scan's
re-dispatch of a disk whose worker died, a retry). The lease makes one of them the
writer; the others return at once; and every state write is fenced by the lease, so a
writer that lost it (paused, partitioned) cannot write even if it does not know yet.
A redelivery rebuilds exactly the plan the first one saved, or starts the disk over.
The disk that settles the run's last pending disk sends the finalize task: no chord,
no task waiting on another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from hamal_workers import faults
from hamal_workers.celery_app import app
from hamal_workers.engine.checkpoint import RedisCheckpoint
from hamal_workers.engine.pipeline import DiskResult, sync_disk
from hamal_workers.engine.plan import CHANGED, DiskPlan, new_plan, resume_plan
from hamal_workers.engine.reuse_fence import ReuseFence
from hamal_workers.mass_sources import mass_mode
from hamal_workers.platforms.base import DiskFlags, DiskSource, Platform, Snapshot
from hamal_workers.state import (
    DONE,
    FAILED,
    FINALIZING,
    QUEUED,
    SYNCING,
    Lease,
    LeaseKeeper,
    LeaseLost,
)
from hamal_workers.targets.base import TargetFull
from hamal_workers.tasks.base import PRIORITY_CONTROL, TRANSIENT_ERRORS, HamalTask

log = logging.getLogger("hamal.period")
# A disk whose task died this many times (OOM, a crash in a reader) fails the run
# instead of being dispatched again forever.
MAX_DISK_ATTEMPTS = 6
TARGET_FULL = "target-full"


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


def send_finalize(run_id: str) -> None:
    from hamal_workers.tasks.finalize import finalize_run

    finalize_run.apply_async(kwargs={"run_id": run_id}, priority=PRIORITY_CONTROL)


class DiskSyncTask(HamalTask):
    abstract = True

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: dict[str, Any], einfo: Any
    ) -> None:
        """Its retries ran out: settle the disk failed, or it would wait for a repair."""
        run_id, disk = kwargs.get("run_id", ""), kwargs.get("disk", "")
        if not run_id or not disk:
            return
        reason = f"gave up after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        try:
            if self.state.settle_disk_if_queued(run_id, disk, {"state": FAILED, "error": reason}):
                self.state.set_run_fields(run_id, status=FINALIZING)
                send_finalize(run_id)
        except TRANSIENT_ERRORS as redis_down:
            log.error("run %s disk %s: cannot record that it failed: %s", run_id, disk, redis_down)


@app.task(
    name="hamal.disk.sync",
    bind=True,
    base=DiskSyncTask,
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
            attempt = state.start_disk(run_id, disk, self.worker_name, lease)
            vlog.info(
                "run %s: disk %s started (attempt %d) on %s",
                run_id,
                disk,
                attempt,
                self.worker_name,
            )
            if attempt > MAX_DISK_ATTEMPTS:
                reason = f"gave up after {attempt - 1} attempts that did not finish"
                settled_last = _settle_failed(self, run_id, disk, vm_name, reason, lease)
                return {"status": FAILED, "error": reason}
            try:
                result, plan = _sync(self, run, disk, lease, keeper)
            except LeaseLost:
                raise
            except TargetFull as exc:
                settled_last = _settle_failed(
                    self, run_id, disk, vm_name, f"target full: {exc}", lease, kind=TARGET_FULL
                )
                return {"status": FAILED, "error": str(exc)}
            except TRANSIENT_ERRORS as exc:
                state.set_disk_fields(run_id, disk, lease, state=QUEUED, error=f"retrying: {exc}")
                vlog.warning("run %s: disk %s: transient error, retrying: %s", run_id, disk, exc)
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                settled_last = _settle_failed(self, run_id, disk, vm_name, reason, lease)
                return {"status": FAILED, "error": reason}
            keeper.check()
            self.target.stage_disk(vm_id, run_id, result.manifest)
            outcome = _outcome(result, plan)
            settled_last = state.settle_disk(run_id, disk, {"state": DONE, **outcome}, lease)
            vlog.info(
                "run %s: disk %s done (%s): %s read, %s stored, %d new chunks, %d resumed, %.1f s",
                run_id,
                disk,
                plan.mode,
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
            faults.point("after-last-disk")
            state.set_run_fields(run_id, status=FINALIZING)
            send_finalize(run_id)


def _settle_failed(
    task: HamalTask,
    run_id: str,
    disk: str,
    vm_name: str,
    reason: str,
    lease: Lease,
    kind: str = "",
) -> bool:
    run = task.state.run(run_id)
    task.vm_log(vm_name, run.get("vm_id", "")).error(
        "run %s: disk %s failed: %s", run_id, disk, reason
    )
    log.error("vm %s: run %s: disk %s failed: %s", vm_name, run_id, disk, reason)
    fields = {"state": FAILED, "error": reason, "error_kind": kind}
    return task.state.settle_disk(run_id, disk, fields, lease)


def _sync(
    task: HamalTask, run: dict[str, str], disk: str, lease: Lease, keeper: LeaseKeeper
) -> tuple[DiskResult, DiskPlan]:
    state = task.state
    run_id, vm_id, vm_name = run["point_id"], run["vm_id"], run.get("vm_name", "")
    snapshot = Snapshot.from_json(json.loads(run["snapshot"]))
    target = task.target
    checkpoint = RedisCheckpoint(state, run_id, disk, snapshot.snapshot_id, lease)
    vlog = task.vm_log(vm_name, vm_id)
    # Read before the plan and any chunk is chosen: what this sync's checkpoints acknowledge.
    fence = ReuseFence(state.gc_round)
    opened = task.platform(run["platform"], run.get("vm_id", ""))
    with opened as platform, platform.open_disk(snapshot, disk) as source:
        # A raw replica is written in place: it checks its disk flag before anything, on
        # every delivery of this task, and says which point it holds before the plan.
        keeper.check()
        flag = _disk_flag(platform, source, vm_id)
        writer = target.open_disk_writer(vm_id, vm_name, run_id, disk, source.size, flag)
        with writer if writer is not None else contextlib.nullcontext():
            holds = writer.holds if writer is not None else None
            plan = _plan(task, checkpoint, source, vm_id, run_id, fence, holds)
            for note in plan.notes:
                vlog.warning("run %s: disk %s: %s", run_id, disk, note)

            def progress(done: int, total: int) -> None:
                state.set_disk_fields(
                    run_id,
                    disk,
                    lease,
                    done_bytes=str(done),
                    total_bytes=str(total),
                    updated_at=str(time.time()),
                )
                if mass_mode(task.settings):
                    every_s = float(task.settings.period.task_update_wait_time)
                    state.mass_progress(vm_id, run_id, every_s)

            def check_lease() -> None:
                keeper.check()

            result = sync_disk(
                plan,
                source.open_reader,
                target,
                task.engine_settings(platform.name),
                checkpoint,
                check_lease,
                progress,
                after_flush=lambda: faults.point("mid-disk"),
                fence=fence,
                disk_writer=writer,
            )
    return result, plan


def _disk_flag(platform: Platform, source: DiskSource, vm_id: str) -> str | None:
    """Which source disk this is, for a target that keeps a flag with each disk; None when
    [vmware]/[openstack_ceph] skip_disk_flag or disk_flag_size exempt the disk."""
    if source.identity:
        return source.identity
    # VMware and Ceph give an identity to exactly the disks their DiskFlags cover; a
    # platform without those settings (local) flags every disk by its VM and name.
    if isinstance(getattr(platform, "flags", None), DiskFlags):
        return None
    return f"{vm_id}/{source.disk}"


def _plan(
    task: HamalTask,
    checkpoint: RedisCheckpoint,
    source: DiskSource,
    vm_id: str,
    run_id: str,
    fence: ReuseFence,
    holds: str | None = None,
) -> DiskPlan:
    """The plan an earlier delivery saved, exactly, or a new one saved before any read.

    holds: the point a raw replica holds (None for a chunk store). A plan that reads only
    what changed since another point would leave the rest of that replica wrong.
    """
    saved = checkpoint.saved_plan()
    if saved is not None:
        plan, why = resume_plan(saved, source, task.target, vm_id)
        if plan is not None:
            if _base_held(plan, holds):
                return plan
            why = f"its replica no longer holds its base, restore point {plan.base_point}"
        started_over = f"started over: the plan of an earlier attempt cannot be rebuilt: {why}"
    else:
        started_over = ""
    plan = new_plan(source, task.target, vm_id, holds)
    if started_over:
        plan.notes.insert(0, started_over)
    checkpoint.start(plan, fence.ack())
    return plan


def _base_held(plan: DiskPlan, holds: str | None) -> bool:
    return holds is None or plan.mode != CHANGED or plan.base_point == holds


def _outcome(result: DiskResult, plan: DiskPlan) -> dict[str, str]:
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
        "base_point": plan.base_point,
        "notes": "; ".join(plan.notes),
        "size": str(result.manifest.size),
        "error": "",
    }
