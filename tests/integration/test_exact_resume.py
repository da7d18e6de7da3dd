"""A resumed disk task rebuilds exactly the plan it started with, or starts the disk over.

Both cases run on the local platform with change tracking (the guests' writes recorded
in a journal, like CBT), through real workers: the disk task is killed after its first
checkpoint (the `mid-disk` crash point), the scan dispatches it again, and the point it
makes must restore byte for byte.
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import redis

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import ChangeJournal, vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, discard, make_inventory, write_at
from hamal_workers.state import State, key
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
LAYOUT = ImageLayout(
    size=64 * MiB, random_bytes=24 * MiB, compressible_bytes=8 * MiB, zero_bytes=0, piece=4 * MiB
)


def fleet_env(fleet: LocalFleet, fault: str = "") -> None:
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_WORKER_LEASE_TIMEOUT": "3",
        "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
        "HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY": "1",
        "HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT": "1",
        "HAMAL_LOCAL_RELEASE_CPU_TIME": "40",
    }
    if fault:
        fleet.overrides["HAMAL_FAULTS"] = fault
    else:
        fleet.overrides.pop("HAMAL_FAULTS", None)


def sync_once(fleet: LocalFleet, events, vm_id: str) -> str:
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"}, queue="period")
    run = events.wait(lambda e: e["event"] == "run-started", 60, "the run to start")["run_id"]
    return run


def wait_run(events, run_id: str) -> dict:
    return events.wait(
        lambda e: e["event"] == "run" and e["run_id"] == run_id, 120, f"run {run_id} to end"
    )


def wait_expired(client: redis.Redis, name: str, timeout: float = 30) -> None:
    """Until Redis expires `name` (a lease of a killed task): its keyspace event, no polling."""
    client.config_set("notify-keyspace-events", "Ex")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("__keyevent@0__:expired")
    try:
        if not client.exists(name):
            return
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=1.0)
            if msg and msg["data"].decode() == name:
                return
        raise AssertionError(f"{name} did not expire within {timeout} s")
    finally:
        pubsub.close()


def kill_mid_disk_and_resume(
    fleet: LocalFleet, state: State, events, vm_id: str, disk: str, between=lambda: None
) -> tuple[str, dict]:
    """Start a run whose disk task dies after its first checkpoint; repair it; the run's end."""
    marker = fleet.root / f"fired-{len(list(fleet.root.glob('fired-*')))}"
    fleet.stop("local")
    fleet_env(fleet, f"mid-disk@{marker}")
    fleet.start_worker("local-faulty", ["local"], concurrency=1)
    fleet.wait_worker_ready("local-faulty")
    run_id = sync_once(fleet, events, vm_id)
    events.wait(lambda e: e["event"] == "disk-started", 60, "the disk task")
    wait_expired(state.r, key("lease", "disk", run_id, disk))
    assert marker.exists(), "the disk task was not killed at its first checkpoint"
    fields, entries = state.checkpoint(run_id, disk)
    assert fields.get("mode") and entries, "it died before its first checkpoint"
    between()
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")
    return run_id, wait_run(events, run_id)


def start(fleet: LocalFleet) -> None:
    fleet_env(fleet)
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")


def restores_exactly(fleet: LocalFleet, vm_id: str, point: str, image: Path) -> bool:
    store = ChunkStore(fleet.root / "store", create=False)
    out = fleet.root / f"restored-{point}.raw"
    restore_disk(store, vm_id, point, image.name, out)
    try:
        return filecmp.cmp(image, out, shallow=False)
    finally:
        out.unlink()


def test_an_allocated_plan_resumes_as_allocated_although_a_base_exists(
    fleet: LocalFleet, state: State, events
) -> None:
    (image,) = make_inventory(
        fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT, track_changes=True
    )
    vm_id = vm_id_for("vm01")
    start(fleet)
    first = sync_once(fleet, events, vm_id)
    assert wait_run(events, first)["status"] == "committed"
    # The guest discards data (holes where the base has data) and CBT is reset: the
    # next plan must read allocated extents; its unread chunks are zeros, not the base's.
    store = ChunkStore(fleet.root / "store", create=False)
    base = store.manifest(vm_id, first, image.name)
    stored = [i for i, name in enumerate(base.entries) if name is not None]
    for index in stored[::2]:
        discard(image, index * 4 * MiB, 4 * MiB)
    ChangeJournal(image).reset()
    run_id, end = kill_mid_disk_and_resume(fleet, state, events, vm_id, image.name)
    assert end["status"] == "committed", state.run(run_id)
    disk = state.disk(run_id, image.name).fields
    assert disk["mode"] == "allocated" and int(disk["attempts"]) == 2, disk
    assert int(disk["chunks_resumed"]) > 0, disk
    assert restores_exactly(fleet, vm_id, run_id, image)


def test_a_changed_plan_whose_base_is_gone_starts_the_disk_over(
    fleet: LocalFleet, state: State, events
) -> None:
    (image,) = make_inventory(
        fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT, track_changes=True
    )
    vm_id = vm_id_for("vm01")
    start(fleet)
    first = sync_once(fleet, events, vm_id)
    assert wait_run(events, first)["status"] == "committed"
    for n in range(6):  # the guest writes in six chunks: a CHANGED plan reads only those
        write_at(image, (n * 10 + 1) * MiB, os.urandom(64 * 1024))
    store = ChunkStore(fleet.root / "store", create=False)

    def base_deleted() -> None:  # retention (or an operator) removes the base meanwhile
        store.delete_point(vm_id, first)

    run_id, end = kill_mid_disk_and_resume(
        fleet, state, events, vm_id, image.name, between=base_deleted
    )
    assert end["status"] == "committed", state.run(run_id)
    disk = state.disk(run_id, image.name).fields
    assert disk["mode"] == "allocated", disk  # started over: no base, so it read everything
    assert "started over" in disk["notes"], disk
    assert restores_exactly(fleet, vm_id, run_id, image)
    vm_log = next((fleet.root / "log").glob("vm-vm01_Agent-*.log")).read_text()
    assert "started over" in vm_log
