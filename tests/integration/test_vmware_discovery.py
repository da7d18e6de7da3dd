"""VMware discovery and sessions against the vCenter simulator (pyvmomi over TLS)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hamal_workers.platforms.base import PlatformError
from hamal_workers.platforms.vmware import VSphereInventory, session_for
from hamal_workers.testbeds import vcenter as testbed
from tests.integration.vmware_rig import section

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def vc(start_vcenter: Any) -> testbed.VCenter:
    return start_vcenter(session_idle_s=1)


def test_discovery_lists_vms_and_disks_and_finds_one_by_any_key(vc: testbed.VCenter) -> None:
    inventory = VSphereInventory(section(vc))
    vms = inventory.discover()
    assert sorted(v.name for v in vms) == ["DC0_H0_VM0", "DC0_H0_VM1"]
    for ref in vms:
        assert ref.platform == "vmware" and ref.skipped == ()
        (disk,) = ref.disks
        assert disk.name.isdigit() and disk.locator == f"[LocalDS_0] {ref.name}/disk1.vmdk"
        assert disk.size > 0
    first = vms[0]
    assert inventory.vm(first.vm_id) == first
    assert inventory.vm(first.name) == first
    only = VSphereInventory(section(vc, vms=first.name)).discover()
    assert only == [first]
    with pytest.raises(PlatformError, match="no VM with instance UUID, id or name 'nope'"):
        inventory.vm("nope")


def test_an_independent_disk_is_skipped_and_named(vc: testbed.VCenter) -> None:
    from pyVmomi import vim

    inventory = VSphereInventory(section(vc))

    def make_independent(si: object) -> None:
        content = si.RetrieveContent()  # type: ignore[attr-defined]
        vm = content.searchIndex.FindByDnsName(None, "DC0_H0_VM1", True) or next(
            v
            for v in content.viewManager.CreateContainerView(
                content.rootFolder, [vim.VirtualMachine], True
            ).view
            if v.name == "DC0_H0_VM1"
        )
        disk = next(
            d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        )
        disk.backing.diskMode = "independent_persistent"
        change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
        task = vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change]))
        while task.info.state not in ("success", "error"):
            time.sleep(0.05)
        assert task.info.state == "success", task.info.error

    inventory.session.call("reconfiguring a disk", make_independent)
    vm = inventory.vm("DC0_H0_VM1")
    assert vm.disks == ()
    (why,) = vm.skipped
    assert "an independent disk (independent_persistent): snapshots do not cover it" in why


def test_an_expired_session_is_replaced(vc: testbed.VCenter) -> None:
    inventory = VSphereInventory(section(vc))
    assert len(inventory.discover()) == 2
    assert inventory.session.logins == 1
    time.sleep(2.5)  # the simulator expires sessions idle for 1 s: idleness is the condition
    assert len(inventory.discover()) == 2
    assert inventory.session.logins == 2
    assert session_for(section(vc)) is inventory.session  # one per process


def test_refused_logins_and_certificates_say_why(vc: testbed.VCenter) -> None:
    with pytest.raises(PlatformError, match="refused the login of") as refused:
        VSphereInventory(section(vc, password="wrong-password")).discover()
    assert "wrong-password" not in str(refused.value)
    with pytest.raises(PlatformError, match="certificate is not trusted"):
        VSphereInventory(section(vc, ca_file="")).discover()  # the system's CAs
    assert len(VSphereInventory(section(vc, ca_file="", insecure=True)).discover()) == 2


def test_change_tracking_is_turned_on_only_where_it_can_be(vc: testbed.VCenter) -> None:
    from hamal_workers.platforms.vmware import wait_task

    inventory = VSphereInventory(section(vc))
    first, second = sorted(inventory.discover(), key=lambda v: v.name)

    def vm_of(si: Any, vm_id: str) -> Any:
        return inventory._vm_object(si, vm_id)

    # A VM without snapshots: tracking goes on, and a snapshot's disks carry change ids.
    inventory.ensure_change_tracking(first.vm_id)

    def snapshot_it(si: Any) -> dict[str, dict[str, Any]]:
        vm = vm_of(si, first.vm_id)
        assert vm.config.changeTrackingEnabled
        snapshot = wait_task(vm.CreateSnapshot_Task("hamal-test", "", False, False))
        assert inventory.find_snapshots(si, vm, "hamal-test") == [snapshot]
        disks = inventory.snapshot_disks(snapshot)
        wait_task(snapshot.RemoveSnapshot_Task(False))
        assert inventory.find_snapshots(si, vm, "hamal-test") == []
        return disks

    (disk,) = inventory.session.call("snapshot", snapshot_it).values()
    assert disk["token"].startswith("52 ") and disk["size"] == 64 * 1024 * 1024

    # A VM with a snapshot of someone else's and tracking off: a clear status, nothing made.
    def their_snapshot(si: Any) -> None:
        wait_task(vm_of(si, second.vm_id).CreateSnapshot_Task("nightly", "", False, False))

    inventory.session.call("their snapshot", their_snapshot)
    with pytest.raises(PlatformError, match="remove its snapshots so that the proxy can turn"):
        inventory.ensure_change_tracking(second.vm_id)

    def untouched(si: Any) -> None:
        vm = vm_of(si, second.vm_id)
        assert not vm.config.changeTrackingEnabled
        assert [t.name for t in vm.snapshot.rootSnapshotList] == ["nightly"]

    inventory.session.call("check", untouched)
