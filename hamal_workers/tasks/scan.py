"""hamal.period.scan: every interval, request due syncs, repair what died, sweep leftovers.

Requests: every VM that has no run is due; it gets one request in a Redis sorted set
(hamal:requests, scored by its newest point, so VMs with none or with the oldest go
first), and the period workers take requests one by one through a few `vm.sync`
messages that chain themselves, at a lower priority than the work that finishes runs:
a thousand due VMs are a thousand set members, not a thousand queued messages. A VM
whose runs keep failing backs off (a full store: until the store has room again).

Repairs, because the broker's redelivery (the visibility timeout) is hours away by
design, and telling a slow queue from a dead worker:
- a disk whose worker stopped renewing its lease is dispatched again (it resumes);
- a disk taken by a worker that is gone (its presence key expired), or taken and not
  started long after any retry would have, is sent again;
- one that no worker took while its queue is empty (the message was lost) is sent again;
- a run whose disks are all settled but that was never finalized is finalized;
- a run that died while snapshotting is failed;
- a run whose vm.sync died before sending every disk task gets them sent;
- a VM claimed by a run that no longer runs is freed.
Duplicates are harmless: every task takes a lease first.

The sweep deletes snapshots the proxy made (found in Redis and by listing the
platforms) that no running run and no VM's base needs, and staged points of runs that
no longer run. It reads the snapshots first, then the runs, then the bases, so a run
that starts or commits while it reads is always seen (docs/CONTRACTS.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hamal_workers import faults
from hamal_workers.backoff import backoff
from hamal_workers.celery_app import app
from hamal_workers.config import CONTROL_QUEUE
from hamal_workers.mass import MassError, TaskView
from hamal_workers.mass_sources import mass_mode, source_digest, task_settings, task_source
from hamal_workers.platforms import enabled_platforms, open_platform
from hamal_workers.platforms.base import Platform, PlatformError, Snapshot, VmRef
from hamal_workers.state import (
    FAILED,
    FINALIZING,
    QUEUED,
    RUNNING,
    STARTING,
    SYNCING,
    DiskStatus,
    LeaseKeeper,
    State,
    key,
)
from hamal_workers.targets.base import Target, TargetError
from hamal_workers.tasks.base import PRIORITY_SCHEDULED, RETRY_BACKOFF_MAX_S, HamalTask
from hamal_workers.tasks.gc import send_gc_if_due

log = logging.getLogger("hamal.period")
# The whole store is walked for temporary files about once an hour (tmp/ every scan).
TEMPORARY_SWEEP_EVERY_S = 3600
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


@dataclass
class ScanReport:
    requests: int = 0
    waiting: int = 0  # VMs whose request is queued or taken: nothing sent
    backing_off: int = 0
    repairs: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    vms: dict[str, VmRef] = field(default_factory=dict)
    records: dict[str, dict[str, str]] = field(default_factory=dict)


@app.task(name="hamal.period.scan", bind=True, base=HamalTask)
def scan(self: HamalTask) -> dict[str, Any]:
    state = self.state
    lease = state.scan_lease(max(self.lease_ttl, float(self.settings.period.interval)))
    if not lease.acquire():
        return {"status": "skipped", "reason": "another scan is running"}
    try:
        with LeaseKeeper(lease):
            return _scan(self)
    finally:
        lease.release()


def _scan(task: HamalTask) -> dict[str, Any]:
    state = task.state
    started = time.time()
    number = state.record_scan()
    report = ScanReport()
    _request_due_vms(task, report)
    _repair_runs(task, report)
    _sweep_snapshots(task, report)
    _sweep_staged(task, report)
    everywhere = number % max(1, TEMPORARY_SWEEP_EVERY_S // int(task.settings.period.interval))
    _sweep_temporary(task, report, everywhere=everywhere == 1)
    gc_sent = send_gc_if_due(task)
    seconds = time.time() - started
    log.info(
        "scan %d: %d VMs, %d sync requests sent, %d waiting for a worker, %d backing off, "
        "%d repairs, %d swept in %.2f s",
        number,
        len(report.vms),
        report.requests,
        report.waiting,
        report.backing_off,
        len(report.repairs),
        len(report.swept),
        seconds,
    )
    for line in report.repairs:
        log.warning("scan %d: repair: %s", number, line)
    event = {
        "event": "scan",
        "scan": number,
        "time": started,
        "seconds": seconds,
        "vms": len(report.vms),
        "requests": report.requests,
        "waiting": report.waiting,
        "backing_off": report.backing_off,
        "repairs": len(report.repairs),
        "swept": len(report.swept),
        "gc_sent": gc_sent,
    }
    state.publish(event)
    return {**event, "repair_lines": report.repairs, "swept_lines": report.swept}


# --------------------------------------------------------------------------- requests


def _request_due_vms(task: HamalTask, report: ScanReport) -> None:
    state = task.state
    if mass_mode(task.settings):
        answered, intervals = _discover_mass_tasks(task, report)
    else:
        answered, intervals = _discover_platforms(task, report), {}
    _release_gone_bases(task, answered, report)
    ids = list(report.vms)
    state.record_vms((v.vm_id, v.name, v.platform) for v in report.vms.values())
    report.records = dict(zip(ids, state.vms(ids), strict=True))
    now = time.time()
    checks = _Liveness(task)
    due: list[tuple[str, float]] = []
    for vm_id, record in report.records.items():
        if record.get("active_run"):
            continue
        # A Mass task's schedule: not before its interval since the last point.
        if now - float(record.get("last_success") or 0) < intervals.get(vm_id, 0):
            continue
        if _backing_off(task, record, now, checks):
            report.backing_off += 1
            continue
        # Never-synced VMs score 0: with the oldest newest point, they are taken first.
        due.append((vm_id, float(record.get("last_success") or 0)))
    report.requests = state.request_syncs(due)
    report.waiting = len(due) - report.requests
    _top_up_pullers(task, checks)


def _discover_platforms(task: HamalTask, report: ScanReport) -> list[str]:
    """Every VM of every platform hamal.conf configures (local mode)."""
    answered = []
    for name in enabled_platforms(task.settings):
        try:
            with task.platform(name) as platform:
                for vm in platform.discover():
                    report.vms[vm.vm_id] = vm
            answered.append(name)
        except PlatformError as exc:
            log.error("scan: platform %s: %s", name, exc)
    return answered


_Groups = dict[str, tuple[str, dict[str, Any], list[TaskView]]]


def _mass_groups(task: HamalTask, views: Any) -> tuple[_Groups, set[str]]:
    """Enabled Mass tasks by distinct source connection: digest -> (platform, source,
    views); and the platforms of tasks whose source could not be opened."""
    groups: _Groups = {}
    failed: set[str] = set()
    for raw in views:
        view = TaskView.from_json(raw)
        if not view.enabled:
            continue
        try:
            source = task_source(task.settings, task.state, view)
        except MassError as exc:
            log.error("scan: %s", exc)
            failed.add(view.platform)
            continue
        digest = source_digest(view.platform, source)
        groups.setdefault(digest, (view.platform, source, []))[2].append(view)
    return groups, failed


def _discover_mass_tasks(task: HamalTask, report: ScanReport) -> tuple[list[str], dict[str, int]]:
    """The VMs of the verified Mass tasks (Mass mode): one discovery per distinct source
    connection, limited to its tasks' VMs. Returns the platforms that answered for every
    source, and each VM's interval."""
    state, settings = task.state, task.settings
    groups, failed = _mass_groups(task, state.mass_tasks().values())
    intervals: dict[str, int] = {}
    owners: dict[str, str] = {}  # vm id -> its task
    # The VMs of retired tasks are gone: their bases are deleted (`_release_gone_bases`).
    tried: set[str] = {v["platform"] for v in state.retired_mass_tasks().values()}
    for platform_name, source, views in groups.values():
        tried.add(platform_name)
        wanted = {view.vm_id: view for view in views}
        try:
            scoped = task_settings(settings, views[0].task_id, platform_name, source, list(wanted))
            with open_platform(platform_name, scoped) as platform:
                found = {vm.vm_id: vm for vm in platform.discover() if vm.vm_id in wanted}
        except (PlatformError, MassError) as exc:
            log.error("scan: Mass task %s: %s", views[0].task_id, exc)
            failed.add(platform_name)
            continue
        for vm_id, view in wanted.items():
            if vm_id not in found:
                log.warning("scan: Mass task %s: %s VM %s not found", view.task_id,
                            platform_name, vm_id)  # fmt: skip
                continue
            report.vms[vm_id] = found[vm_id]
            intervals[vm_id] = view.interval_s
            owners[vm_id] = view.task_id
    state.set_mass_owners(owners)
    return sorted(tried - failed), intervals


