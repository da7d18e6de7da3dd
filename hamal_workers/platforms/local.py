"""The embedded platform: VMs are directories of raw image files.

inventory/<vm name>/<disk>.raw|.img  -> one VM per directory, one disk per image.
inventory/<vm name>/vm.json          -> optional: what the VM is besides its disks.

`vm.json` describes the VM for its restore points (`VM_JSON_KEYS`), every key optional:

    {"cpus": 2, "memory_mib": 4096, "guest_os": "debian12", "firmware": "efi",
     "nics": [{"name": "eth0", "mac": "52:54:00:12:34:56", "network": "lan",
               "addresses": ["192.0.2.10"]}],
     "disks": {"root.raw": {"device": "/dev/vda", "boot": true}}}

A malformed one (bad JSON, an unknown key, a wrong type, a disk the VM does not have)
is ignored as a whole with a warning naming the file and what is wrong: a typo in a
description must not stop the VM's backups, and the points then say "unknown" (null)
rather than half of what the file meant.

Snapshots are copy-on-write, as LVM's or a hypervisor's are: taking one records the
image's allocated extents and creates an empty overlay, under an exclusive flock held on
every disk of the VM at once (one instant for all of them) -- milliseconds, whatever the
size of the disks. Writers follow the platform's write protocol
(`hamal_workers/simulators/local_vms.py` does): they hold a shared flock on an image
while they write it, and before overwriting a block they call `preserve_before_write`,
which copies the block's current bytes into the overlay of every live snapshot of the
image. A snapshot reads the live image and takes the preserved bytes of every block
written since from its overlay (`CowSnapshotReader`). Nothing of a snapshot is made
durable: after a crash it is swept, not trusted. A process that writes an image without
the protocol corrupts its snapshots, as one that ignores the flock would.

Change tracking: an image may have a change journal beside it (`ChangeJournal`), in
which the writer records every extent it writes, like VMware's CBT. Its change token
at a snapshot is the journal's id and length then, so `changed_extents` of a later
snapshot is what was recorded in between; a journal that was reset (new id) or cut
says "cannot tell", and the sync falls back to hash-compare. Without a journal every
sync reads the allocated extents and stores only chunks whose content is new.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    describe_vm,
    run_of_snapshot,
)

if TYPE_CHECKING:
    from hamal_workers.config import Settings

log = logging.getLogger("hamal.local")
DISK_SUFFIXES = (".raw", ".img")
VM_JSON = "vm.json"
VM_JSON_KEYS = ("cpus", "memory_mib", "guest_os", "firmware", "nics", "disks")
_NIC_KEYS = ("name", "mac", "network", "addresses")
_DISK_KEYS = ("device", "boot")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_VM_JSON_MAX = 1 << 20
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


# --------------------------------------------------------------------------- copy-on-write

# Writers preserve whole blocks of this size: a 4 KiB write costs one 64 KiB copy once.
PRESERVE_BLOCK = 64 * 1024
_OVERLAY, _PRESERVED, _EXTENTS, _IMAGE = "overlay", "preserved", "extents.json", "image.json"


def _snapshot_links(image: Path) -> Path:
    """`.<image>.snapshots/`: one symlink per live snapshot of the image, to its directory."""
    return image.with_name(f".{image.name}.snapshots")


def preserve_before_write(image: Path, fd: int, offset: int, length: int) -> None:
    """The write protocol: before writing [offset, offset+length) of `image` through `fd`
    (held under the image's shared flock), keep what every live snapshot must still see."""
    try:
        links = list(os.scandir(_snapshot_links(image)))
    except FileNotFoundError:
        return
    for link in links:
        with contextlib.suppress(FileNotFoundError):  # a snapshot deleted meanwhile
            _preserve(Path(os.readlink(link.path)), fd, offset, length)


def _preserve(directory: Path, fd: int, offset: int, length: int) -> None:
    flags = os.open(directory / _PRESERVED, os.O_RDWR)
    try:
        # One writer at a time per snapshot: two writers both copying a block, one after
        # the other wrote it, would preserve new bytes as old.
        fcntl.flock(flags, fcntl.LOCK_EX)
        first, last = offset // PRESERVE_BLOCK, (offset + length - 1) // PRESERVE_BLOCK
        known = os.pread(flags, last - first + 1, first)
        overlay = -1
        try:
            for block, done in enumerate(known, start=first):
                if done:
                    continue
                original = os.pread(fd, PRESERVE_BLOCK, block * PRESERVE_BLOCK)
                if original.strip(b"\0"):  # zeros stay a hole in the overlay
                    if overlay < 0:
                        overlay = os.open(directory / _OVERLAY, os.O_WRONLY)
                    os.pwrite(overlay, original, block * PRESERVE_BLOCK)
                # The mark only once the bytes are there: readers trust the mark.
                os.pwrite(flags, b"\1", block)
        finally:
            if overlay >= 0:
                os.close(overlay)
    finally:
        os.close(flags)


def _start_cow(directory: Path, image: Path, fd: int, size: int) -> None:
    """Make `directory` a snapshot of the image open as `fd`; call it under the exclusive flock."""
    directory.mkdir(parents=True, exist_ok=True)
    st = os.fstat(fd)
    (directory / _IMAGE).write_text(
        json.dumps({"image": str(image), "dev": st.st_dev, "ino": st.st_ino, "size": size})
    )
    extents = [[e.offset, e.length] for e in data_extents(fd, size)]
    (directory / _EXTENTS).write_text(json.dumps(extents))
    with open(directory / _OVERLAY, "wb") as overlay:
        overlay.truncate(size)
    with open(directory / _PRESERVED, "wb") as flags:
        flags.truncate(-(-size // PRESERVE_BLOCK))
    links = _snapshot_links(image)
    links.mkdir(exist_ok=True)
    link = links / f"{directory.parent.name}-{directory.name}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(directory)


def _end_cow(directory: Path) -> None:
    try:
        image = Path(json.loads((directory / _IMAGE).read_text())["image"])
    except (FileNotFoundError, ValueError, KeyError):
        return
    with contextlib.suppress(FileNotFoundError):
        (_snapshot_links(image) / f"{directory.parent.name}-{directory.name}").unlink()


class CowSnapshotReader:
    """Reads one disk as its snapshot saw it: the live image, and the overlay where preserved."""

    def __init__(self, directory: Path, size: int) -> None:
        record = json.loads((directory / _IMAGE).read_text())
        self.size = size
        self.fd = os.open(record["image"], os.O_RDONLY)
        try:
            st = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) != (record["dev"], record["ino"]):
                raise PlatformError(
                    f"local: {record['image']} was replaced since its snapshot was taken; "
                    "the snapshot cannot be read"
                )
            self.overlay = os.open(directory / _OVERLAY, os.O_RDONLY)
            self.flags = os.open(directory / _PRESERVED, os.O_RDONLY)
        except BaseException:
            os.close(self.fd)
            raise

    def readinto(self, offset: int, buf: memoryview) -> int:
        length = min(len(buf), self.size - offset)
        if length <= 0:
            return 0
        view = buf[:length]
        # The live image first, then the marks: a block marked after this read was not yet
        # written when it was read; one marked before has its original in the overlay.
        got = os.preadv(self.fd, [view], offset)
        if got < length:
            raise PlatformError(
                f"local: the image shrank under its snapshot (read {got} of {length} bytes "
                f"at offset {offset})"
            )
        first = offset // PRESERVE_BLOCK
        marks = os.pread(self.flags, (offset + length - 1) // PRESERVE_BLOCK - first + 1, first)
        for block, marked in enumerate(marks, start=first):
            if marked:
                lo = max(block * PRESERVE_BLOCK, offset)
                hi = min((block + 1) * PRESERVE_BLOCK, offset + length)
                os.preadv(self.overlay, [view[lo - offset : hi - offset]], lo)
        return length

    def close(self) -> None:
        for fd in (self.fd, self.overlay, self.flags):
            os.close(fd)


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
    """Reads an image file as it is (benchmarks and tests read images directly)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def readinto(self, offset: int, buf: memoryview) -> int:
        return os.preadv(self.fd, [buf], offset)

    def close(self) -> None:
        os.close(self.fd)


class SnapshotReader(DiskReader):
    def __init__(self, directory: Path, size: int) -> None:
        self.cow = CowSnapshotReader(directory, size)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        got = self.cow.readinto(offset, memoryview(buf))
        return bytes(buf[:got])

    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.cow.readinto(offset, buf)

    def close(self) -> None:
        self.cow.close()


class LocalDiskSource(DiskSource):
    def __init__(self, snapshot: Snapshot, disk: str) -> None:
        super().__init__(snapshot, disk)
        info = snapshot.disks[disk]
        self.directory = Path(str(info["cow"]))
        self.image = Path(str(info["image"]))
        if not (self.directory / _IMAGE).exists():
            raise PlatformError(f"local: snapshot {snapshot.snapshot_id} of disk {disk} is gone")

    def allocated_extents(self) -> list[Extent]:
        extents = json.loads((self.directory / _EXTENTS).read_text())
        return [Extent(int(offset), int(length)) for offset, length in extents]

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        if not base_token or not self.token:
            return None
        return ChangeJournal(self.image).changed(base_token, self.token)

    def open_reader(self) -> DiskReader:
        return SnapshotReader(self.directory, self.size)


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

    def describe(self, vm: VmRef) -> dict[str, Any]:
        return describe_vm(vm, self._facts(vm))

    def _facts(self, vm: VmRef) -> dict[str, Any]:
        """The VM's `vm.json` as `describe_vm` facts; {} when there is none or it is malformed."""
        path = self.inventory / vm.name / VM_JSON
        try:
            with path.open("rb") as fh:
                raw = fh.read(_VM_JSON_MAX + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("local: %s unreadable, VM %s described without it: %s", path, vm.name, exc)
            return {}
        try:
            if len(raw) > _VM_JSON_MAX:
                raise ValueError(f"larger than {_VM_JSON_MAX} bytes")
            return vm_json_facts(json.loads(raw), [disk.name for disk in vm.disks])
        except ValueError as exc:  # json's errors too
            log.warning("local: %s ignored, VM %s described without it: %s", path, vm.name, exc)
            return {}

    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        target_dir = self.snapshot_root / vm.vm_id / snapshot_id
        facts = self._facts(vm)  # before the flocks: they hold the guests' writes
        disks = {}
        with self._quiesced(vm) as (created, fds):
            for disk in vm.disks:
                fd = fds[disk.name]
                size = os.fstat(fd).st_size
                directory = target_dir / disk.name
                _start_cow(directory, Path(disk.locator), fd, size)
                disks[disk.name] = {
                    "cow": str(directory),
                    "image": disk.locator,
                    "size": size,
                    "token": ChangeJournal(Path(disk.locator)).token(),
                }
        return Snapshot(
            snapshot_id, vm.vm_id, self.name, created, disks, consistency="vm",
            vm=describe_vm(vm, facts, disks),
        )  # fmt: skip

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
        target_dir = self.snapshot_root / snapshot.vm_id / snapshot.snapshot_id
        for directory in _subdirs(target_dir):
            _end_cow(directory)  # writers stop preserving for it, then it goes
        shutil.rmtree(target_dir, ignore_errors=True)
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


def vm_json_facts(data: Any, disk_names: list[str]) -> dict[str, Any]:
    """A parsed `vm.json` as `describe_vm` facts, or ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    _known_keys(data, VM_JSON_KEYS, "")
    facts: dict[str, Any] = {}
    for key in ("cpus", "memory_mib"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):  # fmt: skip
            raise ValueError(f"{key} must be a positive integer, not {value!r}")
        facts[key] = value
    for key in ("guest_os", "firmware"):
        facts[key] = _optional_text(data.get(key), key)
    nics = data.get("nics") or []
    if not isinstance(nics, list):
        raise ValueError("nics must be a list")
    facts["nics"] = []
    for n, nic in enumerate(nics):
        where = f"nics[{n}]"
        if not isinstance(nic, dict):
            raise ValueError(f"{where} must be an object")
        _known_keys(nic, _NIC_KEYS, f"{where}.")
        name = nic.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string")
        mac = _optional_text(nic.get("mac"), f"{where}.mac")
        if mac is not None and not _MAC.match(mac):
            raise ValueError(f"{where}.mac {mac!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
        addresses = nic.get("addresses") or []
        if not isinstance(addresses, list):
            raise ValueError(f"{where}.addresses must be a list")
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.addresses: {address!r} is not an IP address") from None
        network = _optional_text(nic.get("network"), f"{where}.network")
        facts["nics"].append(
            {"name": name, "mac": mac, "network": network, "addresses": list(addresses)}
        )
    disks = data.get("disks") or {}
    if not isinstance(disks, dict):
        raise ValueError("disks must be an object of disk file name -> {device, boot}")
    for name, item in disks.items():
        where = f"disks[{name!r}]"
        if name not in disk_names:
            raise ValueError(f"{where}: the VM has no such disk ({', '.join(disk_names)})")
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        _known_keys(item, _DISK_KEYS, f"{where}.")
        if not isinstance(item.get("boot", False), bool):
            raise ValueError(f"{where}.boot must be true or false")
        _optional_text(item.get("device"), f"{where}.device")
    # The platform's order (by file name), whatever the file's.
    facts["disks"] = [
        {"name": name, "device": disks[name].get("device"), "boot": disks[name].get("boot", False)}
        for name in disk_names
        if name in disks
    ]
    return facts


def _known_keys(data: dict[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ValueError(
            f"unknown key {prefix}{unknown[0]} (known: {', '.join(prefix + k for k in keys)})"
        )


def _optional_text(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string or null, not {value!r}")
    return value


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
