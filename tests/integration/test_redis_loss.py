"""Redis lost under a running fleet (FLUSHALL, kill -9) or a beat killed: the fleet heals itself.

Each test runs its own redis-server (AOF on): flushing or killing the session one would
break the other tests. The fleet's processes are supervised like compose services
(`restart: unless-stopped`); the beats must survive Redis loss without being restarted.
"""

from __future__ import annotations

import filecmp
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from hamal_workers.localfleet import FleetError, LocalFleet, free_port, wait_for
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory, scribble
from hamal_workers.state import key
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk
from tests.integration.conftest import Events

MiB = 1024 * 1024
INTERVAL = 5
LOOP = 5  # beat_max_loop_interval: min(5, interval)
LOCK_TIMEOUT = 3 * LOOP
SMALL = ImageLayout(
    size=32 * MiB, random_bytes=8 * MiB, compressible_bytes=4 * MiB, zero_bytes=0, piece=1 * MiB
)
# 192 MiB read at about 25 MiB/s (the throttle): a sync of about 8 s, long enough to kill into.
SLOW = ImageLayout(
    size=512 * MiB, random_bytes=128 * MiB, compressible_bytes=64 * MiB, zero_bytes=0, piece=4 * MiB
)
# One reader sleeping 40 ms per MB: a sync slow enough to be caught in the middle.
SLOW_READS = {
    "HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT": "1",
    "HAMAL_LOCAL_RELEASE_CPU_TIME": "40",
}
SENT_SCAN = re.compile(r"^\S+ (\d+) INFO \[beat\] celery\.beat: Scheduler: Sending due task", re.M)


@pytest.fixture
def client(fleet: LocalFleet) -> redis.Redis:
    """The test's own redis-server, which the fleet uses and the test may flush or kill."""
    fleet.redis_port = free_port()
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_PERIOD_INTERVAL": str(INTERVAL),
        "HAMAL_WORKER_LEASE_TIMEOUT": "3",
        "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
        "HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY": "1",
    }
    fleet.start_redis()
    return redis.Redis(port=fleet.redis_port)


@pytest.fixture
def fleet_events(client: redis.Redis) -> Iterator[Events]:
    events = Events(client)
    yield events
    events.pubsub.close()


def mark(client: redis.Redis, events: Events, what: str) -> None:
    """Publish a marker and read up to it: every event after it happened after `what`."""
    client.publish(key("events"), json.dumps({"event": "marker", "what": what}))
    events.wait(lambda e: e == {"event": "marker", "what": what}, 10, f"the marker {what!r}")


def scans(events: Events, count: int, timeout: float) -> list[float]:
    return [
        events.wait(lambda e: e["event"] == "scan", timeout, f"scan {n + 1} of {count}")["time"]
        for n in range(count)
    ]


def one_per_interval(times: list[float]) -> bool:
    # Two beats both emitting would put two scans within a second of each other.
    return all(b - a > INTERVAL * 0.6 for a, b in zip(times, times[1:], strict=False))


def scan_senders(fleet: LocalFleet, since: int) -> list[int]:
    """Pids of the beats that sent a scan, read from the shared log from byte `since` on."""
    text = (fleet.root / "log" / "hamal-period.log").read_bytes()[since:].decode()
    return [int(pid) for pid in SENT_SCAN.findall(text)]


def log_size(fleet: LocalFleet) -> int:
    path = fleet.root / "log" / "hamal-period.log"
    return path.stat().st_size if path.exists() else 0


def committed_runs(events: Events, vm_ids: set[str], timeout: float) -> dict[str, str]:
    """Until every VM has a run started from now on committed: vm_id -> its point id."""
    started: set[str] = set()
    committed: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while set(committed) != vm_ids:
        event = events.wait(
            lambda e: e["event"] in ("run-started", "run"),
            deadline - time.monotonic(),
            f"a new committed point of every VM (have {sorted(committed)})",
        )
        if event["event"] == "run-started":
            started.add(event["run_id"])
        elif event["run_id"] in started and event["status"] == "committed":
            committed.setdefault(event["vm_id"], event["run_id"])
    return committed


