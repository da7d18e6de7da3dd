"""The VMware platform when things go wrong: a worker killed mid-disk, snapshots left
behind by runs that no longer exist, vCenter refusing the proxy's credentials."""

from __future__ import annotations

from typing import Any

import pytest

from hamal_workers.config import load
from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms import open_platform
from hamal_workers.platforms.base import new_run_id, snapshot_name
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from tests.integration.test_crash_resume import wait_checkpoint
from tests.integration.test_vmware_sync import VM, restored, start, sync_refused, vmware_fleet
from tests.integration.vmware_rig import MiB, VSphereRig, digest

pytestmark = pytest.mark.timeout(240)


def scan_now(events: Any) -> dict[str, Any]:
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")
    return events.wait(lambda e: e["event"] == "scan", 60, "a scan")


def test_kill_9_of_the_vmware_worker_resumes_from_its_checkpoint(
    fleet: LocalFleet, state: State, events: Any, start_vcenter: Any
) -> None:
    rig = VSphereRig(start_vcenter(vms=1, disk_mib=384))
    try:
        (disk,) = [str(d.key) for d in rig.disks(VM)]
        rig.fill(VM, disk, seed=41, pieces=40, piece=4 * MiB)
        want = digest(rig.content(VM, disk))  # nothing writes it from here on
        vm_id = rig.uuid(VM)
        vmware_fleet(
            fleet,
            rig,
            HAMAL_PERIOD_INTERVAL="5",
            HAMAL_WORKER_LEASE_TIMEOUT="3",
            HAMAL_REDIS_SOCKET_TIMEOUT="0.5",
            HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY="1",
            HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT="1",
            # About 25 MiB/s: the sync takes several seconds, long enough to be killed in.
            HAMAL_PERIOD_VMWARE_RELEASE_CPU_TIME="40",
        )
        start(fleet)
        fleet.start_beat()
        run_id = events.wait(lambda e: e["event"] == "run-started", 60, "the first run")["run_id"]
        wait_checkpoint(state, run_id, disk, at_least=1, timeout=90)
        total = int(state.checkpoint(run_id, disk)[0]["total"])
        done_before = wait_checkpoint(state, run_id, disk, at_least=total // 3, timeout=90)

        fleet.kill("vmware", restart=False)
        fleet.start_worker("vmware-2", ["vmware"], concurrency=1)
        fleet.wait_worker_ready("vmware-2")
        finished = events.wait(
            lambda e: e["event"] == "run" and e["run_id"] == run_id, 150, "the run"
        )
        assert finished["status"] == "committed", state.run(run_id)
        status = state.disk(run_id, disk).fields
        assert status["attempts"] == "2", status
        assert int(status["chunks_resumed"]) >= done_before, status
        assert int(status["bytes_read"]) <= (total - done_before) * 4 * MiB, status
        assert digest(restored(fleet, vm_id, run_id, disk)) == want

        fleet.stop("beat")
        if state.vm(vm_id).get("active_run"):
            events.wait(lambda e: e["event"] == "run", 120, "the scheduled run to end")
        assert rig.snapshot_names(VM) == []
    finally:
        rig.close()


def test_the_sweep_removes_leftovers_of_dead_runs_and_nothing_else(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    vmware_fleet(fleet, vsphere)
    fleet.apply_env()
    settings = load(fleet.env()["HAMAL_CONF"], fleet.env())
    vsphere.tracking(VM, True)
    # A proxy that crashed between its snapshot and its first record: Redis knows nothing.
    with open_platform("vmware", settings) as platform:
        dead = platform.create_snapshot(platform.vm(VM), snapshot_name(new_run_id()))
    vsphere.snapshot(VM, "nightly")  # the operator's
    vsphere.snapshot(VM, "hamal-manual")  # named like ours, but no run id: not ours
    fleet.overrides["HAMAL_VMWARE_VMS"] = "DC0_H0_VM1"  # the scan syncs the other VM only
    start(fleet)
    swept = scan_now(events)
    assert swept["swept"] == 1, swept
    assert vsphere.snapshot_names(VM) == ["hamal-manual", "nightly"]
    assert dead.snapshot_id not in vsphere.every_snapshot()
    run = events.wait(lambda e: e["event"] == "run", 120, "the scan's sync of the other VM")
    assert run["status"] == "committed", state.run(run["run_id"])


def test_refused_credentials_fail_clearly_without_the_password(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    vmware_fleet(fleet, vsphere, HAMAL_VMWARE_PASSWORD="not-the-password-42")
    start(fleet)
    refused = sync_refused(events, vsphere.uuid(VM))
    assert "refused the login of 'hamal@vsphere.local'" in refused["error"], refused
    assert "not-the-password-42" not in refused["error"]
    logs = "".join(p.read_text() for p in (fleet.root / "log").rglob("*.log"))
    assert "refused the login" in logs and "not-the-password-42" not in logs
    assert vsphere.every_snapshot() == []


def test_a_disk_that_cannot_be_read_fails_the_run_clearly_and_leaves_no_snapshot(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    from tests.integration.test_vmware_sync import sync

    # nbd from a mount that does not hold the VM's datastore: every disk read is refused.
    vmware_fleet(fleet, vsphere, HAMAL_VMWARE_TRANSPORT="nbd", HAMAL_VMWARE_NBD_PLUGIN="file",
                 HAMAL_VMWARE_DATASTORE_MOUNTS="other-ds=/nonexistent")  # fmt: skip
    vsphere.fill(VM, str(vsphere.disks(VM)[0].key), seed=6, pieces=3)
    start(fleet)
    vm_id = vsphere.uuid(VM)
    run = sync(events, vm_id)
    assert run["status"] == "failed", run
    (disk,) = state.run_disks(run["run_id"])
    error = state.disk(run["run_id"], disk).fields["error"]
    assert "datastore LocalDS_0 is not in [vmware] datastore_mounts" in error, error
    assert vsphere.every_snapshot() == [], "the failed run's snapshot is removed"
    assert ChunkStore(str(fleet.root / "store")).point_ids(vm_id) == []
