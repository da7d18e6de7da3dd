"""What the VMware tests do to the simulated vCenter as its administrator and as a guest:
add disks, write into a disk as the running VM would, take or list snapshots, turn
tracking off. Through pyvmomi, on a session of its own (never the proxy's)."""

from __future__ import annotations

import hashlib
import os
import random
import ssl
import time
from pathlib import Path
from typing import Any

from hamal_workers.config import VmwareSection
from hamal_workers.testbeds.vcenter import VCenter

MiB = 1 << 20


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def section(vc: VCenter, **extra: object) -> VmwareSection:
    keys: dict[str, object] = {
        "host": vc.host, "port": vc.port, "user": vc.user, "password": vc.password,
        "ca_file": str(vc.ca_file),
    }  # fmt: skip
    keys.update(extra)
    return VmwareSection(**keys)  # type: ignore[arg-type]


def vmware_env(vc: VCenter, **extra: str) -> dict[str, str]:
    """The fleet's environment for this vCenter (local platform off)."""
    return {
        "HAMAL_LOCAL_INVENTORY": "",
        "HAMAL_VMWARE_HOST": vc.host,
        "HAMAL_VMWARE_PORT": str(vc.port),
        "HAMAL_VMWARE_USER": vc.user,
        "HAMAL_VMWARE_PASSWORD": vc.password,
        "HAMAL_VMWARE_CA_FILE": str(vc.ca_file),
        "HAMAL_VMWARE_DISK_FLAG_SIZE": "1",
        **extra,
    }


def nbd_env(vc: VCenter) -> dict[str, str]:
    mounts = ",".join(f"{name}={path}" for name, path in vc.datastores.items())
    return {"HAMAL_VMWARE_TRANSPORT": "nbd", "HAMAL_VMWARE_NBD_PLUGIN": "file",
            "HAMAL_VMWARE_DATASTORE_MOUNTS": mounts}  # fmt: skip


class VSphereRig:
    def __init__(self, vc: VCenter) -> None:
        from pyVim.connect import SmartConnect

        self.vc = vc
        context = ssl.create_default_context(cafile=str(vc.ca_file))
        self.si = SmartConnect(
            host=vc.host, port=vc.port, user=vc.user, pwd=vc.password, sslContext=context
        )

    def close(self) -> None:
        from pyVim.connect import Disconnect

        Disconnect(self.si)

    def vm(self, name: str) -> Any:
        from pyVmomi import vim

        content = self.si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        try:
            return next(v for v in view.view if v.name == name)
        finally:
            view.Destroy()

    def uuid(self, name: str) -> str:
        return str(self.vm(name).config.instanceUuid)

    def wait(self, task: Any) -> Any:
        while task.info.state not in ("success", "error"):
            time.sleep(0.02)
        assert task.info.state == "success", task.info.error
        return task.info.result

    def disks(self, name: str) -> list[Any]:
        from pyVmomi import vim

        devices = self.vm(name).config.hardware.device
        return sorted(
            (d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.key
        )

    def add_disk(self, name: str, size: int, mode: str = "persistent") -> str:
        """A new disk on the VM's first controller; its device key, as the proxy names it."""
        from pyVmomi import vim

        vm = self.vm(name)
        before = {d.key for d in self.disks(name)}
        first = self.disks(name)[0]
        used = {d.unitNumber for d in self.disks(name) if d.controllerKey == first.controllerKey}
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            diskMode=mode, thinProvisioned=True, fileName=f"[{first.backing.datastore.name}]"
        )
        disk = vim.vm.device.VirtualDisk(
            key=-1 - len(before), controllerKey=first.controllerKey,
            unitNumber=next(u for u in range(16) if u not in used and u != 7),
            capacityInKB=size // 1024, capacityInBytes=size, backing=backing,
        )  # fmt: skip
        spec = vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
        self.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[spec])))
        (key,) = {d.key for d in self.disks(name)} - before
        return str(key)

    def flat(self, name: str, key: str) -> Path:
        """The live disk's data file: what the running VM writes."""
        disk = next(d for d in self.disks(name) if str(d.key) == key)
        text = disk.backing.fileName
        store, rel = text[1:].split("] ", 1)
        return self.vc.datastores[store] / (rel[: -len(".vmdk")] + "-flat.vmdk")

    def size(self, name: str, key: str) -> int:
        disk = next(d for d in self.disks(name) if str(d.key) == key)
        return int(disk.capacityInBytes or disk.capacityInKB * 1024)

    def write(self, name: str, key: str, offset: int, data: bytes) -> None:
        path = self.flat(name, key)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def fill(self, name: str, key: str, seed: int, pieces: int, piece: int = 256 * 1024) -> None:
        """Random data in `pieces` places of the disk, the rest left a hole."""
        rnd = random.Random(seed)
        size = self.size(name, key)
        for _ in range(pieces):
            offset = rnd.randrange(0, size - piece) // 4096 * 4096
            self.write(name, key, offset, rnd.randbytes(piece))

    def content(self, name: str, key: str) -> bytes:
        """The disk as the guest sees it now: the file, zeros past its end."""
        data = self.flat(name, key).read_bytes()
        return data + bytes(self.size(name, key) - len(data))

    def snapshot_names(self, name: str) -> list[str]:
        from hamal_workers.platforms.vmware import walk_snapshots

        return sorted(t.name for t in walk_snapshots(self.vm(name).snapshot))

    def every_snapshot(self) -> list[str]:
        from pyVmomi import vim

        from hamal_workers.platforms.vmware import walk_snapshots

        content = self.si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        try:
            return sorted(t.name for vm in view.view for t in walk_snapshots(vm.snapshot))
        finally:
            view.Destroy()

    def snapshot(self, name: str, snapshot: str) -> None:
        self.wait(self.vm(name).CreateSnapshot_Task(snapshot, "", False, False))

    def tracking(self, name: str, enabled: bool) -> None:
        from pyVmomi import vim

        spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)
        self.wait(self.vm(name).ReconfigVM_Task(spec))

    def annotate(self, name: str, text: str) -> None:
        """The VM's notes; "tools: not running" makes the simulator refuse to quiesce it."""
        from pyVmomi import vim

        self.wait(self.vm(name).ReconfigVM_Task(vim.vm.ConfigSpec(annotation=text)))