def assert_restores(fleet: LocalFleet, images: list[Path], points: dict[str, str]) -> None:
    store = ChunkStore(str(fleet.root / "store"))
    for image in images:
        vm_id = vm_id_for(image.parent.name)
        out = fleet.root / f"restored-{image.parent.name}-{image.name}"
        restore_disk(store, vm_id, points[vm_id], image.name, str(out))
        assert filecmp.cmp(image, out, shallow=False), f"{image} differs from its restore"
        out.unlink()


def start_workers(fleet: LocalFleet) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=2)


def restarts(fleet: LocalFleet) -> dict[str, int]:
    return {name: proc.restarts for name, proc in fleet.procs.items()}


def test_flushall_on_a_running_fleet_heals(
    fleet: LocalFleet, client: redis.Redis, fleet_events: Events
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=3, disks=1, layout=SMALL)
    vm_ids = {vm_id_for(image.parent.name) for image in images}
    start_workers(fleet)
    fleet.start_beat()
    # Every publisher has sent (and cached its queue declarations) before the flush.
    committed_runs(fleet_events, vm_ids, 90)

    rng = random.Random(5)
    for image in images:
        scribble(image, rng, writes=4)
    client.flushall()
    mark(client, fleet_events, "flushed")
    flushed_at = time.time()

    first = scans(fleet_events, 1, 2 * INTERVAL + LOOP + 5)[0]
    assert first - flushed_at <= 2 * INTERVAL + LOOP, first - flushed_at
    # beat -> scan -> vm.sync -> disk.sync -> finalize: every long-lived publisher sent again.
    points = committed_runs(fleet_events, vm_ids, 90)
    assert_restores(fleet, images, points)
    assert fleet.procs["beat"].popen.poll() is None and restarts(fleet)["beat"] == 0
    # Those messages reached their queues although kombu's bindings were flushed for good.
    assert not client.keys("_kombu.binding.*")


def test_two_beats_one_emits_after_flushall(
    fleet: LocalFleet, client: redis.Redis, fleet_events: Events
) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_beat("beat-a")
    fleet.start_beat("beat-b")
    scans(fleet_events, 2, 4 * INTERVAL)

    client.flushall()
    since = log_size(fleet)
    mark(client, fleet_events, "flushed")
    times = scans(fleet_events, 4, 2 * INTERVAL + LOOP + 5)
    assert one_per_interval(times), times
    senders = scan_senders(fleet, since)
    assert len(senders) >= 4 and len(set(senders)) == 1, senders
    assert all(p.popen.poll() is None for p in fleet.procs.values()), "a process died"
    assert restarts(fleet) == dict.fromkeys(fleet.procs, 0)


def test_kill_9_of_the_active_beat(
    fleet: LocalFleet, client: redis.Redis, fleet_events: Events
) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_beat("beat-a")
    scans(fleet_events, 1, 4 * INTERVAL)
    fleet.start_beat("beat-b")
    scans(fleet_events, 1, 2 * INTERVAL)  # beat-b is up, waiting for the lock

    active = fleet.procs["beat-a"].popen.pid
    fleet.kill("beat-a")
    killed_at = time.time()
    since = log_size(fleet)
    mark(client, fleet_events, "killed")
    # The lock expires, a standby (beat-b, or beat-a restarted) takes it on its next try.
    first = scans(fleet_events, 1, LOCK_TIMEOUT + 2 * LOOP + 5)[0]
    assert first - killed_at <= LOCK_TIMEOUT + 2 * LOOP, first - killed_at
    times = [first, *scans(fleet_events, 3, 2 * INTERVAL)]
    assert one_per_interval(times), times
    senders = scan_senders(fleet, since)
    assert active not in senders and len(set(senders)) == 1, (active, senders)
    # The killed beat is back, as a standby.
    assert fleet.procs["beat-a"].popen.poll() is None and restarts(fleet)["beat-a"] == 1