def _release_gone_bases(task: HamalTask, answered: list[str], report: ScanReport) -> None:
    """Delete the base snapshot of a VM its platform no longer lists (an instance deleted,
    taken out of `servers`): kept, it would pin the source's data and block deleting the
    volume. Only after a listing that worked; the VM's restore points stay, and should it
    come back, its next sync reads its allocated extents and stores only new content."""
    state = task.state
    gone = [vm_id for vm_id in state.vm_ids() if vm_id not in report.vms]
    retired = state.retired_mass_tasks() if mass_mode(task.settings) else {}
    for vm_id, record in zip(gone, state.vms(gone), strict=True):
        raw = record.get("base_snapshot")
        task_id = record.get("mass_task", "")
        if task_id in retired and not raw and not record.get("active_run"):
            state.forget_retired_mass_task(task_id)  # nothing left on the source for it
        if not raw or record.get("active_run") or record.get("platform") not in answered:
            continue
        snapshot = Snapshot.from_json(json.loads(raw))
        try:
            with task.platform(snapshot.platform, vm_id) as platform:
                platform.delete_snapshot(snapshot)
        except (PlatformError, MassError) as exc:
            log.error("scan: vm %s is gone; its base %s stays: %s", vm_id, snapshot.key, exc)
            continue
        state.set_vm_fields(vm_id, base_snapshot="")
        state.snapshot_deleted(snapshot.key)
        if task_id in retired:
            state.forget_retired_mass_task(task_id)
        name = record.get("name") or vm_id
        why = f"{snapshot.platform} no longer lists it"
        task.vm_log(name, vm_id).warning(
            "%s: its base snapshot %s was deleted; its restore points stay",
            why,
            snapshot.snapshot_id,
        )
        report.swept.append(f"base snapshot {snapshot.key} of VM {name} ({why})")


