"""What every source platform offers: VMs, snapshots with change tokens, disk sources.

A platform knows nothing of targets or Celery. Everything a task passes between
processes about a platform (VM and snapshot identities, change tokens) is plain JSON.

Lifetimes (every one released on every exit path, by `with`):

    with open_platform(name, settings) as platform:       # a session: login ... logout
        snapshot = platform.create_snapshot(vm, "hamal-<run id>")
        with platform.open_disk(snapshot, disk) as source: # per-disk resources: an NBD
            source.changed_extents(base_token)             # export, a backup socket ...
            reader = source.open_reader()                  # one per reader thread

A change token is an opaque string a platform gives per disk at snapshot time (a
VMware changeId, an RBD snapshot id, a FusionCompute ChgID); the committed restore
point records it, and the next sync asks `changed_extents(token)` of that point's
token -- never of a live base snapshot. Whether the platform needs its snapshot kept
after the commit to answer that is its own choice (`keeps_base_snapshot`).

Each snapshot also carries the VM's description at snapshot time (`Snapshot.vm`, built
by `describe_vm`): CPUs, memory, firmware, NICs and the disks in the VM's order, for the
restore point's metadata. What the platform does not say is None, never a guess.
"""

from __future__ import annotations

import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

from hamal_workers.engine.extents import Extent

# Every snapshot the proxy creates is named SNAPSHOT_PREFIX + run id; nothing else is ours.
SNAPSHOT_PREFIX = "hamal-"
_RUN_ID = re.compile(r"^[0-9]{8}T[0-9]{6}(\.[0-9]{6})?Z-[0-9a-f]{6}$")


def new_run_id(now: float | None = None) -> str:
    """Sortable by time, unique across proxies: it is also the restore point id.

    Microseconds, so that two runs of one VM within a second (a manual sync beside a
    scheduled one) still sort in the order they started: the engine finds the newest
    point by its id alone.
    """
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now % 1 * 1_000_000):06d}Z-{secrets.token_hex(3)}"


def snapshot_name(run_id: str) -> str:
    return SNAPSHOT_PREFIX + run_id


def run_of_snapshot(snapshot_id: str) -> str | None:
    """The run id a snapshot the proxy created is named after; None when it is not ours."""
    if not snapshot_id.startswith(SNAPSHOT_PREFIX):
        return None
    run_id = snapshot_id[len(SNAPSHOT_PREFIX) :]
    return run_id if _RUN_ID.match(run_id) else None


class PlatformError(Exception):
    """The platform refused or failed an operation; the message says which and why."""


class TransientPlatformError(PlatformError):
    """A failure worth retrying a little later (a timeout, a busy answer, a lost session)."""


@dataclass(frozen=True)
class DiskRef:
    name: str  # stable within the VM; names the disk in restore points
    size: int  # bytes
    locator: str  # platform-specific: a file path, an RBD image, a VMDK key


