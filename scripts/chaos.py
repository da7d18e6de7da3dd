"""`make chaos`: a fleet under kill -9 and Redis restarts, then every restore point checked.

3 VMs x 2 disks (one VM with change tracking, two without) whose guests keep writing;
a real redis-server (AOF on), beat and workers as separate processes under the fleet's
supervisor (which restarts what dies, like compose's `restart: unless-stopped`). Over
about 15 minutes: 50 kill -9 of a random worker process (a main process or a prefork
child) at random times and 3 kill -9 of redis-server, restarted on the same data.

At the end, with the faults stopped:
- every committed point restores byte for byte to what its disks held at its snapshot
  (the guest records, per disk, the blake3 of every chunk after each of its writes, and
  the point's snapshot time says which of those states it must equal);
- every VM has a point newer than the last fault;
- no `hamal-` snapshot is left on the source, none in Redis, no staged point;
- the store holds no temporary file; after two more garbage collection passes it holds
  exactly the chunks some manifest names, and no condemned copy.
One line of counts; exit 0 only when all of these hold.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.simulators.local_vms import (  # noqa: E402
    ImageLayout,
    make_inventory,
    scribble,
)

MiB = 1024 * 1024
CHUNK = 4 * MiB
LAYOUT = ImageLayout(
    size=64 * MiB, random_bytes=12 * MiB, compressible_bytes=8 * MiB, zero_bytes=4 * MiB, piece=MiB
)


@dataclass
class DiskHistory:
    """The states a disk went through: each write's start and end time, then its chunks."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    states: list[list[str]] = field(default_factory=list)

    def record(self, started: float, ended: float, image: Path) -> None:
        self.starts.append(started)
        self.ends.append(ended)
        self.states.append(chunk_digests(image))

    def seen_at(self, when: float) -> list[list[str]]:
        """What a snapshot taken at `when` may have seen: the last state written before it,
        and that of a write in progress then (the snapshot may have come before or after
        it took its lock; never in the middle)."""
        last = max(bisect.bisect_right(self.ends, when) - 1, 0)
        candidates = [self.states[last]]
        for index in range(last + 1, len(self.states)):
            if self.starts[index] <= when:
                candidates.append(self.states[index])
        return candidates


def chunk_digests(path: Path) -> list[str]:
    out = []
    with path.open("rb") as fh:
        while data := fh.read(CHUNK):
            out.append(blake3.blake3(data).hexdigest())
    return out


def guest_write(image: Path, rng: random.Random, history: DiskHistory) -> None:
    started = time.time()
    scribble(image, rng, writes=rng.randint(1, 4), max_len=512 * 1024)
    history.record(started, time.time(), image)


def worker_pids(fleet: LocalFleet) -> list[tuple[str, int]]:
    found = []
    for name, proc in list(fleet.procs.items()):
        if name in ("redis", "beat") or proc.popen.poll() is not None:
            continue
        try:
            main = psutil.Process(proc.popen.pid)
            found.append((name, main.pid))
            found += [(name, child.pid) for child in main.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(REPO / ".chaos"))
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--redis-restarts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    inventory = root / "inventory"
    images = make_inventory(inventory, vms=1, disks=2, layout=LAYOUT, track_changes=True)
    more = make_inventory(root / "more", vms=3, disks=2, layout=LAYOUT)[2:]
    for image in more:  # vm02 and vm03, without change tracking
        dest = inventory / image.parent.name / image.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(image, dest)
        images.append(dest)
    shutil.rmtree(root / "more")
    history = {image: DiskHistory() for image in images}
    for image in images:
        history[image].record(0.0, 0.0, image)
    fleet = LocalFleet(
        root,
        {
            "HAMAL_LOCAL_INVENTORY": str(inventory),
            "HAMAL_PERIOD_INTERVAL": "5",
            "HAMAL_WORKER_LEASE_TIMEOUT": "6",
            "HAMAL_REDIS_SOCKET_TIMEOUT": "1",
            "HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY": "1",
            "HAMAL_LOCAL_RELEASE_CPU_TIME": "20",
            # A short retention: points expire all along, so garbage collection passes
            # run all along too, and get killed like everything else.
            "HAMAL_RETENTION_KEEP_LAST": "4",
            "HAMAL_RETENTION_KEEP_DAILY": "0",
            "HAMAL_RETENTION_KEEP_WEEKLY": "0",
        },
    )
    counts = {"kills": 0, "redis_restarts": 0}
    try:
        fleet.start_redis()
        fleet.apply_env()
        fleet.start_worker("period", ["period"], concurrency=2)
        fleet.start_worker("local", ["local"], concurrency=2)
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("local")
        fleet.start_beat()
        last_fault = run_faults(fleet, images, history, rng, args, counts)
        return check(fleet, images, history, last_fault, counts)
    except FleetError as exc:
        print(f"chaos: the fleet failed: {exc}", file=sys.stderr)
        return 1
    finally:
        # Celery's result objects unsubscribe when collected: let them while Redis runs.
        gc.collect()
        fleet.stop_all()


