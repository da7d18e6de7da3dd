"""The VMware platform against the vCenter simulator, below the fleet: its snapshots, its
changed areas, its two transports and their failures."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hamal_workers.platforms.base import PlatformError, new_run_id, snapshot_name
from hamal_workers.platforms.vmware import DiskFlags, VmwarePlatform
from hamal_workers.platforms.vmware_transport import SECTOR
from hamal_workers.testbeds.vcenter import VCenter
from tests.integration.vmware_rig import MiB, VSphereRig, section

pytestmark = pytest.mark.timeout(120)
VM = "DC0_H0_VM0"


def platform(vc: VCenter, **extra: object) -> VmwarePlatform:
    return VmwarePlatform(section(vc, **extra), DiskFlags(min_size_mb=1))


def read_all(source: Any) -> bytes:
    reader = source.open_reader()
    try:
        return reader.read(0, source.size)
    finally:
        reader.close()


def test_snapshots_are_ours_alone_listed_and_removed(vsphere: VSphereRig) -> None:
    vc = vsphere.vc
    plat = platform(vc)
    ref = plat.vm(VM)
    vsphere.tracking(VM, True)  # on before the operator's snapshots: the proxy may snapshot
    vsphere.snapshot(VM, "nightly")  # the operator's
    vsphere.snapshot(VM, "hamal-manual")  # named like ours, without a run id: not ours
    name = snapshot_name(new_run_id())
    snap = plat.create_snapshot(ref, name)
    assert snap.consistency == "vm" and snap.details["snapshot"].startswith("snapshot-")
    assert set(snap.disks) == {d.name for d in ref.disks}
    # Asked again after a lost answer, the same snapshot, not a second one.
    again = plat.create_snapshot(ref, name)
    assert again.details["snapshot"] == snap.details["snapshot"]
    assert vsphere.snapshot_names(VM) == sorted(["nightly", "hamal-manual", name])

    (left,) = plat.leftover_snapshots()
    assert (left.snapshot_id, left.vm_id) == (name, ref.vm_id)
    plat.delete_snapshot(left)  # from the identity alone, as the sweep does
    plat.delete_snapshot(left)  # gone already: not an error
    assert vsphere.snapshot_names(VM) == ["hamal-manual", "nightly"]
    with pytest.raises(PlatformError, match="not one of the proxy's snapshots"):
        plat.delete_snapshot(type(snap)("hamal-manual", ref.vm_id, "vmware", 0.0))
    assert plat.leftover_snapshots() == []


def test_changed_areas_are_paged_over_the_whole_capacity(start_vcenter: Any) -> None:
    vc = start_vcenter(disk_mib=600)  # vCenter answers at most 256 MiB per query
    rig = VSphereRig(vc)
    try:
        (key,) = [str(d.key) for d in rig.disks(VM)]
        rig.write(VM, key, 10 * MiB, b"\x11" * 4096)
        rig.write(VM, key, 300 * MiB, b"\x22" * 4096)
        rig.write(VM, key, 599 * MiB, b"\x33" * 65536)
        plat = platform(vc)
        ref = plat.vm(VM)
        first = plat.create_snapshot(ref, snapshot_name(new_run_id()))
        with plat.open_disk(first, key) as source:
            allocated = [(e.offset, e.length) for e in source.allocated_extents()]
        assert allocated == [(10 * MiB, 65536), (300 * MiB, 65536), (599 * MiB, 65536)]
        plat.delete_snapshot(first)

        rig.write(VM, key, 520 * MiB, b"\x44")
        second = plat.create_snapshot(ref, snapshot_name(new_run_id()))
        with plat.open_disk(second, key) as source:
            changed = source.changed_extents(first.token(key))
            assert changed is not None
            assert [(e.offset, e.length) for e in changed] == [(520 * MiB, 65536)]
            # An id vCenter does not know, of the same epoch: the engine must read it all.
            epoch = first.token(key).rsplit("/", 1)[0]
            assert source.changed_extents(f"{epoch}/999") is None
            assert source.changed_extents("") is None
        plat.delete_snapshot(second)
    finally:
        rig.close()


def test_a_tracking_reset_voids_every_older_change_id(vsphere: VSphereRig) -> None:
    plat = platform(vsphere.vc)
    ref = plat.vm(VM)
    key = ref.disks[0].name
    first = plat.create_snapshot(ref, snapshot_name(new_run_id()))
    plat.delete_snapshot(first)
    vsphere.tracking(VM, False)
    vsphere.tracking(VM, True)
    second = plat.create_snapshot(ref, snapshot_name(new_run_id()))
    try:
        assert second.token(key).rsplit("/", 1)[0] != first.token(key).rsplit("/", 1)[0]
        with plat.open_disk(second, key) as source:
            assert source.changed_extents(first.token(key)) is None
    finally:
        plat.delete_snapshot(second)


def test_https_reads_respect_max_read_blocks_and_log_in_again(start_vcenter: Any) -> None:
    vc = start_vcenter(session_idle_s=1, trace_folder=True)
    rig = VSphereRig(vc)
    try:
        (key,) = [str(d.key) for d in rig.disks(VM)]
        rig.fill(VM, key, seed=5, pieces=8)
        want = rig.content(VM, key)
    finally:
        rig.close()
    plat = platform(vc, max_read_blocks=256)  # 128 KiB per request
    ref = plat.vm(VM)
    snap = plat.create_snapshot(ref, snapshot_name(new_run_id()))
    try:
        with plat.open_disk(snap, key) as source:
            reader = source.open_reader()
            try:
                assert reader.read(0, 1 * MiB) == want[: 1 * MiB]
                logins = plat.session.logins
                time.sleep(2.5)  # idle past the simulator's 1 s: the session expires
                assert reader.read(3 * MiB, 2 * MiB) == want[3 * MiB : 5 * MiB]
                assert plat.session.logins == logins + 1
            finally:
                reader.close()
        reads = [rng for path, rng in vc.folder_reads() if "-flat.vmdk" in path]
        spans = [tuple(int(x) for x in rng[len("bytes=") :].split("-")) for rng in reads]
        assert spans and all(end - start + 1 <= 256 * SECTOR for start, end in spans), spans
        assert len(spans) == (1 * MiB + 2 * MiB) // (256 * SECTOR), spans
    finally:
        plat.delete_snapshot(snap)


def test_nbd_reads_equal_https_reads_and_a_missing_nbdkit_is_named(vsphere: VSphereRig) -> None:
    vc = vsphere.vc
    key = str(vsphere.disks(VM)[0].key)
    vsphere.fill(VM, key, seed=9, pieces=12)
    mounts = ",".join(f"{n}={p}" for n, p in vc.datastores.items())
    over_https = platform(vc)
    over_nbd = platform(vc, transport="nbd", nbd_plugin="file", datastore_mounts=mounts)
    ref = over_https.vm(VM)
    snap = over_https.create_snapshot(ref, snapshot_name(new_run_id()))
    vsphere.write(VM, key, 0, b"\xee" * MiB)  # after the snapshot: neither may see it
    try:
        with over_https.open_disk(snap, key) as source:
            https_data = read_all(source)
        with over_nbd.open_disk(snap, key) as source:
            nbd_data = read_all(source)
            export_dir = source._export.directory  # type: ignore[union-attr]
        assert not export_dir.exists(), "nbdkit and its socket go with the disk source"
        assert https_data == nbd_data
        assert https_data[:MiB] != b"\xee" * MiB

        broken = platform(vc, transport="nbd", nbd_plugin="file", datastore_mounts=mounts,
                          nbdkit="/nonexistent/nbdkit")  # fmt: skip
        with (
            broken.open_disk(snap, key) as source,
            pytest.raises(PlatformError, match=r"cannot start nbdkit \(/nonexistent/nbdkit\)"),
        ):
            source.open_reader()
        unmounted = platform(vc, transport="nbd", nbd_plugin="file", datastore_mounts="x=/x")
        with (
            unmounted.open_disk(snap, key) as source,
            pytest.raises(
                PlatformError, match="datastore LocalDS_0 is not in \\[vmware\\] datastore_mounts"
            ),
        ):
            source.open_reader()
    finally:
        over_https.delete_snapshot(snap)


def test_a_vm_that_cannot_be_quiesced_gets_a_crash_consistent_snapshot_said_so(
    vsphere: VSphereRig,
) -> None:
    plat = platform(vsphere.vc, quiesce=True)
    with_tools, without = plat.vm(VM), plat.vm("DC0_H0_VM1")
    vsphere.annotate("DC0_H0_VM1", "web tier; tools: not running")
    quiesced = plat.create_snapshot(with_tools, snapshot_name(new_run_id()))
    fallback = plat.create_snapshot(without, snapshot_name(new_run_id()))
    try:
        assert quiesced.details["quiesced"] is True and quiesced.consistency_note == ""
        assert fallback.details["quiesced"] is False
        assert fallback.consistency == "vm"
        assert fallback.consistency_note == (
            "crash-consistent: quiescing failed (VMware Tools is not running in the guest: "
            "cannot quiesce)"
        )
        assert vsphere.snapshot_names("DC0_H0_VM1") == [fallback.snapshot_id]
    finally:
        plat.delete_snapshot(quiesced)
        plat.delete_snapshot(fallback)


def test_a_snapshot_describes_the_vm_as_it_was_then(vsphere: VSphereRig) -> None:
    from pyVmomi import vim

    first = str(vsphere.disks(VM)[0].key)
    second = vsphere.add_disk(VM, 8 * MiB)  # the next unit of the same controller
    boot = vim.vm.BootOptions(
        bootOrder=[vim.vm.BootOptions.BootableDiskDevice(deviceKey=int(second))]
    )
    vsphere.wait(vsphere.vm(VM).ReconfigVM_Task(
        vim.vm.ConfigSpec(numCPUs=2, memoryMB=256, firmware="efi", bootOptions=boot)
    ))  # fmt: skip
    (card,) = [d for d in vsphere.vm(VM).config.hardware.device
               if isinstance(d, vim.vm.device.VirtualEthernetCard)]  # fmt: skip
    (network,) = vsphere.vm(VM).network
    plat = platform(vsphere.vc)
    ref = plat.vm(VM)
    snap = plat.create_snapshot(ref, snapshot_name(new_run_id()))
    try:
        described = snap.vm
        assert (described["name"], described["id"]) == (VM, ref.vm_id)
        assert (described["cpus"], described["memory_mib"]) == (2, 256)
        assert (described["guest_os"], described["firmware"]) == ("otherGuest", "efi")
        assert described["nics"] == [{
            "name": card.deviceInfo.label, "mac": card.macAddress,
            "network": network.name,  # a distributed port group, named through its key
            "addresses": [],  # what VMware Tools reports: nothing in the simulator
        }]  # fmt: skip
        assert card.macAddress and network.name
        (unit0,) = [d.unitNumber for d in vsphere.disks(VM) if str(d.key) == first]
        assert [(d["name"], d["size"], d["device"], d["boot"]) for d in described["disks"]] == [
            (first, 64 * MiB, f"scsi0:{unit0}", False),
            (second, 8 * MiB, f"scsi0:{unit0 + 1}", True),
        ]
        # Later changes are the VM's, not this snapshot's.
        vsphere.wait(vsphere.vm(VM).ReconfigVM_Task(vim.vm.ConfigSpec(numCPUs=4)))
        assert plat.describe(ref)["cpus"] == 4 and snap.vm["cpus"] == 2
    finally:
        plat.delete_snapshot(snap)
