"""The embedded platform: VMs are directories of raw image files.

inventory/<vm name>/<disk>.raw|.img  -> one VM per directory, one disk per image.

Snapshot: every disk of the VM is copied, under an exclusive flock held on all of
them at once, into hamal_lib_dir/snapshots/local/<vm id>/<snapshot id>/. Writers
that want consistent points hold a shared flock on an image while they write it,
the way a hypervisor quiesces I/O for a snapshot. Where the filesystem can share
extents (btrfs, XFS with reflink), `cp --reflink=auto` clones in milliseconds;
elsewhere (ext4) it is a sparse copy that costs one read and one write of the
allocated data, done with the kernel's copy_file_range and SEEK_HOLE, and the
writers wait for that long. The copy is deleted when the sync is finalized: the
local platform has no change tracking, so it keeps no base snapshot, and each
later sync reads the allocated extents and stores only chunks whose hash changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from hamal_workers.engine.extents import Extent
from hamal_workers.logs import run_logged
from hamal_workers.platforms.base import (
    DiskReader,
    DiskRef,
    Platform,
    PlatformError,
    Snapshot,
    VmRef,
)

DISK_SUFFIXES = (".raw", ".img")
# Stable ids from names: the same inventory always yields the same VM ids.
_NAMESPACE = uuid.UUID("6a1f4c3e-8f0b-4e0a-9a57-6d616c6f6361")


def vm_id_for(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, name))


def data_extents(fd: int, size: int) -> list[Extent]:
    """Allocated extents of an open file, from SEEK_DATA/SEEK_HOLE."""
    extents: list[Extent] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append(Extent(start, end - start))
        pos = end
    return extents


class FileReader(DiskReader):
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def readinto(self, offset: int, buf: memoryview) -> int:
        return os.preadv(self.fd, [buf], offset)

    def close(self) -> None:
        os.close(self.fd)


class LocalPlatform(Platform):
    name = "local"
    keeps_base_snapshot = False

    def __init__(self, inventory: str, lib_dir: str) -> None:
        if not inventory:
            raise PlatformError("local: [local] inventory is empty, so the local platform is off")
        self.inventory = Path(inventory)
        self.snapshot_root = Path(lib_dir) / "snapshots" / "local"

    def discover(self) -> list[VmRef]:
        if not self.inventory.is_dir():
            raise PlatformError(f"local: inventory {self.inventory} is not a directory")
        vms = []
        for vm_dir in sorted(p for p in self.inventory.iterdir() if p.is_dir()):
            disks = tuple(
                DiskRef(name=f.name, size=f.stat().st_size, locator=str(f))
                for f in sorted(vm_dir.iterdir())
                if f.is_file() and f.suffix in DISK_SUFFIXES
            )
            if disks:
                vms.append(VmRef(vm_id_for(vm_dir.name), vm_dir.name, self.name, disks))
        return vms

    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        target_dir = self.snapshot_root / vm.vm_id / snapshot_id
        target_dir.mkdir(parents=True, exist_ok=True)
        disks = {}
        with self._quiesced(vm) as created:
            for disk in vm.disks:
                copy = target_dir / disk.name
                run_logged(
                    ["cp", "--reflink=auto", "--sparse=always", disk.locator, str(copy)],
                    timeout=6 * 3600,
                )
                disks[disk.name] = {"path": str(copy), "size": copy.stat().st_size}
        return Snapshot(snapshot_id, vm.vm_id, self.name, created, disks)

    @contextlib.contextmanager
    def _quiesced(self, vm: VmRef) -> Iterator[float]:
        """Hold an exclusive flock on every disk of the VM: one instant for all of them."""
        fds = []
        try:
            for disk in sorted(vm.disks, key=lambda d: d.name):  # one order: no deadlock
                fd = os.open(disk.locator, os.O_RDONLY)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield time.time()
        finally:
            for fd in fds:
                os.close(fd)  # closing drops the flock

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        shutil.rmtree(
            self.snapshot_root / snapshot.vm_id / snapshot.snapshot_id, ignore_errors=True
        )
        with contextlib.suppress(OSError):
            (self.snapshot_root / snapshot.vm_id).rmdir()  # only when empty

    def allocated_extents(self, snapshot: Snapshot, disk: str) -> list[Extent]:
        info = snapshot.disks[disk]
        fd = os.open(info["path"], os.O_RDONLY)
        try:
            return data_extents(fd, int(info["size"]))
        finally:
            os.close(fd)

    def open_reader(self, snapshot: Snapshot, disk: str) -> DiskReader:
        path = snapshot.disks[disk]["path"]
        if not os.path.exists(path):
            raise PlatformError(f"local: snapshot {snapshot.snapshot_id} of disk {disk} is gone")
        return FileReader(path)
