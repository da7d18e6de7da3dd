"""The vCenter test bed: govmomi's simulator built here, spoken to by pyvmomi over TLS."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from hamal_workers.testbeds import vcenter as testbed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def vc(start_vcenter: Any) -> testbed.VCenter:
    return start_vcenter()


def connect(vc: testbed.VCenter, context: ssl.SSLContext, password: str | None = None) -> object:
    from pyVim.connect import SmartConnect

    return SmartConnect(
        host=vc.host, port=vc.port, user=vc.user, pwd=password or vc.password, sslContext=context
    )


def trusted(vc: testbed.VCenter) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(vc.ca_file))


def test_pyvmomi_sees_the_vms_and_their_disk_files(vc: testbed.VCenter) -> None:
    from pyVim.connect import Disconnect
    from pyVmomi import vim

    si = connect(vc, trusted(vc))
    try:
        content = si.RetrieveContent()  # type: ignore[attr-defined]
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vms = list(view.view)
        assert len(vms) == 2
        for vm in vms:
            disks = [
                d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
            ]
            assert disks, vm.name
            store, path = disks[0].backing.fileName.split("] ", 1)
            folder = vc.datastores[store.lstrip("[")]
            # The disk's data is a real file the tests can write into.
            assert (folder / path).exists() or (
                folder / path.replace(".vmdk", "-flat.vmdk")
            ).exists()
    finally:
        Disconnect(si)


def test_an_untrusted_certificate_and_a_wrong_password_are_refused(vc: testbed.VCenter) -> None:
    from pyVmomi import vim

    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(vc, ssl.create_default_context())  # the system's CAs
    with pytest.raises(vim.fault.InvalidLogin):
        connect(vc, trusted(vc), password="not-the-password")
    assert vc.password not in (vc.directory / "vcsim.log").read_text()


def test_idle_sessions_expire(start_vcenter: Any) -> None:
    from pyVmomi import vim

    vc = start_vcenter(session_idle_s=1)
    si = connect(vc, trusted(vc))
    si.RetrieveContent()  # type: ignore[attr-defined]
    # Expiry is idleness itself: nothing to wait on but the time passing.
    time.sleep(2.5)
    with pytest.raises(vim.fault.NotAuthenticated):
        si.content.sessionManager.currentSession  # type: ignore[attr-defined]  # noqa: B018


# --- change tracking and frozen snapshots (vcsim/cbt.go) --------------------------------

BLOCK = 64 * 1024


def vm_and_disk(si: object, name: str = "DC0_H0_VM0") -> tuple[object, object]:
    from pyVmomi import vim

    content = si.RetrieveContent()  # type: ignore[attr-defined]
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vm = next(v for v in view.view if v.name == name)
    return vm, first_disk(vm.config)


def first_disk(config: object) -> object:
    from pyVmomi import vim

    return next(d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))  # type: ignore[attr-defined]


def finish(task: object) -> object:
    while task.info.state not in ("success", "error"):  # type: ignore[attr-defined]
        time.sleep(0.02)
    assert task.info.state == "success", task.info.error  # type: ignore[attr-defined]
    return task.info.result  # type: ignore[attr-defined]


def changed(vm: object, snapshot: object, key: int, change_id: str, capacity: int) -> set[int]:
    """Every block QueryChangedDiskAreas reports, page after page, as a client must ask."""
    blocks: set[int] = set()
    offset, pages = 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(  # type: ignore[attr-defined]
            snapshot=snapshot, deviceKey=key, startOffset=offset, changeId=change_id
        )
        assert info.startOffset == offset and info.length > 0
        for area in info.changedArea:
            assert offset <= area.start and area.start + area.length <= offset + info.length
            blocks.update(range(area.start // BLOCK, (area.start + area.length - 1) // BLOCK + 1))
        offset += info.length
        pages += 1
    assert pages > 1  # the disk is bigger than one answer: paging is exercised
    return blocks


def write(path: Path, offset: int, data: bytes) -> set[int]:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    return set(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))


def test_change_ids_give_exactly_the_blocks_written_and_snapshots_keep_what_they_saw(
    start_vcenter: Any,
) -> None:
    from pyVmomi import vim

    vc = start_vcenter(disk_mib=600)
    si = connect(vc, trusted(vc))
    vm, disk = vm_and_disk(si)
    capacity = disk.capacityInKB * 1024  # type: ignore[attr-defined]
    finish(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))  # type: ignore[attr-defined]
    flat = vc.datastores["LocalDS_0"] / "DC0_H0_VM0" / "disk1-flat.vmdk"
    written = write(flat, 0, b"boot" * 30000) | write(flat, 300 << 20, b"x" * 5000)
    first = finish(vm.CreateSnapshot_Task("hamal-a", "", False, False))  # type: ignore[attr-defined]
    seen = first_disk(first.config)  # type: ignore[attr-defined]
    assert seen.backing.changeId.startswith("52 ")
    assert changed(vm, first, seen.key, "*", capacity) == written

    later = write(flat, 300 << 20, b"y" * 100) | write(flat, 550 << 20, b"z" * 200_000)
    second = finish(vm.CreateSnapshot_Task("hamal-b", "", False, False))  # type: ignore[attr-defined]
    now = first_disk(second.config)  # type: ignore[attr-defined]
    assert changed(vm, second, now.key, seen.backing.changeId, capacity) == later
    # The first snapshot still reads what it saw, whatever the VM wrote since.
    frozen = vc.datastores["LocalDS_0"] / seen.backing.fileName.split("] ", 1)[1].replace(
        ".vmdk", "-flat.vmdk"
    )
    with frozen.open("rb") as fh:
        fh.seek(300 << 20)
        assert fh.read(5) == b"xxxxx"

    finish(first.RemoveSnapshot_Task(False))  # type: ignore[attr-defined]
    assert not frozen.exists()


def test_turning_tracking_off_makes_every_older_change_id_invalid(start_vcenter: Any) -> None:
    from pyVmomi import vim, vmodl

    vc = start_vcenter(disk_mib=600)
    si = connect(vc, trusted(vc))
    vm, _ = vm_and_disk(si)
    finish(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))  # type: ignore[attr-defined]
    old = finish(vm.CreateSnapshot_Task("hamal-a", "", False, False))  # type: ignore[attr-defined]
    old_id = first_disk(old.config).backing.changeId  # type: ignore[attr-defined]
    for enabled in (False, True):
        finish(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=enabled)))  # type: ignore[attr-defined]
    new = finish(vm.CreateSnapshot_Task("hamal-b", "", False, False))  # type: ignore[attr-defined]
    disk = first_disk(new.config)  # type: ignore[attr-defined]
    assert disk.backing.changeId.split("/")[0] != old_id.split("/")[0]
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=new, deviceKey=disk.key, startOffset=0, changeId=old_id)  # type: ignore[attr-defined]
