"""A checkpoint never names a chunk the target's barrier has not covered yet.

The store is the real ChunkStore; the subclass only writes down, in order, every chunk it
actually wrote and every barrier, and the checkpoint writes down what it saves. Moving
`checkpoint.save` before the barrier in the engine makes this test fail.
"""

from __future__ import annotations

from pathlib import Path

from hamal_workers.engine.pipeline import EngineSettings, sync_disk
from hamal_workers.engine.plan import new_plan
from hamal_workers.platforms.local import LocalPlatform
from hamal_workers.simulators.local_vms import ImageLayout, make_image
from hamal_workers.targets.chunkstore import ChunkStore

MiB = 1024 * 1024


class RecordingStore(ChunkStore):
    def __init__(self, root: Path, events: list[tuple[str, bytes]]) -> None:
        super().__init__(root, chunk_size=MiB)
        self.events = events

    def put_chunk(self, name: bytes, payload: bytes | memoryview, codec: int, length: int) -> int:
        written = super().put_chunk(name, payload, codec, length)
        if written:
            self.events.append(("put", name))
        return written

    def sync(self) -> None:
        super().sync()
        self.events.append(("sync", b""))


class RecordingCheckpoint:
    def __init__(self, events: list[tuple[str, bytes]]) -> None:
        self.events = events

    def load(self) -> dict[int, bytes | None]:
        return {}

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int = 0
    ) -> None:
        for name in new_entries.values():
            if name is not None:
                self.events.append(("save", name))


def test_every_saved_entry_was_covered_by_a_barrier(tmp_path: Path) -> None:
    inv = tmp_path / "inv"
    layout = ImageLayout(
        size=96 * MiB, random_bytes=40 * MiB, compressible_bytes=16 * MiB, zero_bytes=0, piece=MiB
    )
    make_image(inv / "vm" / "d.raw", layout, seed=5)
    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    snapshot = platform.create_snapshot(vm, "hamal-20261125T000000Z-000001")
    events: list[tuple[str, bytes]] = []
    store = RecordingStore(tmp_path / "store", events)
    # A checkpoint every few milliseconds: many barriers and saves, interleaved with puts.
    settings = EngineSettings(
        readers=2, writers=4, checkpoint_every_s=0.001, release_cpu_ms_per_mb=10
    )
    with platform.open_disk(snapshot, "d.raw") as source:
        plan = new_plan(source, store, vm.vm_id)
        sync_disk(plan, source.open_reader, store, settings, RecordingCheckpoint(events))
    saves = [name for kind, name in events if kind == "save"]
    assert len(saves) >= 40 and sum(kind == "sync" for kind, _ in events) >= 5, events[:10]
    uncovered: set[bytes] = set()
    for kind, name in events:
        if kind == "put":
            uncovered.add(name)
        elif kind == "sync":
            uncovered.clear()
        else:
            assert name not in uncovered, "a checkpoint named a chunk before the barrier"
    platform.delete_snapshot(snapshot)


def test_a_resumed_sync_trusts_only_what_was_saved(tmp_path: Path) -> None:
    """Entries from a checkpoint are taken as stored; the rest is read again."""
    inv = tmp_path / "inv"
    layout = ImageLayout(
        size=32 * MiB, random_bytes=16 * MiB, compressible_bytes=0, zero_bytes=0, piece=MiB
    )
    make_image(inv / "vm" / "d.raw", layout, seed=9)
    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    snapshot = platform.create_snapshot(vm, "hamal-20261125T000000Z-000002")
    store = ChunkStore(tmp_path / "store", chunk_size=MiB)
    with platform.open_disk(snapshot, "d.raw") as source:
        plan = new_plan(source, store, vm.vm_id)
        first = sync_disk(plan, source.open_reader, store, EngineSettings())

        class Halfway:
            def load(self) -> dict[int, bytes | None]:
                half = plan.to_read[: len(plan.to_read) // 2]
                return {i: first.manifest.entries[i] for i in half}

            def save(
                self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int = 0
            ) -> None:
                pass

        again = sync_disk(plan, source.open_reader, store, EngineSettings(), Halfway())
    assert again.manifest.entries == first.manifest.entries
    assert again.chunks_resumed == len(plan.to_read) // 2
    assert again.chunks_read == len(plan.to_read) - again.chunks_resumed
    platform.delete_snapshot(snapshot)