@dataclass(frozen=True)
class VmRef:
    vm_id: str
    name: str
    platform: str
    disks: tuple[DiskRef, ...]
    # Disks the VM has that the proxy does not sync, each with why (a volume not on
    # Ceph, an independent VMware disk): logged and shown with the run, never silent.
    skipped: tuple[str, ...] = ()
    # What the inventory call that made this ref said of the VM beyond its disks, as
    # `describe_vm` takes it (cpus, memory_mib, nics, disks' devices ...): the snapshot's
    # description then costs no second call. Not part of the VM's identity.
    facts: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of every disk of a VM that the proxy created and must delete."""

    snapshot_id: str
    vm_id: str
    platform: str
    created: float
    # disk name -> what a source needs to open that disk at this snapshot; always
    # "size" (bytes) and "token" (the change token, "" when the platform has none).
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How the disks were caught together: "vm" (one instant for every disk), "group" (a
    # platform's consistency group), "disk" (each disk on its own: not crash-consistent
    # across disks); "" when unknown. `consistency_note` says why it is not "vm"/"group".
    consistency: str = ""
    consistency_note: str = ""
    # What else the platform needs to delete it (an RBD group ...).
    details: dict[str, Any] = field(default_factory=dict)
    # The VM as the platform described it at snapshot time (`describe_vm`); {} in the
    # records of older versions and in the bare identities the sweep works from.
    vm: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(**data)

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.vm_id}:{self.snapshot_id}"

    @property
    def run_id(self) -> str | None:
        return run_of_snapshot(self.snapshot_id)

    def token(self, disk: str) -> str:
        return str(self.disks.get(disk, {}).get("token") or "")

    def tokens(self) -> dict[str, str]:
        return {disk: self.token(disk) for disk in self.disks}


def describe_vm(
    vm: VmRef,
    facts: Mapping[str, Any] | None = None,
    snapshot_disks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The VM description a restore point carries, from what a platform knows of the VM.

        {"name": str, "id": str,                      # the VM's name and platform id
         "cpus": int | None, "memory_mib": int | None,
         "guest_os": str | None, "firmware": str | None,          # "bios", "efi" ...
         "nics": [{"name": str, "mac": str | None, "network": str | None,
                   "addresses": [str, ...]}, ...],
         "disks": [{"name": str, "size": int, "device": str | None, "boot": bool}, ...]}

    `facts` may give cpus, memory_mib, guest_os, firmware, nics (dicts of the shape
    above) and disks: [{"name", "device", "boot"}] in the VM's own order (controller and
    unit, /dev/vda, /dev/vdb ...). The disks are exactly the restore point's (`vm.disks`):
    first those `facts` orders, then the others in the ref's order; sizes are the
    snapshot's where given (`snapshot_disks`), else the ref's. A value the platform does
    not give, or gives malformed, is None (an empty list for nics and addresses); `boot`
    is true only on a disk the platform says the VM boots from. No secret belongs here.
    """
    facts = facts or {}
    snapshot_disks = snapshot_disks or {}
    refs = {disk.name: disk for disk in vm.disks}
    known = {
        str(item.get("name")): item
        for item in facts.get("disks") or ()
        if isinstance(item, Mapping) and str(item.get("name")) in refs
    }
    order = list(known) + [name for name in refs if name not in known]
    disks = []
    for name in order:
        item = known.get(name, {})
        size = snapshot_disks.get(name, {}).get("size", refs[name].size)
        disks.append({
            "name": name,
            "size": int(size),
            "device": _text(item.get("device")),
            "boot": item.get("boot") is True,
        })  # fmt: skip
    nics = []
    for nic in facts.get("nics") or ():
        if not isinstance(nic, Mapping):
            continue
        addresses = nic.get("addresses") or ()
        nics.append({
            "name": _text(nic.get("name")) or "",
            "mac": _text(nic.get("mac")),
            "network": _text(nic.get("network")),
            "addresses": [str(a) for a in addresses if isinstance(a, str) and a],
        })  # fmt: skip
    return {
        "name": vm.name,
        "id": vm.vm_id,
        "cpus": _count(facts.get("cpus")),
        "memory_mib": _count(facts.get("memory_mib")),
        "guest_os": _text(facts.get("guest_os")),
        "firmware": _text(facts.get("firmware")),
        "nics": nics,
        "disks": disks,
    }


