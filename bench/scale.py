"""A thousand VMs on one proxy: how soon each has a first restore point; a 10,000-VM scan.

    .venv/bin/python bench/scale.py [--vms 1000] [--scan-vms 10000] [--limit 300]

Part 1: --vms VMs, each with one sparse 64 MiB disk holding 64 KiB of random data, in the
local platform's inventory. One LocalFleet: a `celery worker -Q local -c 2`, a period
worker (-c 2) and celery beat with [period] interval 20 s. From the first `scan` event
on the `hamal:events` channel it records when each VM's first restore point is
committed, whether any VM gets a second point before every VM has a first, the length
of the period queue every second, and how many runs fail. Targets: every VM has a first
point within 60 s of the first scan, and no VM gets a second before every VM has one.

Part 2: one `hamal.period.scan` over --scan-vms VMs of 2 tiny sparse disks each, with
only a period worker running: discovery plus the decision to start each VM. Timed by
the scan's own `seconds` when its event carries one, else from sending the task to its
result. Target: 10 s.

Each part stops after --limit seconds whatever happens, with a MISS. A benchmark, not a
test: it asserts nothing and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report  # noqa: E402
from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.platforms.local import vm_id_for  # noqa: E402
from hamal_workers.state import key  # noqa: E402

KiB = 1024
DISK_SIZE = 64 * images.MiB
DATA_PER_DISK = 64 * KiB
INTERVAL_S = 20
WORKER_CONCURRENCY = 2
FIRST_POINT_TARGET_S = 60.0
SCAN_TARGET_S = 10.0
SAMPLE_EVERY_S = 1.0
TIMELINE_ROWS = 30
RESULT_POLL_S = 0.05


def make_vms(inventory: Path, count: int, disks: int, data_bytes: int) -> list[str]:
    """`count` VM directories of `disks` sparse disks with `data_bytes` of random data at
    offset 0 (unique per disk, so nothing deduplicates). Their names, in the order the
    local platform discovers them (sorted), which is the order a scan dispatches them in."""
    rng = random.Random(count)
    names = [f"vm{v:05d}" for v in range(count)]
    for name in names:
        vm_dir = inventory / name
        vm_dir.mkdir(parents=True)
        for d in range(disks):
            fd = os.open(vm_dir / f"disk{d}.raw", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, DISK_SIZE)
                if data_bytes:
                    os.pwrite(fd, rng.randbytes(data_bytes), 0)
            finally:
                os.close(fd)
    return names


def queue_length(client: redis.Redis, prefix: str) -> int:
    """Messages waiting in a queue: Redis priorities keep them in several lists whose
    names start with the queue's (`period`, `period\\x06\\x163`, ...), so sum them all."""
    names = client.scan_iter(match=f"{prefix}*", count=1000, _type="list")
    return sum(int(client.llen(name)) for name in names)


# --- part 1: first points for every VM ------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds after the first scan
    period_queue: int
    local_queue: int
    vms_with_a_point: int
    runs_started: int
    points: int
    failed_runs: int