def run_faults(
    fleet: LocalFleet,
    images: list[Path],
    history: dict[Path, DiskHistory],
    rng: random.Random,
    args: argparse.Namespace,
    counts: dict[str, int],
) -> float:
    duration = args.minutes * 60
    start = time.monotonic()
    faults = ["kill"] * args.kills + ["redis"] * args.redis_restarts
    rng.shuffle(faults)
    at = sorted(rng.uniform(0.05, 0.95) * duration for _ in faults)
    last_fault = time.time()
    for when, fault in zip(at, faults, strict=True):
        while time.monotonic() - start < when:
            image = rng.choice(images)
            guest_write(image, rng, history[image])
            time.sleep(rng.uniform(0.5, 3.0))
        if fault == "redis":
            fleet.kill("redis")  # the supervisor starts it again on the same --dir (AOF)
            counts["redis_restarts"] += 1
        else:
            victims = worker_pids(fleet)
            if victims:
                _, pid = rng.choice(victims)
                with_suppressed_kill(pid)
                counts["kills"] += 1
        last_fault = time.time()
        elapsed = time.monotonic() - start
        print(f"chaos: {elapsed:5.0f} s: {fault} ({counts})", flush=True)
    while time.monotonic() - start < duration:
        time.sleep(1)
    return last_fault


def with_suppressed_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        os.kill(pid, signal.SIGKILL)


def check(
    fleet: LocalFleet,
    images: list[Path],
    history: dict[Path, DiskHistory],
    last_fault: float,
    counts: dict[str, int],
) -> int:
    from hamal_workers.celery_app import settings
    from hamal_workers.platforms.local import LocalPlatform, vm_id_for
    from hamal_workers.state import State
    from hamal_workers.targets import open_target
    from hamal_workers.targets.restore import restore_disk

    state = State.from_url(settings.redis.url)
    target = open_target(settings, create=False)
    vm_names = sorted({image.parent.name for image in images})
    deadline = time.time() + 300
    fresh = set()
    while time.time() < deadline and len(fresh) < len(vm_names):
        for vm in vm_names:
            points = target.points(vm_id_for(vm))
            if points and points[-1].created > last_fault:
                fresh.add(vm)
        time.sleep(1)
    fleet.stop("beat")
    deadline = time.time() + 120
    while state.active_runs() and time.time() < deadline:
        time.sleep(1)
    from hamal_workers.celery_app import app

    # Files a kill cut short are swept once older than two lease times: give them that.
    time.sleep(max(0.0, last_fault + 2 * settings.worker.lease_timeout + 1 - time.time()))
    app.send_task("hamal.period.scan", queue="period", ignore_result=False).get(timeout=120)
    settled = settle_garbage(target, state, settings)
    restored = bad = points_seen = 0
    out = fleet.root / "restored.raw"
    for image in images:
        vm_id = vm_id_for(image.parent.name)
        for point in target.points(vm_id):
            points_seen += 1
            restore_disk(target, vm_id, point.point_id, image.name, out, overwrite=True)
            if chunk_digests(out) in history[image].seen_at(point.created):
                restored += 1
            else:
                bad += 1
                print(f"chaos: MISMATCH {image.parent.name}/{image.name} point {point.point_id}")
    out.unlink(missing_ok=True)
    platform = LocalPlatform(settings.local.inventory, settings.default.hamal_lib_dir)
    snapshots_left = len(platform.leftover_snapshots()) + len(state.live_snapshots())
    staged_left = len(target.staged_points())
    # Quarantined damaged chunks (.damaged.) are kept on purpose; condemned copies are
    # garbage collection's and counted apart; anything else is an orphan.
    temporary = [
        p
        for p in Path(settings.target.path).rglob(".*")
        if p.is_file() and ".damaged." not in p.name and ".condemned." not in p.name
    ]
    result = {
        **counts,
        "disk_points_restored": restored,
        "mismatches": bad,
        "vms_fresh": f"{len(fresh)}/{len(vm_names)}",
        "snapshots_left": snapshots_left,
        "staged_left": staged_left,
        "temporary_files": len(temporary),
        "runs_active": len(state.active_runs()),
        **settled,
    }
    ok = (
        bad == 0
        and points_seen > 0
        and len(fresh) == len(vm_names)
        and snapshots_left == 0
        and staged_left == 0
        and not temporary
        and settled["unnamed_chunks"] == 0
        and settled["condemned_left"] == 0
        and settled["gc_passes"] > 2
    )
    print(("chaos: PASS " if ok else "chaos: FAIL ") + json.dumps(result))
    return 0 if ok else 1


def settle_garbage(target: Any, state: Any, settings: Any) -> dict[str, int]:
    """Two passes once syncs stopped (after any a kill left holding the lease), then count
    what is stored and named by nothing, and condemned copies left."""
    from hamal_workers.gc import MarkSet, collect_exclusively

    lease_ttl = float(settings.worker.lease_timeout)
    passes = 0
    deadline = time.time() + 120
    while passes < 2 and time.time() < deadline:
        report = collect_exclusively(target, state, lease_ttl, young_s=0)
        if report is None:  # a killed collector's lease: it expires within lease_ttl
            time.sleep(0.5)
            continue
        passes += 1
    marks = MarkSet()
    for staged in (True, False):
        for manifest in target.iter_manifests(staged=staged):
            marks.add_digests(manifest.digests)
    chunks = list(target.iter_chunks())
    live = [c.name for c in chunks if not c.condemned]
    named = marks.contains(live)
    return {
        "gc_passes": int(state.r.llen("hamal:gc:history")),
        "unnamed_chunks": int(len(live) - named.sum()),
        "condemned_left": sum(1 for c in chunks if c.condemned),
    }


if __name__ == "__main__":
    sys.exit(main())
