"""vSphere VMs synced by the real fleet from the project's vCenter simulator (SOAP over
TLS to pyvmomi; disks read over the datastore HTTPS interface or over NBD from nbdkit).

Each restore point must restore byte for byte equal to the disk at its snapshot. Nothing
writes the disks while a sync runs, so the disk as the guest sees it once the run has
ended is the disk at its snapshot.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.state import State
from hamal_workers.targets.base import CHUNK_SIZE
from hamal_workers.targets.chunkstore import ChunkStore
from tests.integration.points import restored
from tests.integration.vmware_rig import MiB, VSphereRig, digest, nbd_env, vmware_env

pytestmark = pytest.mark.timeout(240)
VM = "DC0_H0_VM0"


def vmware_fleet(fleet: LocalFleet, rig: VSphereRig, **extra: str) -> None:
    fleet.overrides = {**fleet.overrides, **vmware_env(rig.vc, **extra)}


def start(fleet: LocalFleet) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("vmware", ["vmware"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("vmware")


def sync(events: Any, vm_id: str, timeout: float = 120) -> dict[str, Any]:
    """`hamal sync` of one VM, and the run event that ends it."""
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "vmware"}, queue="period")
    return events.wait(
        lambda e: e["event"] == "run" and e["vm_id"] == vm_id, timeout, f"a run of {vm_id}"
    )


def sync_refused(events: Any, vm_id: str) -> dict[str, Any]:
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "vmware"}, queue="period")
    return events.wait(
        lambda e: e["event"] == "vm-sync" and e["vm_id"] == vm_id and e["status"] == "failed",
        60,
        f"the refusal of {vm_id}",
    )


def three_disk_vm(rig: VSphereRig) -> tuple[str, list[str]]:
    """VM0 with two more disks: 40 and 24 MiB (keys 203, 204) before its 64 MiB one."""
    rig.add_disk(VM, 40 * MiB)
    rig.add_disk(VM, 24 * MiB)
    disks = [str(d.key) for d in rig.disks(VM)]
    for seed, disk in enumerate(disks):
        rig.fill(VM, disk, seed=seed, pieces=6)
    return rig.uuid(VM), disks


def test_full_then_incremental_of_three_disks_reads_only_what_changed(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    vm_id, disks = three_disk_vm(vsphere)
    vmware_fleet(fleet, vsphere)
    start(fleet)
    expected: dict[str, dict[str, str]] = {}

    def commit_and_record() -> str:
        run = sync(events, vm_id)
        assert run["status"] == "committed", state.run(run["run_id"])
        expected[run["run_id"]] = {d: digest(vsphere.content(VM, d)) for d in disks}
        return run["run_id"]

    first = commit_and_record()
    info = ChunkStore(str(fleet.root / "store")).point(vm_id, first)
    assert sorted(info.disks) == sorted(disks)
    assert info.meta["consistency"] == "vm", info.meta
    assert set(info.meta["flags"]) == set(disks)
    for disk in disks:
        assert state.disk(first, disk).fields["mode"] == "allocated"
        assert info.token(disk).startswith("52 ")
    assert vsphere.snapshot_names(VM) == [], "the snapshot goes once its point is committed"

    # The guest writes two places of the first disk and one of the third; the second rests.
    vsphere.write(VM, disks[0], 5 * MiB + 100, b"\x5a" * 70_000)
    vsphere.write(VM, disks[0], 36 * MiB, b"\xa5" * 4096)
    vsphere.write(VM, disks[2], 0, b"\x01" * 512)
    second = commit_and_record()
    read = {d: state.disk(second, d).fields for d in disks}
    for disk in disks:
        assert read[disk]["mode"] == "changed", read[disk]
    assert int(read[disks[0]]["bytes_read"]) == 2 * CHUNK_SIZE, read[disks[0]]
    assert int(read[disks[1]]["bytes_read"]) == 0, read[disks[1]]
    assert int(read[disks[2]]["bytes_read"]) == CHUNK_SIZE, read[disks[2]]

    third = commit_and_record()  # nothing changed
    assert sum(int(state.disk(third, d).fields["bytes_read"]) for d in disks) == 0

    for point, want in expected.items():
        for disk, digest_of_disk in want.items():
            assert digest(restored(fleet, vm_id, point, disk)) == digest_of_disk, (point, disk)


def test_both_transports_give_identical_restore_points(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    vm_id, disks = three_disk_vm(vsphere)
    vmware_fleet(fleet, vsphere)
    start(fleet)
    over_https = sync(events, vm_id)
    assert over_https["status"] == "committed", state.run(over_https["run_id"])

    # Tracking reset: the next sync reads every allocated area again, now over NBD.
    vsphere.tracking(VM, False)
    vsphere.tracking(VM, True)
    fleet.stop("vmware")
    vmware_fleet(fleet, vsphere, **nbd_env(vsphere.vc))
    fleet.start_worker("vmware-nbd", ["vmware"], concurrency=2)
    fleet.wait_worker_ready("vmware-nbd")
    over_nbd = sync(events, vm_id)
    assert over_nbd["status"] == "committed", state.run(over_nbd["run_id"])

    store = ChunkStore(str(fleet.root / "store"))
    for disk in disks:
        assert state.disk(over_nbd["run_id"], disk).fields["mode"] == "allocated"
        https_manifest = store.manifest(vm_id, over_https["run_id"], disk)
        nbd_manifest = store.manifest(vm_id, over_nbd["run_id"], disk)
        assert nbd_manifest.entries == https_manifest.entries, disk
        assert restored(fleet, vm_id, over_nbd["run_id"], disk) == vsphere.content(VM, disk)


def test_a_cbt_reset_between_syncs_falls_back_and_stays_exact(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    vm_id, disks = three_disk_vm(vsphere)
    vmware_fleet(fleet, vsphere)
    start(fleet)
    first = sync(events, vm_id)
    assert first["status"] == "committed"

    vsphere.tracking(VM, False)  # a reset: every change id so far is void
    vsphere.write(VM, disks[1], 7 * MiB, b"\x77" * 9000)
    vsphere.tracking(VM, True)
    second = sync(events, vm_id)
    assert second["status"] == "committed", state.run(second["run_id"])
    for disk in disks:
        fields = state.disk(second["run_id"], disk).fields
        assert fields["mode"] == "allocated", fields
        assert "cannot tell what changed" in fields.get("notes", ""), fields
        assert restored(fleet, vm_id, second["run_id"], disk) == vsphere.content(VM, disk)
    # Hash-compare: only the chunk the guest wrote is new content.
    stored = sum(int(state.disk(second["run_id"], d).fields["chunks_new"]) for d in disks)
    assert stored == 1, [state.disk(second["run_id"], d).fields for d in disks]


def test_a_vm_with_snapshots_and_tracking_off_gets_a_clear_status_and_is_untouched(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    other = "DC0_H0_VM1"
    vsphere.snapshot(other, "before-upgrade")
    vm_id = vsphere.uuid(other)
    vmware_fleet(fleet, vsphere)
    start(fleet)
    refused = sync_refused(events, vm_id)
    assert "remove its snapshots so that the proxy can turn tracking on" in refused["error"]
    assert vsphere.snapshot_names(other) == ["before-upgrade"]
    assert not vsphere.vm(other).config.changeTrackingEnabled
    shown = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "status"],
        env={**fleet.env(), "COLUMNS": "400"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "remove its snapshots so that the proxy can turn tracking on" in shown.stdout


def test_an_independent_disk_is_skipped_with_a_warning(
    fleet: LocalFleet, state: State, events: Any, vsphere: VSphereRig
) -> None:
    kept = str(vsphere.disks(VM)[0].key)
    vsphere.fill(VM, kept, seed=3, pieces=4)
    independent = vsphere.add_disk(VM, 16 * MiB, mode="independent_persistent")
    vm_id = vsphere.uuid(VM)
    vmware_fleet(fleet, vsphere)
    start(fleet)
    run = sync(events, vm_id)
    assert run["status"] == "committed", state.run(run["run_id"])
    info = ChunkStore(str(fleet.root / "store")).point(vm_id, run["run_id"])
    assert sorted(info.disks) == [kept]
    (skipped,) = info.meta["skipped"]
    assert skipped.startswith(f"disk {independent} (") and "an independent disk" in skipped
    logs = (fleet.root / "log").rglob("*.log")
    assert any(skipped in p.read_text() for p in logs), "the VM's log names the skipped disk"
    assert restored(fleet, vm_id, run["run_id"], kept) == vsphere.content(VM, kept)
