"""The embedded platform: VMs are directories of raw image files.

inventory/<vm name>/<disk>.raw|.img  -> one VM per directory, one disk per image.

Snapshot: every disk of the VM is copied, under an exclusive flock held on all of
them at once, into hamal_lib_dir/snapshots/local/<vm id>/<snapshot id>/. Writers
that want consistent points hold a shared flock on an image while they write it,
the way a hypervisor quiesces I/O for a snapshot. Where the filesystem can share
extents (btrfs, XFS with reflink) the copy is a clone in milliseconds; elsewhere
(ext4) it copies the allocated extents with copy_file_range, and the writers wait for
that long. The copy is never made durable: after a crash it is swept, not trusted.

Change tracking: an image may have a change journal beside it (`ChangeJournal`), in
which the writer records every extent it writes, like VMware's CBT. Its change token
at a snapshot is the journal's id and length then, so `changed_extents` of a later
snapshot is what was recorded in between; a journal that was reset (new id) or cut
says "cannot tell", and the sync falls back to hash-compare. Without a journal every
sync reads the allocated extents and stores only chunks whose content is new.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms import PlatformSpec
from hamal_workers.platforms.base import (
    DiskReader,
    DiskRef,
    DiskSource,
    Platform,
    PlatformError,
    Snapshot,
    VmRef,
    run_of_snapshot,
)

if TYPE_CHECKING:
    from hamal_workers.config import Settings

DISK_SUFFIXES = (".raw", ".img")
# Stable ids from names: the same inventory always yields the same VM ids.
_NAMESPACE = uuid.UUID("6a1f4c3e-8f0b-4e0a-9a57-6d616c6f6361")
_FICLONE = 0x40049409


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


def clone_sparse(src: int, dst: int, size: int) -> None:
    """Copy an open image into an empty file: a reflink where it can, else its data only."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            raise
    os.ftruncate(dst, size)
    for ext in data_extents(src, size):
        offset, left = ext.offset, ext.length
        while left > 0:
            n = os.copy_file_range(src, dst, left, offset, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"copy stopped at offset {offset}")
            offset, left = offset + n, left - n


# --------------------------------------------------------------------------- change journal


