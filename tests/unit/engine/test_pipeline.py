"""The engine against a real filesystem chunk store and real image files."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import blake3
import pytest

from hamal_workers.engine.extents import Extent, chunks_touched, from_runs, to_runs
from hamal_workers.engine.pipeline import EngineSettings, NoCheckpoint, sync_disk
from hamal_workers.engine.plan import ALLOCATED, DiskPlan
from hamal_workers.platforms.local import FileReader, data_extents
from hamal_workers.state import LeaseLost
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
CS = 4 * MiB


def make_image(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)
        for offset, data in pieces.items():
            fh.seek(offset)
            fh.write(data)


def plan_for(path: Path) -> DiskPlan:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = data_extents(fd, size)
    finally:
        os.close(fd)
    count = -(-size // CS)
    return DiskPlan(
        path.name,
        size,
        CS,
        ALLOCATED,
        chunks_touched(extents, CS, size),
        [None] * count,
    )


def test_chunks_touched_and_runs() -> None:
    assert chunks_touched([Extent(0, 1), Extent(CS - 1, 2), Extent(10 * CS, CS)], CS, 64 * CS) == [
        0,
        1,
        10,
    ]
    assert chunks_touched([Extent(63 * CS, 5 * CS)], CS, 64 * CS) == [63]  # clipped at the end
    runs = to_runs([1, 2, 3, 7, 9, 10])
    assert runs == [[1, 3], [7, 1], [9, 2]]
    assert list(from_runs(runs)) == [1, 2, 3, 7, 9, 10]


def test_full_sync_skips_holes_stores_zero_as_zero_and_restores(tmp_path: Path) -> None:
    rng = random.Random(3)
    size = 40 * MiB + 12345  # a short last chunk
    pieces = {
        0: rng.randbytes(3 * MiB),
        9 * MiB: bytes(4 * MiB),
        20 * MiB: b"abc" * (MiB // 3),
        40 * MiB: rng.randbytes(12345),
    }
    image = tmp_path / "disk.raw"
    make_image(image, size, pieces)
    store = ChunkStore(str(tmp_path / "store"))
    plan = plan_for(image)
    result = sync_disk(plan, lambda: FileReader(str(image)), store, EngineSettings())
    # Holes are not read: only chunks with allocated data are.
    assert result.chunks_read == len(plan.to_read) < plan_count(size)
    assert result.bytes_read < size / 2
    # The written zeros are a "zero" entry, not stored data.
    assert result.chunks_zero >= 1
    store.stage_disk("vm", "p1", result.manifest)
    store.commit_point("vm", "vm", "p1", 1.0, ["disk.raw"], {})
    out = tmp_path / "out.raw"
    restore_disk(store, "vm", "p1", "disk.raw", str(out))
    assert out.read_bytes() == image.read_bytes()


def plan_count(size: int) -> int:
    return -(-size // CS)


def test_second_sync_of_same_content_stores_nothing(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 16 * MiB, {0: random.Random(1).randbytes(16 * MiB)})
    store = ChunkStore(str(tmp_path / "store"))
    first = sync_disk(plan_for(image), lambda: FileReader(str(image)), store, EngineSettings())
    assert first.chunks_new == 4 and first.bytes_stored > 0
    second = sync_disk(plan_for(image), lambda: FileReader(str(image)), store, EngineSettings())
    assert second.chunks_new == 0 and second.bytes_stored == 0
    assert second.manifest.entries == first.manifest.entries


class RecordingCheckpoint(NoCheckpoint):
    def __init__(self, resumed: dict[int, bytes | None] | None = None) -> None:
        self.resumed = resumed or {}
        self.saved: dict[int, bytes | None] = {}

    def load(self) -> dict[int, bytes | None]:
        return dict(self.resumed)

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int = 0
    ) -> None:
        self.saved.update(new_entries)


def test_resume_reads_only_what_the_checkpoint_lacks(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(32 * MiB)
    image = tmp_path / "disk.raw"
    make_image(image, len(data), {0: data})
    store = ChunkStore(str(tmp_path / "store"))
    first = sync_disk(plan_for(image), lambda: FileReader(str(image)), store, EngineSettings())
    resumed = {i: first.manifest.entries[i] for i in range(5)}
    ckpt = RecordingCheckpoint(resumed)
    again = sync_disk(
        plan_for(image), lambda: FileReader(str(image)), store, EngineSettings(), ckpt
    )
    assert again.chunks_resumed == 5
    assert again.chunks_read == 3 and again.bytes_read == 3 * CS
    assert again.manifest.entries == first.manifest.entries
    assert set(ckpt.saved) == {5, 6, 7}


def test_checkpoint_only_names_chunks_that_are_stored(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 24 * MiB, {0: random.Random(5).randbytes(24 * MiB)})
    store = ChunkStore(str(tmp_path / "store"))
    ckpt = RecordingCheckpoint()
    sync_disk(
        plan_for(image),
        lambda: FileReader(str(image)),
        store,
        EngineSettings(checkpoint_every_s=0.0),
        ckpt,
    )
    assert len(ckpt.saved) == 6
    for digest in ckpt.saved.values():
        assert digest is not None and store.has_chunk(digest, CS)
        assert blake3.blake3(store.get_chunk(digest)).digest() == digest


def test_lost_lease_stops_writing(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 64 * MiB, {0: random.Random(6).randbytes(64 * MiB)})
    store = ChunkStore(str(tmp_path / "store"))
    calls = {"n": 0}
    lock = threading.Lock()

    def check() -> None:
        with lock:
            calls["n"] += 1
            if calls["n"] > 3:
                raise LeaseLost("lost")

    with pytest.raises(LeaseLost):
        sync_disk(
            plan_for(image),
            lambda: FileReader(str(image)),
            store,
            EngineSettings(writers=1),
            check_lease=check,
        )
    stored = [p for p in (tmp_path / "store" / "chunks").rglob("*") if p.is_file()]
    assert len(stored) == 3


def test_short_read_is_an_error_naming_the_disk(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 8 * MiB, {0: b"x" * (8 * MiB)})
    plan = plan_for(image)
    os.truncate(image, 5 * MiB)  # the source shrank under the sync
    store = ChunkStore(str(tmp_path / "store"))
    with pytest.raises(Exception, match="disk.raw: short read at offset 4194304"):
        sync_disk(plan, lambda: FileReader(str(image)), store, EngineSettings())


def stored_codecs(store_root: Path) -> list[int]:
    return [p.read_bytes()[4] for p in (store_root / "chunks").rglob("*") if p.is_file()]


def test_random_chunks_are_stored_raw_and_text_compressed(tmp_path: Path) -> None:
    from hamal_workers.simulators.local_vms import compressible

    rng = random.Random(9)
    image = tmp_path / "disk.raw"
    make_image(image, 8 * MiB, {0: rng.randbytes(4 * MiB), 4 * MiB: compressible(rng, 4 * MiB)})
    store = ChunkStore(str(tmp_path / "store"))
    result = sync_disk(plan_for(image), lambda: FileReader(str(image)), store, EngineSettings())
    assert sorted(stored_codecs(tmp_path / "store")) == [0, 1]  # raw, zstd
    assert result.bytes_stored < 4 * MiB + 4 * MiB // 3


def test_many_more_chunks_than_buffers_with_one_slow_writer(tmp_path: Path) -> None:
    """Buffers go back to the pool after raw writes: a sync much larger than the pool ends."""
    data = random.Random(4).randbytes(48 * MiB)
    image = tmp_path / "disk.raw"
    make_image(image, len(data), {0: data})
    store = ChunkStore(str(tmp_path / "store"))
    result = sync_disk(
        plan_for(image), lambda: FileReader(str(image)), store, EngineSettings(readers=1, writers=1)
    )
    assert result.chunks_new == 12
    out = tmp_path / "out.raw"
    store.stage_disk("vm", "p", result.manifest)
    store.commit_point("vm", "vm", "p", 1.0, ["disk.raw"], {})
    restore_disk(store, "vm", "p", "disk.raw", str(out))
    assert out.read_bytes() == data
