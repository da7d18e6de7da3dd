"""Restore points made by the engine, for the garbage collection tests.

Each sync is the engine's own path -- the local platform's snapshot, `new_plan`,
`sync_disk` with a Redis checkpoint and the reuse fence, `stage_disk`, `commit_point` --
with the run recorded in Redis as vm.sync records it, so the collector sees its
checkpoint. What a sync stored is remembered as the bytes of the image at its snapshot,
so every kept point can be restored and compared byte for byte.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from hamal_workers.engine.checkpoint import RedisCheckpoint
from hamal_workers.engine.pipeline import EngineSettings, sync_disk
from hamal_workers.engine.plan import new_plan
from hamal_workers.engine.reuse_fence import ReuseFence
from hamal_workers.platforms.base import VmRef, new_run_id, snapshot_name
from hamal_workers.platforms.local import LocalPlatform
from hamal_workers.simulators.local_vms import ImageLayout, make_image, scribble
from hamal_workers.state import COMMITTED, State, Writes
from hamal_workers.targets.base import DIGEST_SIZE
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
DISK = "d.raw"
LAYOUT = ImageLayout(
    size=4 * MiB, random_bytes=2 * MiB, compressible_bytes=MiB, zero_bytes=256 * KiB, piece=CHUNK
)
# A checkpoint after nearly every chunk: many acks, interleaved with the collector.
BUSY = EngineSettings(readers=2, writers=2, checkpoint_every_s=0.0005)


class Rig:
    def __init__(self, root: Path, state: State, vms: int = 2, store: ChunkStore | None = None):
        self.root = root
        self.state = state
        for n in range(vms):
            make_image(root / "inv" / f"vm{n}" / DISK, LAYOUT, seed=100 + n)
        self.platform = LocalPlatform(str(root / "inv"), str(root / "lib"))
        self.vms = {vm.name: vm for vm in self.platform.discover()}
        self.store = store or ChunkStore(root / "store", chunk_size=CHUNK)
        self.content: dict[tuple[str, str], bytes] = {}  # (vm_id, point_id) -> image bytes

    def image(self, vm: VmRef) -> Path:
        return self.root / "inv" / vm.name / DISK

    def write(self, vm: VmRef, rng: random.Random, writes: int = 3) -> None:
        scribble(self.image(vm), rng, writes, max_len=3 * CHUNK)

    def sync(
        self,
        vm: VmRef,
        settings: EngineSettings = BUSY,
        after_flush: Callable[[], None] | None = None,
    ) -> str:
        """One restore point of `vm`, made and committed the way the tasks make it."""
        run_id = new_run_id()
        writes = Writes()
        fields = {"vm_id": vm.vm_id, "vm_name": vm.name, "platform": "local", "point_id": run_id}
        self.state.start_run(writes, vm.vm_id, run_id, fields)
        self.state.plan_disks(writes, run_id, [DISK])
        self.state.apply(writes)
        snapshot = self.platform.create_snapshot(vm, snapshot_name(run_id))
        content = self.image(vm).read_bytes()
        fence = ReuseFence(self.state.gc_round)
        checkpoint = RedisCheckpoint(self.state, run_id, DISK, snapshot.snapshot_id)
        with self.platform.open_disk(snapshot, DISK) as source:
            plan = new_plan(source, self.store, vm.vm_id)
            checkpoint.start(plan, fence.ack())
            result = sync_disk(
                plan,
                source.open_reader,
                self.store,
                settings,
                checkpoint,
                after_flush=after_flush,
                fence=fence,
            )
        self.store.stage_disk(vm.vm_id, run_id, result.manifest)
        meta = {"tokens": {DISK: snapshot.token(DISK)}}
        self.store.commit_point(vm.vm_id, vm.name, run_id, snapshot.created, [DISK], meta)
        self.state.drop_checkpoints(run_id, [DISK])
        self.state.finish_run(run_id, vm.vm_id, COMMITTED, {"run_id": run_id})
        self.platform.delete_snapshot(snapshot)
        self.content[(vm.vm_id, run_id)] = content
        return run_id

    def assert_every_point_restores(self) -> int:
        """Restore every committed point and compare it with its source; how many."""
        points = self.store.points()
        for info in points:
            out = self.root / "restored.raw"
            restore_disk(self.store, info.vm_id, info.point_id, DISK, out, overwrite=True)
            expected = self.content[(info.vm_id, info.point_id)]
            assert out.read_bytes() == expected, f"{info.vm_id} {info.point_id} differs"
        return len(points)

    def referenced(self) -> set[bytes]:
        names: set[bytes] = set()
        for staged in (True, False):
            for manifest in self.store.iter_manifests(staged=staged):
                raw = bytes(manifest.digests)
                names.update(raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE))
        names.discard(bytes(DIGEST_SIZE))
        return names

    def age_chunks(self, seconds: float) -> None:
        """Make every chunk file look `seconds` old: past the collector's grace for new ones."""
        when = time.time() - seconds
        for path in (self.store.root / "chunks").glob("*/*/*"):
            os.utime(path, (when, when))

    def stored(self) -> tuple[set[bytes], int]:
        """(names of chunks under their names, how many condemned copies)."""
        chunks = list(self.store.iter_chunks())
        return {c.name for c in chunks if not c.condemned}, sum(1 for c in chunks if c.condemned)