def _top_up_pullers(task: HamalTask, checks: _Liveness) -> None:
    """Enough vm.sync messages to keep every period worker process taking requests.

    Each one takes the oldest request and sends the next while requests wait, so the
    queue holds a handful of messages, not one per VM, and finalize never waits behind.
    """
    from hamal_workers.tasks.vm_sync import send_pull

    waiting = task.state.requests_waiting()
    if not waiting:
        return
    processes = sum(
        int(w.get("concurrency") or 1)
        for w in checks.workers().values()
        if CONTROL_QUEUE in w.get("queues", ())
    )
    queued = checks.queue_length(CONTROL_QUEUE, PRIORITY_SCHEDULED)
    for _ in range(max(0, min(waiting, max(processes, 1)) - queued)):
        send_pull()


def _backing_off(task: HamalTask, record: dict[str, str], now: float, checks: _Liveness) -> bool:
    interval = float(task.settings.period.interval)
    return backoff(record, interval, now, checks.target_free) is not None


class _Liveness:
    """What the repairs need to tell a slow queue from a lost message or a dead worker."""

    def __init__(self, task: HamalTask) -> None:
        self.task = task
        self._workers: dict[str, dict[str, Any]] | None = None
        self._queues: dict[str, int] = {}
        self._free: tuple[int | None] | None = None
        self.grace = max(2 * task.lease_ttl, float(task.settings.period.interval))
        # A taken message may wait this long for its retry's countdown, then it must run.
        self.taken_limit = RETRY_BACKOFF_MAX_S + 2 * float(task.settings.period.interval)

    def workers(self) -> dict[str, dict[str, Any]]:
        if self._workers is None:
            self._workers = self.task.state.live_workers()
        return self._workers

    def queue_length(self, queue: str, priority: int | None = None) -> int:
        """Messages waiting in a queue (kombu keeps a list per priority step), or at one step."""
        cache = f"{queue}/{priority}"
        if cache not in self._queues:
            steps = [priority] if priority is not None else [0, *_PRIORITY_STEPS]
            names = [f"{queue}{_PRIORITY_SEPARATOR}{p}" if p else queue for p in steps]
            pipe = self.task.state.r.pipeline(transaction=False)
            for name in names:
                pipe.llen(name)
            self._queues[cache] = sum(pipe.execute())
        return self._queues[cache]

    def target_free(self) -> int | None:
        if self._free is None:
            try:
                self._free = (self.task.target.free_bytes(),)
            except (OSError, TargetError):
                self._free = (None,)
        return self._free[0]

    def lost(
        self, fields: dict[str, str], prefix: str, sent_at: float, queue: str, now: float
    ) -> str:
        """Why a message sent at `sent_at` will never run, or "" when it may still."""
        taken_by = fields.get(f"{prefix}received_by", "")
        if taken_by:
            if taken_by not in self.workers():
                return f"{taken_by}, which took it, is gone"
            taken_at = float(fields.get(f"{prefix}received_at") or 0)
            if now - taken_at > self.taken_limit:
                return f"{taken_by} took it {now - taken_at:.0f} s ago and never ran it"
            return ""
        if now - sent_at > self.grace and self.queue_length(queue) == 0:
            return "no worker took it and its queue is empty: the message was lost"
        return ""


