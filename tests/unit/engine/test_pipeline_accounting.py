"""What a disk sync reports: its counters, its progress, its checkpoints, its barrier limit.

The store is the real ChunkStore; where a test needs to see or slow the barrier, a
subclass writes it down or holds it, then runs the real one.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import zstandard

from hamal_workers.engine.pipeline import (
    PROBE_SLICE,
    BufferPool,
    EngineSettings,
    FlushTimeout,
    NoCheckpoint,
    sync_disk,
    worth_compressing,
)
from hamal_workers.engine.plan import ALLOCATED, CHANGED, DiskPlan
from hamal_workers.platforms.local import FileReader
from hamal_workers.simulators.local_vms import compressible
from hamal_workers.targets.base import TargetError
from hamal_workers.targets.chunkstore import ChunkStore

CS = 64 * 1024


def image_of(tmp_path: Path, chunks: list[bytes], tail: bytes = b"") -> Path:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"".join(chunks) + tail)
    return image


def plan_of(image: Path, to_read: list[int], mode: str = ALLOCATED) -> DiskPlan:
    size = image.stat().st_size
    count = -(-size // CS)
    return DiskPlan(image.name, size, CS, mode, to_read, [None] * count)


class Saves(NoCheckpoint):
    def __init__(self, log: list[str] | None = None) -> None:
        self.calls: list[tuple[dict[int, bytes | None], int, int]] = []
        self.log = log if log is not None else []

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int = 0
    ) -> None:
        self.calls.append((dict(new_entries), done, total))
        self.log.append("save")


class LoggingStore(ChunkStore):
    def __init__(self, root: Path, log: list[str]) -> None:
        super().__init__(root, chunk_size=CS)
        self.log = log

    def sync(self) -> None:
        super().sync()
        self.log.append("sync")


def test_the_result_counts_what_was_read_stored_zero_and_reused(tmp_path: Path) -> None:
    rng = random.Random(1)
    same = rng.randbytes(CS)
    chunks = [same, bytes(CS), rng.randbytes(CS), same, compressible(rng, CS), rng.randbytes(CS)]
    image = image_of(tmp_path, chunks, tail=b"t" * 100)
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    plan = plan_of(image, [0, 1, 2, 3, 4, 6])  # chunk 5 is not planned
    result = sync_disk(
        plan, lambda: FileReader(str(image)), store, EngineSettings(readers=1, writers=1)
    )
    assert (result.mode, result.planned_chunks, result.chunks_resumed) == (ALLOCATED, 6, 0)
    assert result.chunks_read == 6
    assert result.bytes_read == 5 * CS + 100
    assert result.chunks_zero == 1
    assert result.chunks_new == 4  # chunk 3 is chunk 0 again: stored once
    assert 0 < result.bytes_stored < 4 * CS
    assert result.seconds > 0
    entries = result.manifest.entries
    assert entries[1] is None and entries[5] is None and entries[0] == entries[3]
    assert entries[6] == store.chunk_name(b"t" * 100)
    assert store.get_chunk(entries[4]) == chunks[4]
    assert (result.manifest.size, result.manifest.chunk_size) == (6 * CS + 100, CS)


def test_a_resumed_sync_counts_what_it_did_not_read(tmp_path: Path) -> None:
    rng = random.Random(2)
    chunks = [rng.randbytes(CS) for _ in range(4)]
    image = image_of(tmp_path, chunks)
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    first = sync_disk(
        plan_of(image, [0, 1, 2, 3]), lambda: FileReader(str(image)), store, EngineSettings()
    )

    class Resumed(Saves):
        def load(self) -> dict[int, bytes | None]:
            return {1: first.manifest.entries[1], 3: first.manifest.entries[3]}

    ckpt = Resumed()
    plan = plan_of(image, [0, 1, 2, 3], CHANGED)
    again = sync_disk(plan, lambda: FileReader(str(image)), store, EngineSettings(), ckpt)
    assert (again.chunks_resumed, again.chunks_read, again.planned_chunks) == (2, 2, 4)
    assert again.mode == CHANGED and again.manifest.entries == first.manifest.entries
    # The checkpoint's counters go on from what was resumed, out of the whole plan.
    assert [(set(e), done, total) for e, done, total in ckpt.calls] == [({0, 2}, 4, 4)]


def test_each_checkpoint_follows_a_barrier_and_is_followed_by_after_flush(
    tmp_path: Path,
) -> None:
    rng = random.Random(3)
    image = image_of(tmp_path, [rng.randbytes(CS) for _ in range(6)])
    log: list[str] = []
    store = LoggingStore(tmp_path / "store", log)
    ckpt = Saves(log)
    result = sync_disk(
        plan_of(image, list(range(6))),
        lambda: FileReader(str(image)),
        store,
        EngineSettings(checkpoint_every_s=0.0, readers=1, writers=1),
        ckpt,
        after_flush=lambda: log.append("after"),
    )
    assert log and len(log) % 3 == 0
    assert log == ["sync", "save", "after"] * (len(log) // 3)
    saved: dict[int, bytes | None] = {}
    for entries, done, total in ckpt.calls:
        assert not set(entries) & set(saved)  # only what is new since the last save
        saved.update(entries)
        assert (done, total) == (len(saved), 6)
    assert saved == dict(enumerate(result.manifest.entries))


def test_a_long_interval_saves_once_at_the_end(tmp_path: Path) -> None:
    rng = random.Random(4)
    image = image_of(tmp_path, [rng.randbytes(CS) for _ in range(5)])
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    ckpt = Saves()
    sync_disk(
        plan_of(image, list(range(5))),
        lambda: FileReader(str(image)),
        store,
        EngineSettings(checkpoint_every_s=3600),
        ckpt,
    )
    assert [(len(e), done, total) for e, done, total in ckpt.calls] == [(5, 5, 5)]


def test_progress_ends_at_the_planned_bytes_and_never_goes_back(tmp_path: Path) -> None:
    rng = random.Random(5)
    image = image_of(tmp_path, [rng.randbytes(CS) for _ in range(8)], tail=b"x" * 10)
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    plan = plan_of(image, [0, 3, 8])
    seen: list[tuple[int, int]] = []
    sync_disk(
        plan,
        lambda: FileReader(str(image)),
        store,
        EngineSettings(progress_every_s=0.0),
        progress=lambda done, total: seen.append((done, total)),
    )
    planned = 2 * CS + 10
    assert plan.read_bytes_planned == planned
    assert seen[-1] == (planned, planned)
    assert all(total == planned and 0 <= done <= planned for done, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) >= 2  # at least one report on the way, then the end
    # On the way, whole chunks' worth of bytes: never a fraction, never past the plan.
    assert all(isinstance(done, int) for done, _ in seen)
    assert all(done % CS == 0 or done == planned for done, _ in seen)


class HeldBarrier(ChunkStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root, chunk_size=CS)
        self.release = threading.Event()

    def sync(self) -> None:
        self.release.wait(30)
        super().sync()


def test_a_barrier_slower_than_the_fsync_timeout_fails_the_sync(tmp_path: Path) -> None:
    image = image_of(tmp_path, [b"a" * CS])
    store = HeldBarrier(tmp_path / "store")
    ckpt = Saves()
    try:
        with pytest.raises(FlushTimeout, match=r"disk disk.raw: flushing the target took more"):
            sync_disk(
                plan_of(image, [0]),
                lambda: FileReader(str(image)),
                store,
                EngineSettings(fsync_timeout_s=0.05),
                ckpt,
            )
    finally:
        store.release.set()
    assert ckpt.calls == []  # nothing saved without the barrier


def test_a_barrier_within_the_fsync_timeout_saves(tmp_path: Path) -> None:
    image = image_of(tmp_path, [b"a" * CS])
    store = HeldBarrier(tmp_path / "store")
    store.release.set()
    ckpt = Saves()
    sync_disk(
        plan_of(image, [0]),
        lambda: FileReader(str(image)),
        store,
        EngineSettings(fsync_timeout_s=30),
        ckpt,
    )
    assert len(ckpt.calls) == 1


def test_a_reader_that_cannot_open_fails_the_sync_with_its_error(tmp_path: Path) -> None:
    image = image_of(tmp_path, [b"a" * CS])
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    missing = str(tmp_path / "gone.raw")
    with pytest.raises(FileNotFoundError):
        sync_disk(plan_of(image, [0]), lambda: FileReader(missing), store, EngineSettings())


def test_only_data_worth_it_is_compressed() -> None:
    compressor = zstandard.ZstdCompressor(level=1)
    rng = random.Random(6)
    small = memoryview(rng.randbytes(4 * PROBE_SLICE))
    assert worth_compressing(compressor, small)  # too small to probe: just try
    assert not worth_compressing(compressor, memoryview(rng.randbytes(4 * PROBE_SLICE + 1)))
    assert worth_compressing(compressor, memoryview(compressible(rng, 8 * PROBE_SLICE)))
    # Random everywhere but in the middle: the probe's middle slice makes it worth a try.
    middle = (
        rng.randbytes(4 * PROBE_SLICE) + bytes(PROBE_SLICE) * 2 + rng.randbytes(4 * PROBE_SLICE)
    )
    assert worth_compressing(compressor, memoryview(middle))
    ends = bytes(PROBE_SLICE) + rng.randbytes(8 * PROBE_SLICE) + bytes(PROBE_SLICE)
    assert worth_compressing(compressor, memoryview(ends))


def test_a_reused_chunk_whose_bytes_changed_under_its_name_is_stored_again(
    tmp_path: Path,
) -> None:
    # Same length, same header, other bytes: only the full comparison (every day with
    # full_compare_days=1) can tell, and the engine must give it the chunk's content.
    rng = random.Random(7)
    image = image_of(tmp_path, [rng.randbytes(CS)])
    store = ChunkStore(tmp_path / "store", chunk_size=CS, full_compare_days=1)
    first = sync_disk(plan_of(image, [0]), lambda: FileReader(str(image)), store, EngineSettings())
    (name,) = [entry for entry in first.manifest.entries if entry is not None]
    path = store.chunk_path(name)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0x01
    path.chmod(0o640)
    path.write_bytes(bytes(damaged))
    again = sync_disk(plan_of(image, [0]), lambda: FileReader(str(image)), store, EngineSettings())
    assert again.chunks_new == 1
    assert store.get_chunk(name) == image.read_bytes()


def test_the_buffer_pool_never_makes_more_buffers_than_its_size() -> None:
    pool = BufferPool(2, CS)
    stop = threading.Event()
    held = [pool.take(stop), pool.take(stop)]
    got: list[bytearray | None] = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(stop)))
    waiter.start()
    # The third take waits for a buffer to come back; it gets exactly that one.
    returned = held.pop()
    assert returned is not None
    pool.give(returned)
    waiter.join()
    assert got[0] is returned


class RefusingStore(ChunkStore):
    """A store whose disk went away after the first chunk: every later put fails."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, chunk_size=CS)
        self.puts = 0

    def put_chunk(self, name: bytes, payload: bytes | memoryview, codec: int, length: int) -> int:
        self.puts += 1
        if self.puts > 1:
            raise TargetError("chunk store is gone")
        return super().put_chunk(name, payload, codec, length)