class ChangeJournal:
    """The extents a writer changed in an image: the local platform's change tracking.

    `.<image name>.cbt` beside the image: a header line `hamal-cbt 1 <id>` and then one
    line `<offset> <length>` per write, appended while the writer holds its shared flock
    on the image (so a snapshot, which takes the exclusive one, sees data and journal
    agree). Token at a snapshot: `<id>:<journal length>`.
    """

    MAGIC = "hamal-cbt 1"

    def __init__(self, image: Path) -> None:
        self.image = Path(image)
        self.path = self.image.with_name(f".{self.image.name}.cbt")

    def reset(self) -> None:
        """Start (or restart) tracking with a new id: older tokens become unknown."""
        header = f"{self.MAGIC} {secrets.token_hex(8)}\n".encode()
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.write_bytes(header)
        os.replace(tmp, self.path)

    def record(self, offset: int, length: int) -> None:
        """Note one write; call it while holding the image's shared flock."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{offset} {length}\n".encode())
        finally:
            os.close(fd)

    def token(self) -> str:
        try:
            with self.path.open("rb") as fh:
                header = fh.readline().decode(errors="replace").split()
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            return ""
        if len(header) != 3 or " ".join(header[:2]) != self.MAGIC:
            return ""
        return f"{header[2]}:{size}"

    def changed(self, base_token: str, token: str) -> list[Extent] | None:
        """Extents written between two tokens of this journal; None when it cannot tell."""
        base_id, _, base_at = base_token.partition(":")
        now_id, _, now_at = token.partition(":")
        if not base_id or base_id != now_id or not base_at.isdigit() or not now_at.isdigit():
            return None
        start, end = int(base_at), int(now_at)
        if start > end:
            return None
        try:
            with self.path.open("rb") as fh:
                line = fh.readline()
                header = line.decode(errors="replace").split()
                if header[2:] != [now_id] or os.fstat(fh.fileno()).st_size < end:
                    return None
                if start < len(line):
                    return None  # not a token this journal gave
                fh.seek(start)
                lines = fh.read(end - start).splitlines()
        except (FileNotFoundError, IndexError):
            return None
        extents = []
        for line in lines:
            offset, length = line.split()
            extents.append(Extent(int(offset), int(length)))
        return extents


# --------------------------------------------------------------------------- the platform


class FileReader(DiskReader):
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def readinto(self, offset: int, buf: memoryview) -> int:
        return os.preadv(self.fd, [buf], offset)

    def close(self) -> None:
        os.close(self.fd)


class LocalDiskSource(DiskSource):
    def __init__(self, snapshot: Snapshot, disk: str) -> None:
        super().__init__(snapshot, disk)
        info = snapshot.disks[disk]
        self.path = str(info["path"])
        self.image = Path(str(info["image"]))
        if not os.path.exists(self.path):
            raise PlatformError(f"local: snapshot {snapshot.snapshot_id} of disk {disk} is gone")

    def allocated_extents(self) -> list[Extent]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return data_extents(fd, self.size)
        finally:
            os.close(fd)

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        if not base_token or not self.token:
            return None
        return ChangeJournal(self.image).changed(base_token, self.token)

    def open_reader(self) -> DiskReader:
        return FileReader(self.path)


class LocalPlatform(Platform):
    name = "local"

    def __init__(self, inventory: str, lib_dir: str, *, keep_base_snapshot: bool = False) -> None:
        if not inventory:
            raise PlatformError("local: [local] inventory is empty, so the local platform is off")
        self.inventory = Path(inventory)
        self.snapshot_root = Path(lib_dir) / "snapshots" / "local"
        # [local] keep_base_snapshot: behave like Ceph, whose diff needs the base snapshot.
        self.keeps_base_snapshot = keep_base_snapshot

    def discover(self) -> list[VmRef]:
        if not self.inventory.is_dir():
            raise PlatformError(f"local: inventory {self.inventory} is not a directory")
        vms = []
        with os.scandir(self.inventory) as entries:
            vm_dirs = sorted(e.path for e in entries if e.is_dir())
        for vm_dir in vm_dirs:
            with os.scandir(vm_dir) as entries:
                disks = tuple(
                    DiskRef(name=e.name, size=e.stat().st_size, locator=e.path)
                    for e in sorted(entries, key=lambda e: e.name)
                    if e.is_file() and e.name.endswith(DISK_SUFFIXES) and not e.name.startswith(".")
                )
            if disks:
                name = os.path.basename(vm_dir)
                vms.append(VmRef(vm_id_for(name), name, self.name, disks))
        return vms

    def vm(self, vm_id: str) -> VmRef:
        # One VM's directory, not the whole inventory: a proxy may hold thousands of VMs.
        for vm_dir in self.inventory.iterdir():
            if vm_id_for(vm_dir.name) == vm_id and vm_dir.is_dir():
                disks = tuple(
                    DiskRef(name=f.name, size=f.stat().st_size, locator=str(f))
                    for f in sorted(vm_dir.iterdir())
                    if f.is_file() and f.suffix in DISK_SUFFIXES and not f.name.startswith(".")
                )
                if disks:
                    return VmRef(vm_id, vm_dir.name, self.name, disks)
        raise PlatformError(f"local: no VM with id {vm_id} in {self.inventory}")

    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        target_dir = self.snapshot_root / vm.vm_id / snapshot_id
        target_dir.mkdir(parents=True, exist_ok=True)
        disks = {}
        with self._quiesced(vm) as (created, fds):
            for disk in vm.disks:
                copy = target_dir / disk.name
                src = fds[disk.name]
                size = os.fstat(src).st_size
                dst = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    clone_sparse(src, dst, size)
                finally:
                    os.close(dst)
                disks[disk.name] = {
                    "path": str(copy),
                    "image": disk.locator,
                    "size": size,
                    "token": ChangeJournal(Path(disk.locator)).token(),
                }
        return Snapshot(snapshot_id, vm.vm_id, self.name, created, disks)

    @contextlib.contextmanager
    def _quiesced(self, vm: VmRef) -> Iterator[tuple[float, dict[str, int]]]:
        """Hold an exclusive flock on every disk of the VM: one instant for all of them."""
        fds: dict[str, int] = {}
        try:
            for disk in sorted(vm.disks, key=lambda d: d.name):  # one order: no deadlock
                fd = os.open(disk.locator, os.O_RDONLY)
                fds[disk.name] = fd
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield time.time(), fds
        finally:
            for fd in fds.values():
                os.close(fd)  # closing drops the flock

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        shutil.rmtree(
            self.snapshot_root / snapshot.vm_id / snapshot.snapshot_id, ignore_errors=True
        )
        with contextlib.suppress(OSError):
            (self.snapshot_root / snapshot.vm_id).rmdir()  # only when empty

    def leftover_snapshots(self) -> list[Snapshot]:
        found = []
        for vm_dir in _subdirs(self.snapshot_root):
            for snap_dir in _subdirs(vm_dir):
                if run_of_snapshot(snap_dir.name) is not None:
                    created = snap_dir.stat().st_mtime
                    found.append(Snapshot(snap_dir.name, vm_dir.name, self.name, created, {}))
        return found

    def open_disk(self, snapshot: Snapshot, disk: str) -> DiskSource:
        return LocalDiskSource(snapshot, disk)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _create(settings: Settings) -> Platform:
    return LocalPlatform(
        settings.local.inventory,
        settings.default.hamal_lib_dir,
        keep_base_snapshot=settings.local.keep_base_snapshot,
    )


SPEC = PlatformSpec(
    name="local",
    enabled=lambda settings: bool(settings.local.inventory),
    create=_create,
    release_cpu_ms_per_mb=lambda settings: settings.local.release_cpu_time,
)