# --------------------------------------------------------------------------- repairs


def _repair_runs(task: HamalTask, report: ScanReport) -> None:
    state = task.state
    ttl = task.lease_ttl
    active = state.active_runs()
    runs = dict(zip(active, state.runs(active), strict=True))
    _free_orphan_claims(task, report, set(active))
    pending = dict(zip(active, state.pending_of(active), strict=True))
    checks = _Liveness(task)
    now = time.time()
    for run_id, run in runs.items():
        status, vm_id, vm_name = run.get("status"), run.get("vm_id", ""), run.get("vm_name", "")
        if not run:
            continue
        if status == STARTING:
            age = now - float(run.get("started") or 0)
            if age > ttl and not state.vm_lease(vm_id, ttl).held_by_anyone():
                _fail_stalled_start(task, run_id, run)
                report.repairs.append(f"run {run_id} of {vm_name}: died while snapshotting: failed")
            continue
        disks = pending[run_id]
        if status in (SYNCING, FINALIZING) and not disks:
            if not state.finalize_lease(run_id, ttl).held_by_anyone():
                from hamal_workers.tasks.disk_sync import send_finalize

                send_finalize(run_id)
                report.repairs.append(f"run {run_id} of {vm_name}: finalize sent again")
            continue
        if not run.get("dispatched") and not state.vm_lease(vm_id, ttl).held_by_anyone():
            _dispatch(run_id, run, disks)
            state.set_run_fields(run_id, dispatched="1")
            report.repairs.append(f"run {run_id} of {vm_name}: disk tasks sent (vm.sync died)")
            continue
        statuses = state.disks([(run_id, d) for d in disks])
        held = state.leases_held([key("lease", "disk", run_id, d) for d in disks])
        for status_of, lease_held in zip(statuses, held, strict=True):
            why = _disk_lost(status_of, lease_held, checks, run.get("platform", ""), now)
            if why:
                state.redispatched(run_id, status_of.disk)
                _dispatch(run_id, run, [status_of.disk])
                report.repairs.append(f"run {run_id} of {vm_name} disk {status_of.disk}: {why}")
                task.vm_log(vm_name, vm_id).warning(
                    "run %s: disk %s: %s; dispatched again, it resumes from its checkpoint",
                    run_id,
                    status_of.disk,
                    why,
                )


