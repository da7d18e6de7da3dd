"""What every target offers the engine, the tasks and the `hamal` command.

A target stores restore points. A restore point is every disk of one VM at one
snapshot; each disk is a manifest that maps chunk index -> content digest (or
"zero"). Chunks are fixed-size pieces of the disk at absolute offsets, named by
the blake3 digest of their uncompressed content, so the same chunk put twice is
stored once and an incremental point only adds the chunks that changed.

The life of a point, which spans several Celery tasks on several workers:
disk tasks `put_chunk` and `stage_disk` (the manifest of one disk, invisible to
readers), then the finalize task calls `commit_point`, which makes every staged
disk visible at once. A point that was not committed does not exist.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

DIGEST_SIZE = 32
CHUNK_SIZE = 4 * 1024 * 1024

# Codecs of a stored chunk payload. The digest is always of the raw content.
CODEC_RAW = 0
CODEC_ZSTD = 1


class TargetError(Exception):
    """A target could not do what was asked; the message says what and where."""


class MissingPoint(TargetError):
    """No committed restore point with that VM and id."""


class CorruptManifest(TargetError):
    """A manifest that is truncated, altered, or of a format this reader does not know."""


class MissingChunk(TargetError):
    """A manifest names a chunk the store does not hold."""


class CorruptChunk(TargetError):
    """A chunk whose content does not hash to its name, or that cannot be decoded."""


@dataclass(frozen=True)
class DiskManifest:
    """One disk of one restore point: entry i covers bytes [i*chunk_size, (i+1)*chunk_size)."""

    disk: str
    size: int
    chunk_size: int
    # None means the chunk is all zeros (or a hole): nothing is stored for it.
    entries: list[bytes | None]

    @property
    def chunk_count(self) -> int:
        return len(self.entries)

    def stored_digests(self) -> Iterator[bytes]:
        return (d for d in self.entries if d is not None)


@dataclass(frozen=True)
class PointInfo:
    """A committed restore point."""

    vm_id: str
    vm_name: str
    point_id: str
    created: float  # unix time of the snapshot the point was taken from
    disks: dict[str, int]  # disk name -> size in bytes
    meta: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokenPoint:
    """A committed point whose record cannot be read: listed so it is never silently hidden."""

    vm_id: str
    point_id: str
    problem: str


@dataclass(frozen=True)
class PointScan:
    """What a listing found: the readable points (oldest first) and the broken ones."""

    points: list[PointInfo]
    broken: list[BrokenPoint]


class Target(ABC):
    """A store of restore points. Implementations: targets/chunkstore.py (filesystem)."""

    chunk_size: int = CHUNK_SIZE

    # --- chunks -------------------------------------------------------------
    @abstractmethod
    def has_chunk(self, digest: bytes) -> bool: ...

    @abstractmethod
    def put_chunk(self, digest: bytes, payload: bytes | memoryview, codec: int) -> int:
        """Store a chunk (idempotent); return the bytes written, 0 if it was already there."""

    @abstractmethod
    def get_chunk(self, digest: bytes) -> bytes:
        """The raw content of a chunk, verified against its digest."""

    # --- points -------------------------------------------------------------
    @abstractmethod
    def stage_disk(self, vm_id: str, point_id: str, manifest: DiskManifest) -> None:
        """Keep a disk's manifest for a point that is not committed yet (idempotent)."""

    @abstractmethod
    def staged_disks(self, vm_id: str, point_id: str) -> list[str]: ...

    @abstractmethod
    def commit_point(
        self, vm_id: str, vm_name: str, point_id: str, created: float, meta: dict[str, object]
    ) -> PointInfo:
        """Make every staged disk of the point visible at once (idempotent)."""

    @abstractmethod
    def discard_point(self, vm_id: str, point_id: str) -> None:
        """Forget a point that was staged but will never be committed."""

    @abstractmethod
    def points(self, vm_id: str | None = None) -> list[PointInfo]:
        """Committed points, oldest first."""

    @abstractmethod
    def manifest(self, vm_id: str, point_id: str, disk: str) -> DiskManifest: ...

    @abstractmethod
    def sync(self) -> None:
        """Durability barrier: everything written before the call survives a power loss."""

    # --- derived ------------------------------------------------------------
    def scan_points(self, vm_id: str | None = None) -> PointScan:
        """Like points(), but a broken point is reported instead of raised.

        points() raises on a broken point because the engine builds incrementals on the
        newest one; listing, restore and verify use this so one broken point does not hide
        the good ones. Targets that can have broken points override it.
        """
        return PointScan(self.points(vm_id), [])

    def point(self, vm_id: str, point_id: str) -> PointInfo:
        """A committed point by id, or the newest one for point_id == "latest"."""
        points = self.points(vm_id)
        if not points:
            raise MissingPoint(f"VM {vm_id} has no restore point")
        if point_id == "latest":
            return points[-1]
        for info in points:
            if info.point_id == point_id:
                return info
        raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")

    def latest_manifest(self, vm_id: str, disk: str) -> DiskManifest | None:
        """The disk's manifest in the newest committed point that has it.

        That manifest is the base of an incremental.
        """
        for info in reversed(self.points(vm_id)):
            if disk in info.disks:
                return self.manifest(vm_id, info.point_id, disk)
        return None
