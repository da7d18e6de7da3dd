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
"""

from __future__ import annotations

import re
import secrets
import time
from abc import ABC, abstractmethod
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

    # --- snapshots ----------------------------------------------------------------
    @abstractmethod
    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        """Snapshot every disk of the VM at one instant; each disk's entry has its token."""

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