def _disk_lost(
    status: DiskStatus, lease_held: bool, checks: _Liveness, queue: str, now: float
) -> str:
    if status.state == RUNNING:
        return "" if lease_held else "its worker stopped renewing the lease"
    if status.state == QUEUED and not lease_held:
        return checks.lost(status.fields, "", status.number("dispatched_at"), queue, now)
    return ""


def _dispatch(run_id: str, run: dict[str, str], disks: list[str]) -> None:
    from hamal_workers.tasks.disk_sync import dispatch_disk

    for disk in disks:
        dispatch_disk(run_id, run["vm_id"], run.get("vm_name", ""), disk, run["platform"])


def _free_orphan_claims(task: HamalTask, report: ScanReport, active: set[str]) -> None:
    """A VM claimed by a run that is not running (gone, finished) would never sync again."""
    state = task.state
    for vm_id, record in report.records.items():
        claim = record.get("active_run")
        if not claim or claim in active:
            continue
        if state.vm_lease(vm_id, task.lease_ttl).held_by_anyone():
            continue  # its vm.sync is still at work
        if state.free_claim(vm_id, claim):
            name = report.vms[vm_id].name if vm_id in report.vms else vm_id
            report.repairs.append(f"vm {name}: freed from run {claim}, which no longer runs")


def _fail_stalled_start(task: HamalTask, run_id: str, run: dict[str, str]) -> None:
    state = task.state
    reason = "the task creating the snapshot stopped before the disks were planned"
    state.set_run_fields(run_id, error=reason)
    summary = {"run_id": run_id, "status": FAILED, "error": reason, "finished": time.time()}
    state.finish_run(run_id, run.get("vm_id", ""), FAILED, summary)
    log.error("scan: run %s of vm %s: %s", run_id, run.get("vm_name"), reason)


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class Sweep:
    """What the sweep reads and deletes through; a test drives it without a worker."""

    state: State
    target: Target
    platforms: list[str]  # the enabled ones
    open_platform: Callable[..., Platform]  # (name, vm_id="")
    # Also keep a snapshot that the store's newest point of its VM names (the base record
    # in Redis may be gone). The read order alone protects bases that Redis knows.
    store_bases: bool = True
    # Listings other than one per platform name (Mass mode: one per source connection):
    # (listing id, platform name, opener).
    listers: list[tuple[str, str, Callable[[], Platform]]] = field(default_factory=list)


def _sweep_snapshots(task: HamalTask, report: ScanReport) -> None:
    if not mass_mode(task.settings):
        sweep = Sweep(task.state, task.target, enabled_platforms(task.settings), task.platform)
    else:
        # Mass mode: each distinct source of the tasks (retired ones too) is listed, with
        # its own connection; a snapshot is deleted through its VM's task.
        state = task.state
        views = [*state.mass_tasks().values(), *state.retired_mass_tasks().values()]
        groups, _ = _mass_groups(task, views)
        listers = [
            (f"{name}:{digest}", name, _source_opener(task, name, source, views))
            for digest, (name, source, views) in sorted(groups.items())
        ]
        sweep = Sweep(state, task.target, [], task.platform, listers=listers)
    report.swept += sweep_snapshots(sweep)


def _source_opener(
    task: HamalTask, name: str, source: dict[str, Any], views: list[TaskView]
) -> Callable[[], Platform]:
    vm_ids = [view.vm_id for view in views]

    def opener() -> Platform:
        scoped = task_settings(task.settings, views[0].task_id, name, source, vm_ids)
        return open_platform(name, scoped)

    return opener