@dataclass
class FirstPoints:
    """What the events say about the VMs' restore points, timed from the first scan."""

    vms: int
    beat_started: float = 0.0
    first_scan: float | None = None
    scans: list[float] = field(default_factory=list)
    first_point: dict[str, float] = field(default_factory=dict)  # vm_id -> seconds
    points: Counter[str] = field(default_factory=Counter)
    early_vms: set[str] = field(default_factory=set)  # a second point while a VM had none
    early_points: int = 0
    runs_started: int = 0
    runs_failed: int = 0
    all_first_at: float | None = None
    samples: list[Sample] = field(default_factory=list)

    def since_first_scan(self, now: float) -> float:
        return now - self.first_scan if self.first_scan is not None else 0.0

    def on_event(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("event")
        if kind == "scan":
            at = float(event.get("time") or now)
            self.first_scan = self.first_scan if self.first_scan is not None else at
            self.scans.append(self.since_first_scan(at))
        elif kind == "run-started":
            self.runs_started += 1
        elif kind == "run" and event.get("status") == "failed":
            self.runs_failed += 1
        elif kind == "run" and event.get("status") == "committed":
            self._committed(str(event.get("vm_id")), self.since_first_scan(now))

    def _committed(self, vm_id: str, at: float) -> None:
        self.points[vm_id] += 1
        if self.points[vm_id] == 1:
            self.first_point[vm_id] = at
            if len(self.first_point) == self.vms:
                self.all_first_at = at
        elif self.all_first_at is None:
            self.early_vms.add(vm_id)
            self.early_points += 1

    def sample(self, client: redis.Redis, now: float) -> None:
        self.samples.append(
            Sample(
                self.since_first_scan(now),
                queue_length(client, "period"),
                queue_length(client, "local"),
                len(self.first_point),
                self.runs_started,
                sum(self.points.values()),
                self.runs_failed,
            )
        )


def watch_first_points(fleet: LocalFleet, vms: int, limit_s: float) -> FirstPoints:
    """Start beat, then follow hamal:events until every VM has a point or time is up."""
    client = redis.Redis.from_url(fleet.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key("events"))
    seen = FirstPoints(vms, beat_started=time.time())
    fleet.start_beat()
    deadline = time.monotonic() + limit_s
    next_sample = 0.0
    try:
        while seen.all_first_at is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                seen.on_event(json.loads(message["data"]), time.time())
            if seen.first_scan is not None and time.monotonic() >= next_sample:
                seen.sample(client, time.time())
                next_sample = time.monotonic() + SAMPLE_EVERY_S
    finally:
        pubsub.close()
    return seen


def first_points(
    fleet: LocalFleet, overrides: dict[str, str], inventory: Path, vms: int, limit_s: float
) -> None:
    started = time.perf_counter()
    names = make_vms(inventory, vms, 1, DATA_PER_DISK)
    built = time.perf_counter() - started
    print(
        f"\nPart 1: {vms} VMs, one {DISK_SIZE // images.MiB} MiB sparse disk each with "
        f"{DATA_PER_DISK // KiB} KiB of data (built in {built:.0f} s); `celery worker -Q "
        f"local -c {WORKER_CONCURRENCY}`, period worker -c {WORKER_CONCURRENCY}, beat every "
        f"{INTERVAL_S} s; stops when every VM has a point, or {limit_s:g} s after beat started",
        flush=True,
    )
    overrides["HAMAL_LOCAL_INVENTORY"] = str(inventory)  # read when a process starts
    fleet.start_worker("period", ["period"], concurrency=WORKER_CONCURRENCY)
    fleet.start_worker("local", ["local"], concurrency=WORKER_CONCURRENCY)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    seen = watch_first_points(fleet, vms, limit_s)
    for name in ("beat", "local", "period"):
        fleet.stop(name)
    print_first_points(seen, names, limit_s)


def print_first_points(seen: FirstPoints, names: list[str], limit_s: float) -> None:
    if seen.first_scan is None:
        print(f"  MISS  no scan within {limit_s:g} s of beat's start: nothing measured")
        return
    print(f"  first scan {seen.first_scan - seen.beat_started:.1f} s after beat started")
    print_timeline(seen.samples)
    times = sorted(seen.first_point.values())
    within = sum(1 for t in times if t <= FIRST_POINT_TARGET_S)
    if times:
        print(
            f"  first points: {len(times)} of {seen.vms} VMs; after the first scan: median "
            f"{statistics.median(times):.1f} s, 90th percentile "
            f"{times[int(0.9 * (len(times) - 1))]:.1f} s, last {times[-1]:.1f} s"
        )
    print(
        f"  runs: {seen.runs_started} started, {sum(seen.points.values())} committed, "
        f"{seen.runs_failed} failed; scans at " + ", ".join(f"{s:.0f}" for s in seen.scans) + " s"
    )
    queue = max((s.period_queue for s in seen.samples), default=0)
    print(f"  longest period queue: {queue} tasks")
    ended = "" if seen.all_first_at is not None else " (so far: not every VM has one)"
    print(
        f"  VMs with a second point before every VM had a first: {len(seen.early_vms)} "
        f"({seen.early_points} points){ended}"
    )
    every = seen.all_first_at is not None and seen.all_first_at <= FIRST_POINT_TARGET_S
    last = f"the last at {seen.all_first_at:.1f} s" if seen.all_first_at else "not all by the limit"
    print(
        f"  {'PASS' if every else 'MISS'}  every VM has a first point within "
        f"{FIRST_POINT_TARGET_S:g} s of the first scan: {within} of {seen.vms} did; {last}"
    )
    none_early = not seen.early_vms and seen.all_first_at is not None
    print(
        f"  {'PASS' if none_early else 'MISS'}  no VM gets a second point before every VM "
        f"has a first: {len(seen.early_vms)} did{ended}"
    )
    print_left_out(seen, names)


def print_left_out(seen: FirstPoints, names: list[str]) -> None:
    """Where the VMs that never got a point stand in the order every scan dispatches."""
    left = [i for i, name in enumerate(names) if vm_id_for(name) not in seen.first_point]
    if not left:
        return
    span = "all" if len(left) == left[-1] - left[0] + 1 else "some"
    print(
        f"  VMs without a point at the end: {len(left)}, {span} of positions "
        f"{left[0] + 1}-{left[-1] + 1} of {len(names)} in the order each scan dispatches"
    )


def print_timeline(samples: list[Sample]) -> None:
    if not samples:
        return
    stride = max(1, len(samples) // TIMELINE_ROWS)
    shown = samples[::stride]
    if shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    print(
        "  s after first scan  period queue  local queue  VMs with a point  runs started  "
        "points  failed runs"
    )
    for s in shown:
        print(
            f"  {s.at:18.0f}  {s.period_queue:12,}  {s.local_queue:11,}  "
            f"{s.vms_with_a_point:16,}  {s.runs_started:12,}  {s.points:6,}  "
            f"{s.failed_runs:11,}"
        )


# --- part 2: one scan over many VMs ---------------------------------------------------


@dataclass(frozen=True)
class ScanTiming:
    seconds: float | None  # None: no result within the limit
    how: str
    vms_started: int
    pickup: float | None  # send -> the scan's event (the worker took the task)


def time_scan(fleet: LocalFleet, limit_s: float) -> ScanTiming:
    """Send one scan; its own `seconds` if its event has them, else send -> result."""
    client = redis.Redis.from_url(fleet.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key("events"))
    sent = time.time()
    answer = scan_answer(limit_s)
    done = time.time()
    # The task's AsyncResult sits in a reference cycle; its finalizer unsubscribes from
    # the result in Redis and, once the fleet's Redis is stopped, retries that for
    # minutes. Collect it now, while Redis is up.
    gc.collect()
    events = drain_scan_events(pubsub)
    pubsub.close()
    pickup = float(events[0]["time"]) - sent if events and events[0].get("time") else None
    own = [float(e["seconds"]) for e in events if e.get("seconds") is not None]
    if isinstance(answer, str):
        return ScanTiming(None, answer, 0, pickup)
    started = len(answer.get("started", []))
    if own:
        return ScanTiming(own[-1], "the scan event's `seconds`", started, pickup)
    return ScanTiming(done - sent, "send to result (no `seconds` in the event)", started, pickup)


def scan_answer(limit_s: float) -> dict[str, Any] | str:
    """The scan task's result, or why there is none (it failed, or took over `limit_s`).

    Its end is seen within RESULT_POLL_S.
    """
    from hamal_workers.celery_app import app

    result = app.send_task("hamal.period.scan", queue="period")
    deadline = time.monotonic() + limit_s
    while not result.ready():
        if time.monotonic() > deadline:
            return f"no result within {limit_s:g} s"
        time.sleep(RESULT_POLL_S)
    answer = result.result
    return answer if isinstance(answer, dict) else f"the scan failed: {answer!r}"


def drain_scan_events(pubsub: Any) -> list[dict[str, Any]]:
    """Every `scan` event that arrived; waits a moment for one published at the end."""
    events = []
    quiet_until = time.monotonic() + 1.0
    while time.monotonic() < quiet_until:
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            continue
        event = json.loads(message["data"])
        if event.get("event") == "scan":
            events.append(event)
    return events


def one_scan(
    fleet: LocalFleet, overrides: dict[str, str], inventory: Path, vms: int, limit_s: float
) -> None:
    started = time.perf_counter()
    make_vms(inventory, vms, 2, 0)
    built = time.perf_counter() - started
    print(
        f"\nPart 2: one scan over {vms:,} VMs x 2 empty sparse disks (built in {built:.0f} s), "
        f"only a period worker (-c {WORKER_CONCURRENCY}) running",
        flush=True,
    )
    overrides["HAMAL_LOCAL_INVENTORY"] = str(inventory)  # read when a process starts
    fleet.start_worker("period", ["period"], concurrency=WORKER_CONCURRENCY)
    fleet.wait_worker_ready("period")
    timing = time_scan(fleet, limit_s)
    fleet.stop("period")
    pickup = ""
    if timing.pickup is not None:
        pickup = f"; the worker took it {timing.pickup:.2f} s after it was sent"
    if timing.seconds is None:
        print(f"  MISS  a scan over {vms:,} VMs within {SCAN_TARGET_S:g} s: {timing.how}{pickup}")
        return
    met = timing.seconds <= SCAN_TARGET_S
    print(
        f"  {'PASS' if met else 'MISS'}  a scan over {vms:,} VMs within {SCAN_TARGET_S:g} s: "
        f"{timing.seconds:.1f} s ({timing.how}); it started {timing.vms_started:,} VM syncs"
        f"{pickup}"
    )


# --- the whole bench -------------------------------------------------------------------


def run(root: Path, vms: int, scan_vms: int, limit_s: float) -> None:
    images.remove_tree(root)
    overrides = {"HAMAL_PERIOD_INTERVAL": str(INTERVAL_S)}
    fleet = LocalFleet(root / "fleet", overrides)
    try:
        fleet.start_redis()
        fleet.apply_env()
        first_points(fleet, overrides, root / "inventory-1", vms, limit_s)
        # A clean slate for part 2: no state, queues or results from part 1.
        redis.Redis.from_url(fleet.redis_url).flushall()
        images.remove_tree(root / "inventory-1")
        one_scan(fleet, overrides, root / "inventory-2", scan_vms, limit_s)
    except FleetError as exc:
        print(f"  stopped: {exc}")
    finally:
        fleet.stop_all()
    images.remove_tree(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench" / "scale"))
    parser.add_argument("--vms", type=int, default=1000, help="VMs in part 1")
    parser.add_argument("--scan-vms", type=int, default=10_000, help="VMs in part 2's scan")
    parser.add_argument("--limit", type=float, default=240, help="seconds per part at most")
    args = parser.parse_args()
    print(report.header("bench/scale.py"), end="")
    run(Path(args.root), args.vms, args.scan_vms, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
