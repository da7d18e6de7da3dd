"""Which chunks of a disk a sync reads, and what the chunks it does not read hold."""

from __future__ import annotations

from dataclasses import dataclass, field

from hamal_workers.engine.extents import Extent, chunk_count, chunks_touched
from hamal_workers.platforms.base import Platform, Snapshot
from hamal_workers.targets.base import DiskManifest

CHANGED = "changed"  # the platform told us what changed since the base point
ALLOCATED = "allocated"  # read everything allocated, store what hashes differently


@dataclass
class DiskPlan:
    disk: str
    size: int
    chunk_size: int
    mode: str
    to_read: list[int]
    # Entry of every chunk the sync does not read: the base's for CHANGED, zero for ALLOCATED.
    initial: list[bytes | None]
    # Digests a committed point already holds: such chunks need no write.
    known: set[bytes] = field(default_factory=set)

    @property
    def read_bytes_planned(self) -> int:
        last = chunk_count(self.size, self.chunk_size) - 1
        tail = self.size - last * self.chunk_size
        return sum(tail if i == last else self.chunk_size for i in self.to_read)


def plan_disk(
    platform: Platform,
    snapshot: Snapshot,
    disk: str,
    chunk_size: int,
    base_snapshot: Snapshot | None,
    base_manifest: DiskManifest | None,
    saved_to_read: list[int] | None = None,
) -> DiskPlan:
    """The plan of one disk sync; `saved_to_read` is an earlier delivery's, from its checkpoint."""
    size = platform.disk_size(snapshot, disk)
    count = chunk_count(size, chunk_size)
    usable_base = base_manifest is not None and base_manifest.chunk_size == chunk_size
    known = set(base_manifest.stored_digests()) if usable_base and base_manifest else set()
    changed: list[Extent] | None = None
    if usable_base and base_snapshot is not None and saved_to_read is None:
        changed = platform.changed_extents(snapshot, disk, base_snapshot)
    changed_mode = changed is not None or (saved_to_read is not None and base_snapshot is not None)
    if changed_mode and usable_base and base_manifest is not None:
        initial = list(base_manifest.entries[:count])
        initial += [None] * (count - len(initial))
        if saved_to_read is not None:
            return DiskPlan(disk, size, chunk_size, CHANGED, saved_to_read, initial, known)
        to_read = set(chunks_touched(changed or [], chunk_size, size))
        if base_manifest.size != size:
            # A grown or shrunk disk: its old last chunk and everything after it is re-read.
            first_new = min(base_manifest.size, size) // chunk_size
            to_read.update(range(first_new, count))
        return DiskPlan(disk, size, chunk_size, CHANGED, sorted(to_read), initial, known)
    if saved_to_read is None:
        allocated = platform.allocated_extents(snapshot, disk)
        saved_to_read = chunks_touched(allocated, chunk_size, size)
    return DiskPlan(disk, size, chunk_size, ALLOCATED, saved_to_read, [None] * count, known)
