"""Hamal's engine driven the way a disk task drives it, minus Celery and Redis.

The image is one disk of one VM, presented through the platform contract (a
`DiskSource` over the image file), planned with the real `new_plan` against the store's
committed points and synced with `sync_disk` into a `ChunkStore`, with the engine
settings a worker derives from hamal.conf at its defaults.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from hamal_workers.config import Settings
from hamal_workers.engine.extents import Extent
from hamal_workers.engine.pipeline import DiskResult, EngineSettings, sync_disk
from hamal_workers.engine.plan import new_plan
from hamal_workers.platforms import spec
from hamal_workers.platforms.base import DiskReader, DiskSource, Snapshot
from hamal_workers.platforms.local import FileReader, data_extents
from hamal_workers.targets.base import DiskManifest
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.encryption import ChunkCipher
from hamal_workers.targets.restore import restore_disk

DISK = "disk0.raw"
VM_ID = "bench-vm"


class ImageSource(DiskSource):
    """An image file as the disk of one snapshot whose change token is `token`.

    `changed` stands in for a hypervisor's changed-block tracking: the extents written
    since the base point, reported only when the sync has a base with a token.
    """

    def __init__(self, image: Path, token: str, changed: list[Extent] | None = None) -> None:
        disks = {DISK: {"size": image.stat().st_size, "token": token}}
        snapshot = Snapshot(token, VM_ID, "local", time.time(), disks)
        super().__init__(snapshot, DISK)
        self.image = image
        self.changed = changed

    def allocated_extents(self) -> list[Extent]:
        fd = os.open(self.image, os.O_RDONLY)
        try:
            return data_extents(fd, self.size)
        finally:
            os.close(fd)

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        return self.changed if base_token else None

    def open_reader(self) -> DiskReader:
        return FileReader(str(self.image))


class MeteredStore(ChunkStore):
    """A ChunkStore that adds up the time its durability barriers take.

    The engine calls sync() before every checkpoint and at the end; peers such as benji
    do not fsync their data at all, so this share of Hamal's time is worth seeing.
    """

    def __init__(self, root: Path, cipher: ChunkCipher | None = None) -> None:
        super().__init__(root, cipher=cipher)
        self.barrier_seconds = 0.0

    def sync(self) -> None:
        started = time.perf_counter()
        super().sync()
        self.barrier_seconds += time.perf_counter() - started


def engine_settings(settings: Settings) -> EngineSettings:
    """What a worker runs the local platform with (HamalTask.engine_settings)."""
    local = spec("local")
    cap = local.max_writers(settings)
    writers = settings.target.writers
    return EngineSettings(
        readers=settings.data_sync_v2.pre_disk_readers_count,
        writers=min(writers, cap) if cap else writers,
        release_cpu_ms_per_mb=local.release_cpu_ms_per_mb(settings),
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


def timed_sync(store: MeteredStore, source: ImageSource, settings: EngineSettings) -> TimedSync:
    """Plan and sync the disk as a disk task does: against the newest committed point (an
    incremental when there is one: CHANGED if the source reports changes, else ALLOCATED
    with hash-compare)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    barriers = store.barrier_seconds
    started = time.perf_counter()
    plan = new_plan(source, store, VM_ID)
    result = sync_disk(plan, source.open_reader, store, settings)
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


def commit(store: ChunkStore, source: ImageSource, manifest: DiskManifest, point_id: str) -> None:
    """Commit the synced disk as a restore point, with its change token, as finalize does."""
    store.stage_disk(VM_ID, point_id, manifest)
    meta = {"bench": True, "tokens": {DISK: source.token}}
    store.commit_point(VM_ID, "bench", point_id, time.time(), [DISK], meta)


def new_digests(manifest: DiskManifest, base: DiskManifest) -> set[bytes]:
    return set(manifest.stored_digests()) - set(base.stored_digests())


def forget_chunks(store: ChunkStore, digests: set[bytes]) -> None:
    """Delete chunks an incremental added, so the next run starts from the base alone."""
    for digest in digests:
        store.chunk_path(digest).unlink(missing_ok=True)


def restore_point(store: ChunkStore, point_id: str, out: Path) -> None:
    out.unlink(missing_ok=True)
    restore_disk(store, VM_ID, point_id, DISK, str(out))
