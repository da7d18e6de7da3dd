"""Which chunks of a disk a sync reads, and what the chunks it does not read hold.

Two kinds of plan, and never a mix of them:

- CHANGED: the platform told what changed since the base point's change token; the
  chunks it touched are read, every other entry is the base point's.
- ALLOCATED: no usable base or token; every allocated chunk is read and every other
  entry is zero. Chunks whose content the store already holds are not written again
  (hash-compare), so this costs reads, not space.

A plan is saved whole in the disk's checkpoint (`to_fields`) and a redelivered task
rebuilds exactly that plan (`resume_plan`) or, when it cannot (the base point is gone
or damaged, the disk or the store changed shape), starts the disk over with a new one.
The base is found in the store, newest point first, so it survives the loss of Redis,
and a damaged newest point falls back to an older one or to a full read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hamal_workers.engine.extents import chunk_count, chunks_touched, from_runs, to_runs
from hamal_workers.platforms.base import DiskSource
from hamal_workers.targets.base import DiskManifest, Target, TargetError

CHANGED = "changed"  # the platform told us what changed since the base point
ALLOCATED = "allocated"  # read everything allocated, store what hashes differently
# How many of the newest points a sync looks at for a readable base before it reads all.
BASE_CANDIDATES = 10


@dataclass
class DiskPlan:
    disk: str
    size: int
    chunk_size: int
    mode: str
    to_read: list[int]
    # Entry of every chunk the sync does not read: the base's for CHANGED, zero for ALLOCATED.
    initial: list[bytes | None]
    base_point: str = ""
    base_token: str = ""
    # What an operator should know about how this plan was made (a skipped base ...).
    notes: list[str] = field(default_factory=list)

    @property
    def read_bytes_planned(self) -> int:
        last = chunk_count(self.size, self.chunk_size) - 1
        tail = self.size - last * self.chunk_size
        return sum(tail if i == last else self.chunk_size for i in self.to_read)

    def to_fields(self) -> dict[str, str]:
        """Everything the plan depends on, for the checkpoint."""
        return {
            "mode": self.mode,
            "size": str(self.size),
            "chunk_size": str(self.chunk_size),
            "base_point": self.base_point,
            "base_token": self.base_token,
            "plan": json.dumps(to_runs(self.to_read)),
            "total": str(len(self.to_read)),
        }


@dataclass(frozen=True)
class Base:
    point_id: str
    manifest: DiskManifest
    token: str
    flag: str = ""  # the source disk the point's copy came from ("" = none recorded)


def find_base(target: Target, vm_id: str, disk: str) -> tuple[Base | None, list[str]]:
    """The newest committed point with a readable manifest of `disk`, and what was skipped."""
    notes: list[str] = []
    for point_id in list(reversed(target.point_ids(vm_id)))[:BASE_CANDIDATES]:
        try:
            info = target.point(vm_id, point_id)
            if disk not in info.disks:
                continue
            manifest = target.manifest(vm_id, point_id, disk)
        except TargetError as exc:
            notes.append(f"restore point {point_id} cannot be a base ({exc})")
            continue
        if manifest.chunk_size != target.chunk_size:
            continue
        return Base(point_id, manifest, info.token(disk), info.flag(disk)), notes
    return None, notes


def new_plan(source: DiskSource, target: Target, vm_id: str, holds: str | None = None) -> DiskPlan:
    """holds: the point a raw replica holds (None for a chunk store). Only what changed
    since that very point may be read into it: from any other base, every allocated extent."""
    size, chunk_size = source.size, target.chunk_size
    count = chunk_count(size, chunk_size)
    base, notes = find_base(target, vm_id, source.disk)
    if base is not None and notes:
        notes.append(f"based on restore point {base.point_id} instead")
    changed = None
    if base is not None and base.flag and source.identity and base.flag != source.identity:
        # The disk flag: that point's copy came from another source disk (a volume whose
        # image was replaced or migrated). Its token says nothing of this disk.
        notes.append(
            f"disk flag: restore point {base.point_id} was taken from {base.flag}, this disk "
            f"is {source.identity}: reading every allocated extent, storing only new content"
        )
    elif base is not None and base.token and holds is not None and base.point_id != holds:
        # Asked before the platform's changed areas, which would be of no use.
        held = f"restore point {holds}" if holds else "no restore point"
        notes.append(
            f"the replica holds {held}, not {base.point_id}: reading every allocated extent"
        )
    elif base is not None and base.token:
        changed = source.changed_extents(base.token)
        if changed is None:
            notes.append(
                f"the platform cannot tell what changed since restore point {base.point_id}: "
                "reading every allocated extent and storing only new content"
            )
    if base is not None and changed is not None:
        initial = _base_entries(base.manifest, count)
        to_read = set(chunks_touched(changed, chunk_size, size))
        if base.manifest.size != size:
            # A grown or shrunk disk: its old last chunk and everything after it is re-read.
            to_read.update(range(min(base.manifest.size, size) // chunk_size, count))
        return DiskPlan(
            source.disk,
            size,
            chunk_size,
            CHANGED,
            sorted(to_read),
            initial,
            base.point_id,
            base.token,
            notes,
        )
    to_read = chunks_touched(source.allocated_extents(), chunk_size, size)
    return DiskPlan(
        source.disk,
        size,
        chunk_size,
        ALLOCATED,
        to_read,
        [None] * count,
        base.point_id if base else "",
        base.token if base else "",
        notes,
    )


def resume_plan(
    saved: dict[str, str], source: DiskSource, target: Target, vm_id: str
) -> tuple[DiskPlan | None, str]:
    """The plan an earlier delivery saved, rebuilt exactly; (None, why) when it cannot be."""
    try:
        mode, size, chunk_size = saved["mode"], int(saved["size"]), int(saved["chunk_size"])
        to_read = list(from_runs(json.loads(saved["plan"])))
        base_point, base_token = saved.get("base_point", ""), saved.get("base_token", "")
    except (KeyError, ValueError, TypeError) as exc:
        return None, f"its checkpoint is unreadable ({type(exc).__name__}: {exc})"
    if size != source.size or chunk_size != target.chunk_size:
        return None, "the disk or the store changed shape since it started"
    count = chunk_count(size, chunk_size)
    if mode == ALLOCATED:
        plan = DiskPlan(
            source.disk, size, chunk_size, mode, to_read, [None] * count, base_point, base_token
        )
        return plan, ""
    if mode != CHANGED or not base_point:
        return None, f"its checkpoint has an unknown plan ({mode!r})"
    try:
        manifest = target.manifest(vm_id, base_point, source.disk)
    except TargetError as exc:
        return None, f"its base, restore point {base_point}, is no longer readable ({exc})"
    if manifest.chunk_size != chunk_size:
        return None, f"its base, restore point {base_point}, has another chunk size"
    initial = _base_entries(manifest, count)
    return DiskPlan(
        source.disk, size, chunk_size, mode, to_read, initial, base_point, base_token
    ), ""


def _base_entries(manifest: DiskManifest, count: int) -> list[bytes | None]:
    entries = list(manifest.entries[:count])
    return entries + [None] * (count - len(entries))
