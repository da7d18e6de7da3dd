"""Two beats emit one scan per interval; two deliveries of one disk task make one writer."""

from __future__ import annotations

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import State

MiB = 1024 * 1024
INTERVAL = 5


def test_two_beats_emit_one_scan_per_interval(fleet: LocalFleet, state: State, events) -> None:
    fleet.overrides = {**fleet.overrides, "HAMAL_PERIOD_INTERVAL": str(INTERVAL)}
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.start_beat("beat-a")
    fleet.start_beat("beat-b")
    scans = [
        events.wait(lambda e: e["event"] == "scan", 4 * INTERVAL, f"scan {n}") for n in range(4)
    ]
    times = [s["time"] for s in scans]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Two beats each emitting would put two scans within a second of each other.
    assert all(gap > INTERVAL * 0.6 for gap in gaps), gaps
    assert all(p.popen.poll() is None for p in fleet.procs.values()), "a beat died"


def test_two_deliveries_of_one_disk_task_make_one_writer(
    fleet: LocalFleet, state: State, events
) -> None:
    layout = ImageLayout(
        size=256 * MiB, random_bytes=96 * MiB, compressible_bytes=0, zero_bytes=0, piece=4 * MiB
    )
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=layout)
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_LOCAL_RELEASE_CPU_TIME": "20",
        "HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT": "1",
    }
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    from hamal_workers.celery_app import app

    vm_id = vm_id_for("vm01")
    started = app.send_task(
        "hamal.vm.sync",
        queue="period",
        kwargs={"vm_id": vm_id, "platform": "local"},
        ignore_result=False,
    ).get(timeout=60)
    run_id = started["run_id"]
    kwargs = {
        "run_id": run_id,
        "vm_id": vm_id,
        "vm_name": "vm01",
        "disk": image.name,
        "platform": "local",
    }
    # The first delivery is running (its lease is held) when the duplicate arrives.
    events.wait(lambda e: e["event"] == "disk-started", 30, "the disk task to start")
    duplicate = app.send_task("hamal.disk.sync", queue="local", kwargs=kwargs, ignore_result=False)
    assert duplicate.get(timeout=60) == {
        "status": "skipped",
        "reason": "another task holds the disk's lease",
    }
    finished = events.wait(lambda e: e["event"] == "run", 120, "the run to finish")
    assert finished["status"] == "committed"
    assert state.disk(run_id, image.name).fields["attempts"] == "1"