def test_a_chunk_the_store_refuses_fails_the_sync_with_its_error(tmp_path: Path) -> None:
    rng = random.Random(3)
    image = image_of(tmp_path, [rng.randbytes(CS) for _ in range(4)])
    ckpt = Saves()
    with pytest.raises(TargetError, match="chunk store is gone"):
        sync_disk(
            plan_of(image, [0, 1, 2, 3]),
            lambda: FileReader(str(image)),
            RefusingStore(tmp_path / "store"),
            EngineSettings(readers=1, writers=1),
            ckpt,
        )
    # What was saved names only chunks the store took.
    saved = {i for entries, _, _ in ckpt.calls for i in entries}
    assert saved <= {0}


def test_bytes_stored_is_what_the_new_chunk_files_hold(tmp_path: Path) -> None:
    rng = random.Random(5)
    chunks = [rng.randbytes(CS), compressible(rng, CS), rng.randbytes(CS), compressible(rng, CS)]
    image = image_of(tmp_path, chunks)
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    result = sync_disk(
        plan_of(image, [0, 1, 2, 3]), lambda: FileReader(str(image)), store, EngineSettings()
    )
    files = [p for p in (tmp_path / "store" / "chunks").rglob("*") if p.is_file()]
    assert len(files) == result.chunks_new == 4
    assert result.bytes_stored == sum(p.stat().st_size for p in files)
