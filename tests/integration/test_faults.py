"""kill -9 at each named step of a sync (hamal_workers/faults.py): nothing committed is lost,
the VM gets its point anyway, and nothing is left behind on the source or in the store.

Each test arms one crash point in the fleet's environment; the first process to reach it
dies with SIGKILL (once: a marker file), the fleet's own repairs do the rest. The test
waits on the events the fleet publishes, then checks what an operator would.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import LocalPlatform, vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
LAYOUT = ImageLayout(
    size=48 * MiB, random_bytes=12 * MiB, compressible_bytes=8 * MiB, zero_bytes=4 * MiB, piece=MiB
)
INTERVAL = 5
LEASE = 3

FAST_REPAIRS = {
    "HAMAL_PERIOD_INTERVAL": str(INTERVAL),
    "HAMAL_WORKER_LEASE_TIMEOUT": str(LEASE),
    "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
    "HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY": "1",
    "HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT": "1",
    # About 2 s per disk: a checkpoint is flushed before the disk is done.
    "HAMAL_LOCAL_RELEASE_CPU_TIME": "60",
}


def start_fleet(fleet: LocalFleet, fault: str) -> Path:
    marker = fleet.root / "fault-fired"
    fleet.overrides = {**fleet.overrides, **FAST_REPAIRS, "HAMAL_FAULTS": f"{fault}@{marker}"}
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    fleet.start_beat()
    return marker


def committed_after_fault(events, marker: Path, vm_id: str, timeout: float) -> dict:
    """The first run of the VM committed after the fault fired."""

    def done(event: dict) -> bool:
        return (
            event["event"] == "run"
            and event["vm_id"] == vm_id
            and event["status"] == "committed"
            and marker.exists()
        )

    return events.wait(done, timeout, "a committed point after the crash")


def quiesce(fleet: LocalFleet, state: State, events) -> None:
    """Let one more scan repair and sweep, then stop new runs and let the running ones end."""
    events.wait(lambda e: e["event"] == "scan", 30, "a scan after the point")
    fleet.stop("beat")
    while state.active_runs() or any(state.vm(v).get("requested_at") for v in state.vm_ids()):
        events.wait(lambda e: e["event"] in ("run", "vm-sync"), 60, "the fleet to go idle")


def check_nothing_lost_or_left(fleet: LocalFleet, state: State, images: list[Path]) -> None:
    store = ChunkStore(fleet.root / "store", create=False)
    for image in images:
        vm_id = vm_id_for(image.parent.name)
        points = store.points(vm_id)
        assert points, f"{image.parent.name} has no point"
        for point in points:  # the source never changed: every point restores to it
            out = fleet.root / "restored.raw"
            restore_disk(store, vm_id, point.point_id, image.name, out)
            assert filecmp.cmp(image, out, shallow=False), (point.point_id, image)
            out.unlink()
    platform = LocalPlatform(str(fleet.root / "inventory"), str(fleet.root / "lib"))
    assert platform.leftover_snapshots() == [], "a hamal- snapshot was left on the source"
    assert state.live_snapshots() == {}
    assert store.staged_points() == []
    assert state.active_runs() == []


@pytest.mark.parametrize(
    "fault",
    ["after-claim", "after-snapshot", "after-plan", "mid-disk", "after-last-disk", "mid-finalize"],
)
def test_kill_9_at_a_step_loses_nothing_and_leaves_nothing(
    fleet: LocalFleet, state: State, events, fault: str
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=1, disks=2, layout=LAYOUT)
    marker = start_fleet(fleet, fault)
    committed_after_fault(events, marker, vm_id_for("vm01"), timeout=120)
    quiesce(fleet, state, events)
    check_nothing_lost_or_left(fleet, state, images)
    main_log = (fleet.root / "log" / "hamal-period.log").read_text()
    if fault in ("after-claim", "after-snapshot"):
        assert "died while snapshotting" in main_log, main_log[-3000:]
    if fault == "after-plan":
        assert "disk tasks sent (vm.sync died)" in main_log, main_log[-3000:]
    if fault in ("mid-disk",):
        assert "stopped renewing the lease" in main_log, main_log[-3000:]
    if fault in ("after-last-disk", "mid-finalize"):
        assert "finalize sent again" in main_log, main_log[-3000:]


def test_kill_9_mid_sweep_then_the_next_sweep_finishes(
    fleet: LocalFleet, state: State, events
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    platform = LocalPlatform(str(fleet.root / "inventory"), str(fleet.root / "lib"))
    (vm,) = platform.discover()
    # What a run that Redis forgot leaves on the source: only the platform knows of it.
    platform.create_snapshot(vm, "hamal-20200101T000000Z-dead01")
    platform.create_snapshot(vm, "hamal-20200101T000000Z-dead02")
    marker = start_fleet(fleet, "mid-sweep")
    committed_after_fault(events, marker, vm.vm_id, timeout=120)
    quiesce(fleet, state, events)
    check_nothing_lost_or_left(fleet, state, images)
