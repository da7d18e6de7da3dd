"""Hamal's engine driven the way a disk task drives it, minus Celery and Redis.

The image is presented through the local platform (a snapshot is just the image file),
planned with the real `plan_disk` and synced with `sync_disk` into a `ChunkStore`, with
the engine settings a worker derives from hamal.conf at its defaults.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

from hamal_workers.config import Settings
from hamal_workers.engine.extents import Extent
from hamal_workers.engine.pipeline import DiskResult, EngineSettings, sync_disk
from hamal_workers.engine.plan import plan_disk
from hamal_workers.platforms import release_cpu_ms_per_mb
from hamal_workers.platforms.base import Snapshot
from hamal_workers.platforms.local import LocalPlatform
from hamal_workers.targets.base import DiskManifest
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

DISK = "disk0.raw"
VM_ID = "bench-vm"


class ImagePlatform(LocalPlatform):
    """The local platform over image files we snapshot ourselves, with change tracking.

    `changed` stands in for a hypervisor's changed-block tracking: the extents written
    since the base snapshot, reported only when the sync has a base.
    """

    def __init__(self, root: Path, changed: list[Extent] | None = None) -> None:
        super().__init__(inventory=str(root), lib_dir=str(root))
        self.changed = changed

    def changed_extents(
        self, snapshot: Snapshot, disk: str, base: Snapshot | None
    ) -> list[Extent] | None:
        return self.changed if base is not None else None


class MeteredStore(ChunkStore):
    """A ChunkStore that adds up the time its durability barriers (directory fsyncs) take.

    The engine calls sync() before every checkpoint and at the end; peers such as benji
    do not fsync their data at all, so this share of Hamal's time is worth seeing.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.barrier_seconds = 0.0

    def sync(self) -> None:
        started = time.perf_counter()
        super().sync()
        self.barrier_seconds += time.perf_counter() - started


def snapshot_of(image: Path, snapshot_id: str) -> Snapshot:
    """The image as a snapshot of VM_ID's one disk: what `create_snapshot` would return."""
    disks = {DISK: {"path": str(image), "size": image.stat().st_size}}
    return Snapshot(snapshot_id, VM_ID, "local", time.time(), disks)


def engine_settings(settings: Settings) -> EngineSettings:
    """What a worker runs the local platform with (HamalTask.engine_settings)."""
    return EngineSettings(
        readers=settings.data_sync_v2.pre_disk_readers_count,
        writers=settings.fusion_compute.max_writer_num,
        release_cpu_ms_per_mb=release_cpu_ms_per_mb("local", settings),
        checkpoint_every_s=float(settings.data_sync_v2.fsync_period_frequency),
        fsync_timeout_s=float(settings.data_sync_v2.fsync_timeout),
        progress_every_s=float(settings.period.task_update_wait_time),
    )


@dataclass(frozen=True)
class TimedSync:
    seconds: float  # plan + engine + a last durability barrier
    barrier_seconds: float  # every target.sync() in that time, the engine's own included
    cpu_user: float  # of this whole process meanwhile: the engine's threads, mostly
    cpu_system: float
    minor_faults: int
    result: DiskResult


def timed_sync(
    store: MeteredStore,
    platform: ImagePlatform,
    snapshot: Snapshot,
    settings: EngineSettings,
    base: tuple[Snapshot, DiskManifest] | None = None,
) -> TimedSync:
    """Plan and sync the disk; a base makes it an incremental (CHANGED if the platform
    reports changes, else ALLOCATED with the base's digests known)."""
    base_snapshot, base_manifest = base if base else (None, None)
    before = resource.getrusage(resource.RUSAGE_SELF)
    barriers = store.barrier_seconds
    started = time.perf_counter()
    plan = plan_disk(platform, snapshot, DISK, store.chunk_size, base_snapshot, base_manifest)
    result = sync_disk(plan, lambda: platform.open_reader(snapshot, DISK), store, settings)
    store.sync()  # the engine's last checkpoint did one already: this one finds nothing to do
    ended = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return TimedSync(
        ended - started,
        store.barrier_seconds - barriers,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
        after.ru_minflt - before.ru_minflt,
        result,
    )


def new_digests(manifest: DiskManifest, base: DiskManifest) -> set[bytes]:
    return set(manifest.stored_digests()) - set(base.stored_digests())


def forget_chunks(store: ChunkStore, digests: set[bytes]) -> None:
    """Delete chunks an incremental added, so the next run starts from the base alone."""
    for digest in digests:
        store.chunk_path(digest).unlink(missing_ok=True)


def restore_point(store: ChunkStore, manifest: DiskManifest, point_id: str, out: Path) -> None:
    """Commit the manifest as a restore point and restore it to `out`."""
    store.stage_disk(VM_ID, point_id, manifest)
    store.commit_point(VM_ID, "bench", point_id, time.time(), [DISK], {"bench": True})
    out.unlink(missing_ok=True)
    restore_disk(store, VM_ID, point_id, DISK, str(out))
