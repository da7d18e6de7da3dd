"""No run stalls: messages a dead worker took, finalizes that keep failing, lost staged disks,
and a scan that never piles up requests. Real redis-server and celery worker processes."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from typing import Any

from hamal_workers.config import load
from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
SMALL = ImageLayout(
    size=16 * MiB, random_bytes=4 * MiB, compressible_bytes=0, zero_bytes=0, piece=MiB
)
SLOW = ImageLayout(
    size=48 * MiB, random_bytes=24 * MiB, compressible_bytes=0, zero_bytes=0, piece=4 * MiB
)
QUICK = {
    "HAMAL_PERIOD_INTERVAL": "5",
    "HAMAL_WORKER_LEASE_TIMEOUT": "3",
    "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
}


def fleet_task(fleet: LocalFleet) -> Any:
    """The product's task base with the fleet's settings, to run a scan step in this process."""
    # Imported here: the task modules read the fleet's config, set up by the fixtures.
    from hamal_workers.tasks.base import HamalTask

    class FleetTask(HamalTask):
        settings = load(str(fleet.config), fleet.env())  # type: ignore[assignment]

    return FleetTask()


def restores(fleet: LocalFleet, images: list[Path], point: str) -> bool:
    store = ChunkStore(fleet.root / "store", create=False)
    for image in images:
        out = fleet.root / "out.raw"
        restore_disk(store, vm_id_for(image.parent.name), point, image.name, out)
        same = filecmp.cmp(image, out, shallow=False)
        out.unlink()
        if not same:
            return False
    return True


def test_a_scan_requests_each_vm_once_oldest_point_first(fleet: LocalFleet, state: State) -> None:
    make_inventory(fleet.root / "inventory", vms=12, disks=1, layout=SMALL)
    fleet.overrides = {**fleet.overrides, **QUICK}
    from hamal_workers.tasks.scan import _scan

    # No worker takes anything: every request stays waiting, as behind a long backlog.
    newest_first = [vm_id_for(f"vm{n:02d}") for n in range(1, 13)]
    for age, vm_id in enumerate(newest_first[:6]):  # six VMs had points, vm01 the newest
        state.set_vm_fields(vm_id, last_success=str(1_000_000 - age))
    task = fleet_task(fleet)
    first = _scan(task)
    second = _scan(task)
    assert (first["requests"], second["requests"], second["waiting"]) == (12, 0, 12)
    order = [state.take_request() for _ in range(12)]
    # Never-synced VMs first (their order is free), then the oldest newest point first.
    assert set(order[:6]) == set(newest_first[6:])
    assert order[6:] == list(reversed(newest_first[:6]))
    # A few messages take them, not one per VM: the queue stays short (beside them, the
    # one garbage collection pass a scan may send).
    sent = [
        json.loads(message)["headers"]["task"]
        for name in state.r.keys("period*")
        for message in state.r.lrange(name, 0, -1)
    ]
    assert sent.count("hamal.gc") <= 1 and len(sent) - sent.count("hamal.gc") <= 2, sent


def test_messages_a_dead_worker_took_are_sent_again(
    fleet: LocalFleet, state: State, events
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=1, disks=3, layout=SLOW)
    fleet.overrides = {**fleet.overrides, **QUICK, "HAMAL_LOCAL_RELEASE_CPU_TIME": "40"}
    fleet.start_worker("period", ["period"], concurrency=1)
    # It takes up to four messages while it runs one: three disks, one running, two waiting.
    fleet.start_worker("greedy", ["local"], concurrency=1, extra=["--prefetch-multiplier", "4"])
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("greedy")
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id_for("vm01"), "platform": "local"})
    run_id = events.wait(lambda e: e["event"] == "run-started", 60, "the run")["run_id"]
    events.wait(lambda e: e["event"] == "disk-started", 60, "the first disk")
    taken = [state.disk(run_id, i.name).fields.get("received_by") for i in images]
    assert all(taken), taken  # the worker holds all three messages
    fleet.kill("greedy", restart=False)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("local")
    fleet.start_beat()
    end = events.wait(lambda e: e["event"] == "run" and e["run_id"] == run_id, 120, "the run")
    assert end["status"] == "committed", state.run(run_id)
    assert restores(fleet, images, run_id)
    log = (fleet.root / "log" / "hamal-period.log").read_text()
    assert "which took it, is gone" in log


def test_a_finalize_that_keeps_failing_gives_up_and_fails_the_run_cleanly(
    fleet: LocalFleet, state: State, events
) -> None:
    make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    # Not a store error: the metadata directory cannot be made (a file is in its way).
    (fleet.root / "lib").mkdir()
    (fleet.root / "lib" / "metadata").write_text("in the way")
    fleet.overrides = {**fleet.overrides, **QUICK, "HAMAL_SYNC_SAVE_LOCAL_SNAPSHOT_METADATA": "1"}
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    from hamal_workers.celery_app import app

    vm_id = vm_id_for("vm01")
    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"})
    run_id = events.wait(lambda e: e["event"] == "run-started", 60, "the run")["run_id"]
    end = events.wait(lambda e: e["event"] == "run" and e["run_id"] == run_id, 120, "the run")
    assert end["status"] == "failed"
    run = state.run(run_id)
    assert run["error"].startswith("finalize gave up after 5 attempts"), run
    assert "active_run" not in state.vm(vm_id)
    assert state.live_snapshots() == {}
    assert not list((fleet.root / "lib" / "snapshots").rglob("*.raw"))
    assert ChunkStore(fleet.root / "store", create=False).points(vm_id) == []
    vm_log = next((fleet.root / "log").glob("vm-vm01_Agent-*.log")).read_text()
    assert "finalize gave up" in vm_log


def test_a_disk_whose_staged_manifest_is_lost_is_synced_again(
    fleet: LocalFleet, state: State, events
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=1, disks=2, layout=SMALL)
    marker = fleet.root / "fired"
    fleet.overrides = {**fleet.overrides, **QUICK, "HAMAL_FAULTS": f"after-last-disk@{marker}"}
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id_for("vm01"), "platform": "local"})
    run_id = events.wait(lambda e: e["event"] == "run-started", 60, "the run")["run_id"]
    for _ in images:
        events.wait(lambda e: e["event"] == "disk" and e["run_id"] == run_id, 60, "a disk")
    # Its last disk task died before sending the finalize; a staged manifest is lost too.
    (victim,) = [p for p in (fleet.root / "store" / "staging").rglob("disk1.raw.manifest")]
    os.unlink(victim)
    fleet.start_beat()
    end = events.wait(lambda e: e["event"] == "run" and e["run_id"] == run_id, 120, "the run")
    assert end["status"] == "committed", state.run(run_id)
    assert state.run(run_id)["restaged"] == "1"
    assert restores(fleet, images, run_id)


def test_a_vm_claimed_by_a_run_that_no_longer_runs_is_freed(
    fleet: LocalFleet, state: State
) -> None:
    """What a claim outliving its run looks like (a run record expired or lost): the scan
    frees the VM and requests it, instead of skipping it forever."""
    make_inventory(fleet.root / "inventory", vms=2, disks=1, layout=SMALL)
    fleet.overrides = {**fleet.overrides, **QUICK}
    from hamal_workers.tasks.scan import _scan

    ghost = vm_id_for("vm01")
    state.set_vm_fields(ghost, active_run="20200101T000000.000000Z-0f0f0f")
    done = _scan(fleet_task(fleet))
    assert any("freed from run 20200101T000000.000000Z-0f0f0f" in r for r in done["repair_lines"])
    assert "active_run" not in state.vm(ghost)
    second = _scan(fleet_task(fleet))
    assert state.requested(ghost) and (second["requests"], second["waiting"]) == (1, 1)


def test_a_disk_whose_retries_ran_out_is_settled_failed_once(state: State) -> None:
    """What DiskSyncTask.on_failure does when Celery gives up retrying a disk."""
    from hamal_workers.state import Writes

    writes = Writes()
    state.start_run(writes, "vm", "run", {"vm_id": "vm"})
    state.plan_disks(writes, "run", ["a", "b"])
    state.apply(writes)
    state.set_disk_fields("run", "b", state="running")  # still being synced: left alone
    assert state.settle_disk_if_queued("run", "b", {"state": "failed"}) is False
    assert state.disk("run", "b").state == "running"
    # Settled, but not the run's last pending disk: no finalize yet.
    assert state.settle_disk_if_queued("run", "a", {"state": "failed", "error": "gave up"}) is False
    assert state.disk("run", "a").fields["error"] == "gave up"
    assert state.pending_disks("run") == ["b"]
    assert state.settle_disk_if_queued("run", "a", {"state": "failed"}) is False  # once
    state.set_disk_fields("run", "b", state="queued")  # its retries ran out too: the last
    assert state.settle_disk_if_queued("run", "b", {"state": "failed"}) is True