def _count(value: Any) -> int | None:
    """A positive whole number, or None (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class DiskFlags:
    """`[vmware]`/`[openstack_ceph]` skip_disk_flag, disk_flag_size: which disks carry a
    disk flag (an identity of the source disk kept with each of its restore points)."""

    skip: bool = False
    min_size_mb: int = 48

    def applies(self, size: int) -> bool:
        return not self.skip and size >= self.min_size_mb << 20


class DiskReader(ABC):
    """Reads one disk at one snapshot. One instance per reader thread."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes (short only at the end of the disk)."""

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset`; the engine reuses its buffers through this."""
        data = self.read(offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class RequestReader(DiskReader):
    """A reader whose transport answers at most `max_request` bytes per request."""

    max_request: int

    @abstractmethod
    def read_request(self, offset: int, view: memoryview) -> int:
        """Fill `view` (at most max_request bytes) from `offset`; short only at the end."""

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        got = self.readinto(offset, memoryview(buf))
        return bytes(buf[:got])

    def readinto(self, offset: int, buf: memoryview) -> int:
        done = 0
        while done < len(buf):
            size = min(self.max_request, len(buf) - done)
            got = self.read_request(offset + done, buf[done : done + size])
            done += got
            if got < size:
                break  # the end of the disk
        return done


class DiskSource(ABC):
    """One disk at one snapshot, with whatever the platform opened to read it.

    Opened once per disk task; `close` releases every per-disk resource and runs on
    every exit path (it is a context manager).
    """

    def __init__(self, snapshot: Snapshot, disk: str) -> None:
        self.snapshot = snapshot
        self.disk = disk

    @property
    def size(self) -> int:
        return int(self.snapshot.disks[self.disk]["size"])

    @property
    def token(self) -> str:
        return self.snapshot.token(self.disk)

    @property
    def identity(self) -> str:
        """The disk flag: which source disk this is, for the platforms that give one ("" = none).

        Recorded with each restore point; a base point whose flag names another source disk
        is not diffed against (`[vmware]`/`[openstack_ceph]` skip_disk_flag, disk_flag_size).
        """
        return str(self.snapshot.disks.get(self.disk, {}).get("identity") or "")

    @abstractmethod
    def allocated_extents(self) -> list[Extent]:
        """Every extent that may hold data (holes excluded): a first or a hash-compared sync."""

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        """Extents changed since the snapshot whose token is `base_token`.

        None when the platform cannot tell (no change tracking, a reset, a token it
        does not know): the engine then reads the allocated extents and stores only
        the chunks whose content is new, so the point is exact either way.
        """
        return None

    @abstractmethod
    def open_reader(self) -> DiskReader: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> DiskSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Platform(ABC):
    name: str  # also names its restore points' platform and its registry entry
    # True when the next sync needs this snapshot to answer changed_extents (Ceph):
    # it is kept as the VM's base until the next point is committed, then dropped.
    keeps_base_snapshot: bool = False
    # The least time between two listings of its leftovers by the sweep (0: every scan):
    # a listing that opens every image of a pool is not for every minute.
    leftover_listing_every_s: float = 0

    # --- session ----------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the session (log out, close connections)."""

    def __enter__(self) -> Platform:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- VMs ----------------------------------------------------------------------
    @abstractmethod
    def discover(self) -> list[VmRef]: ...

    def vm(self, vm_id: str) -> VmRef:
        for ref in self.discover():
            if ref.vm_id == vm_id:
                return ref
        raise PlatformError(f"{self.name}: no VM with id {vm_id}")

    def describe(self, vm: VmRef) -> dict[str, Any]:
        """The VM's description as it is now (`describe_vm`'s shape).

        By default what the ref carries: its name, id and disks, and its `facts` when the
        inventory gave some; a platform that can tell more (CPUs, NICs ...) says it here.
        `create_snapshot` puts the description at snapshot time in `Snapshot.vm`.
        """
        return describe_vm(vm, vm.facts)

    # --- snapshots ----------------------------------------------------------------
    @abstractmethod
    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        """Snapshot every disk of the VM at one instant; each disk's entry has its token,
        and `vm` the VM's description then (from the calls the snapshot makes anyway, as
        far as the platform allows: not one more call per disk)."""

    def trim_snapshot(self, snapshot: Snapshot) -> None:  # noqa: B027 - optional hook
        """After its point is committed, release what of a kept base snapshot the next
        sync will not need (Ceph: the group snapshot read for consistency; the per-image
        snapshots stay for diff_iterate). Only called when `keeps_base_snapshot`."""

    @abstractmethod
    def delete_snapshot(self, snapshot: Snapshot) -> None:
        """Delete a snapshot the proxy created; deleting one that is gone is not an error.

        It must work from the identity alone (`disks` empty): the record written before
        creation is all the sweep has when creation itself was interrupted.
        """

    @abstractmethod
    def leftover_snapshots(self) -> list[Snapshot]:
        """Every snapshot on the platform that the proxy made (named SNAPSHOT_PREFIX + run id).

        Found by listing the platform, not from Redis: after Redis is lost this is how
        the sweep finds what the proxy left behind. Never a snapshot it did not make.
        """

    # --- disks --------------------------------------------------------------------
    @abstractmethod
    def open_disk(self, snapshot: Snapshot, disk: str) -> DiskSource: ...
