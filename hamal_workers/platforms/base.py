"""What every source platform offers: VMs, snapshots, changed extents, readers.

A platform knows nothing of targets or Celery. Everything a task passes between
processes about a platform (VM and snapshot identities) is plain JSON.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

from hamal_workers.engine.extents import Extent


class PlatformError(Exception):
    """The platform refused or failed an operation; the message says which and why."""


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


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of every disk of a VM that the proxy created and must delete."""

    snapshot_id: str
    vm_id: str
    platform: str
    created: float
    # disk name -> what a reader needs to open that disk at this snapshot
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(**data)

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.vm_id}:{self.snapshot_id}"


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


class Platform(ABC):
    name: str  # also the Celery queue its disk tasks go to
    # True when the next sync diffs against this snapshot (Ceph, VMware): keep it until then.
    keeps_base_snapshot: bool = True

    @abstractmethod
    def discover(self) -> list[VmRef]: ...

    def vm(self, vm_id: str) -> VmRef:
        for ref in self.discover():
            if ref.vm_id == vm_id:
                return ref
        raise PlatformError(f"{self.name}: no VM with id {vm_id}")

    @abstractmethod
    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot: ...

    @abstractmethod
    def delete_snapshot(self, snapshot: Snapshot) -> None:
        """Delete a snapshot the proxy created; deleting one that is gone is not an error.

        It must work from the identity alone (`disks` empty): the record written before
        creation is all the sweep has when creation itself was interrupted.
        """

    @abstractmethod
    def allocated_extents(self, snapshot: Snapshot, disk: str) -> list[Extent]:
        """Every extent that may hold data (holes excluded), for a first or a hash-compared sync."""

    def changed_extents(
        self, snapshot: Snapshot, disk: str, base: Snapshot | None
    ) -> list[Extent] | None:
        """Extents changed since `base`, or None when the platform cannot tell (no CBT, reset)."""
        return None

    @abstractmethod
    def open_reader(self, snapshot: Snapshot, disk: str) -> DiskReader: ...

    def disk_size(self, snapshot: Snapshot, disk: str) -> int:
        return int(snapshot.disks[disk]["size"])