def test_kill_9_of_redis_mid_sync(
    fleet: LocalFleet, client: redis.Redis, fleet_events: Events
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SLOW)
    vm_id = vm_id_for("vm01")
    fleet.overrides = {**fleet.overrides, **SLOW_READS}
    start_workers(fleet)
    fleet.start_beat()
    run_id = fleet_events.wait(lambda e: e["event"] == "run-started", 60, "the first run")["run_id"]
    fleet_events.wait(lambda e: e["event"] == "disk-started", 30, "its disk to start")

    fleet.kill("redis")  # restarted on the same port and --dir, with its AOF
    finished = fleet_events.wait(
        lambda e: e["event"] == "run" and e["run_id"] == run_id, 120, "the interrupted run to end"
    )
    assert finished["status"] == "committed", finished
    assert_restores(fleet, images, {vm_id: run_id})
    # And the scans go on: a later run commits too.
    assert committed_runs(fleet_events, {vm_id}, 120)
    assert restarts(fleet)["redis"] == 1 and restarts(fleet)["beat"] == 0


def test_beat_outlives_a_redis_outage(
    fleet: LocalFleet, client: redis.Redis, fleet_events: Events
) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_beat()
    scans(fleet_events, 1, 4 * INTERVAL)

    since = log_size(fleet)
    fleet.kill("redis", restart=False)

    def beat_saw_the_outage() -> bool:
        if fleet.procs["beat"].popen.poll() is not None:
            raise FleetError(f"beat exited: {fleet.procs['beat'].log.read_text()[-2000:]}")
        log = (fleet.root / "log" / "hamal-period.log").read_bytes()[since:]
        return b"beat: Redis unavailable" in log

    wait_for(beat_saw_the_outage, 2 * LOOP + 5, "the beat to tick without Redis")
    fleet.start_redis()  # the same port and --dir
    times = scans(fleet_events, 2, 2 * INTERVAL + LOOP)
    assert one_per_interval(times), times
    assert fleet.procs["beat"].popen.poll() is None and restarts(fleet)["beat"] == 0


def test_flushall_mid_sync_leaves_nothing_behind(
    fleet: LocalFleet, client: redis.Redis, fleet_events: Events
) -> None:
    """A run Redis forgot: its snapshot and its staged disk are found in the platform and the
    store, not in Redis, and removed; the points before the flush stay listed and restorable,
    and the next point is still incremental (its base and tokens come from the store)."""
    images = make_inventory(
        fleet.root / "inventory", vms=1, disks=2, layout=SLOW, track_changes=True
    )
    fast, slow = images
    fast.write_bytes(fast.read_bytes()[: 16 * 1024 * 1024])  # done long before the other
    vm_id = vm_id_for("vm01")
    fleet.overrides = {**fleet.overrides, **SLOW_READS}
    start_workers(fleet)
    fleet.start_beat()
    before = committed_runs(fleet_events, {vm_id}, 120)[vm_id]
    scribble(slow, random.Random(3), writes=3)
    run_id = fleet_events.wait(lambda e: e["event"] == "run-started", 60, "the next run")["run_id"]
    fleet_events.wait(
        lambda e: e["event"] == "disk" and e["run_id"] == run_id, 60, "its small disk to be staged"
    )
    client.flushall()
    mark(client, fleet_events, "flushed")

    after = committed_runs(fleet_events, {vm_id}, 120)[vm_id]
    store = ChunkStore(str(fleet.root / "store"))
    assert before in store.point_ids(vm_id) and after in store.point_ids(vm_id)
    assert run_id not in store.point_ids(vm_id)
    assert_restores(fleet, images, {vm_id: after})
    assert_restores_point(fleet, images, vm_id, before)  # from before the flush, still good
    history = client.lrange(key("history", vm_id), 0, -1)
    newest = json.loads(history[0])
    assert newest["run_id"] == after
    assert {d["mode"] for d in newest["disks"].values()} == {"changed"}  # still incremental
    # What the forgotten run left: gone once a scan after it has swept.
    fleet_events.wait(lambda e: e["event"] == "scan", 3 * INTERVAL, "a scan after the point")
    leftovers = [p.name for p in (fleet.root / "lib" / "snapshots").rglob(f"hamal-{run_id}")]
    assert leftovers == []
    assert [p.point_id for p in store.staged_points()] in ([], [after]), store.staged_points()


def assert_restores_point(fleet: LocalFleet, images: list[Path], vm_id: str, point: str) -> None:
    store = ChunkStore(str(fleet.root / "store"))
    for image in images:
        assert image.name in store.point(vm_id, point).disks
        out = fleet.root / f"old-{image.name}"
        restore_disk(store, vm_id, point, image.name, str(out))
        assert out.stat().st_size > 0
        out.unlink()