def sweep_snapshots(sweep: Sweep, between: Callable[[str], None] = lambda step: None) -> list[str]:
    """Delete the proxy's snapshots that no running run and no VM's base needs.

    The reads go: snapshot records, the platforms' listings, active runs, bases. A run is
    created before its snapshot is recorded and sets its new base before it ends, so a
    run that starts or commits between two reads is always seen. `between(step)` runs
    after each read (tests interleave a finalize there).
    """
    state = sweep.state
    candidates: dict[str, tuple[Snapshot, str]] = {}
    for snap_key, record in state.live_snapshots().items():
        snapshot = Snapshot.from_json({k: v for k, v in record.items() if k != "run_id"})
        candidates[snap_key] = (snapshot, str(record.get("run_id") or snapshot.run_id or ""))
    between("records")
    keeps_base: dict[str, bool] = {}
    listings = [(name, name, lambda n=name: sweep.open_platform(n)) for name in sweep.platforms]
    for listing, name, opener in [*listings, *sweep.listers]:
        try:
            with opener() as platform:
                keeps_base[name] = platform.keeps_base_snapshot
                if not state.leftover_listing_due(listing, platform.leftover_listing_every_s):
                    continue
                for snapshot in platform.leftover_snapshots():
                    candidates.setdefault(snapshot.key, (snapshot, snapshot.run_id or ""))
        except (PlatformError, MassError) as exc:
            log.error("sweep: cannot list snapshots on %s: %s", listing, exc)
    between("leftovers")
    if not candidates:
        return []
    active = set(state.active_runs())
    between("active")
    bases = _bases(state)
    swept = []
    for snap_key, (snapshot, run_id) in sorted(candidates.items()):
        if run_id in active or snap_key in bases:
            continue
        if sweep.store_bases and keeps_base.get(snapshot.platform) and _store_base(sweep, snapshot):
            continue
        try:
            with sweep.open_platform(snapshot.platform, snapshot.vm_id) as platform:
                platform.delete_snapshot(snapshot)
        except (PlatformError, MassError) as exc:
            log.error("sweep: snapshot %s: %s", snap_key, exc)
            continue
        faults.point("mid-sweep")
        state.snapshot_deleted(snap_key)
        state.count("snapshots_swept")
        log.warning("sweep: deleted leftover snapshot %s", snap_key)
        swept.append(f"snapshot {snap_key}")
    return swept


def _bases(state: State) -> set[str]:
    ids = state.vm_ids()
    pipe = state.r.pipeline(transaction=False)
    for vm_id in ids:
        pipe.hget(key("vm", vm_id), "base_snapshot")
    found = set()
    for raw in pipe.execute():
        if raw:
            found.add(Snapshot.from_json(json.loads(raw)).key)
    return found


def _store_base(sweep: Sweep, snapshot: Snapshot) -> bool:
    """After Redis was lost, the store still says which snapshot is a VM's base."""
    try:
        ids = sweep.target.point_ids(snapshot.vm_id)
        if not ids:
            return False
        newest = sweep.target.point(snapshot.vm_id, ids[-1])
    except TargetError:
        return False
    if newest.meta.get("snapshot_id") != snapshot.snapshot_id:
        return False
    # Known again: the next finalize drops it once a newer point is committed.
    sweep.state.set_vm_fields(snapshot.vm_id, base_snapshot=json.dumps(snapshot.to_json()))
    return True


def _sweep_staged(task: HamalTask, report: ScanReport) -> None:
    """Staged disks of runs that no longer run (Redis lost them, a discard was cut short)."""
    try:
        staged = task.target.staged_points()
    except (OSError, TargetError) as exc:
        log.error("sweep: cannot list staged points: %s", exc)
        return
    if not staged:
        return
    active = set(task.state.active_runs())
    grace = 2 * task.lease_ttl
    for point in staged:
        if point.point_id in active or point.age_s < grace:
            continue
        task.target.discard_point(point.vm_id, point.point_id)
        task.state.count("staged_points_swept")
        report.swept.append(f"staged point {point.point_id} of VM {point.vm_id}")


def _sweep_temporary(task: HamalTask, report: ScanReport, *, everywhere: bool) -> None:
    """Files a write cut short left in the store: where writes happen every scan, the whole
    store about once an hour. Older than two lease times: no live writer is that slow."""
    sweep = getattr(task.target, "sweep_temporary", None)
    if sweep is None:
        return
    try:
        removed = sweep(older_than_s=2 * task.lease_ttl, everywhere=everywhere)
    except OSError as exc:
        log.error("sweep: temporary files: %s", exc)
        return
    if removed:
        report.swept.append(f"{removed} temporary files of the store")
