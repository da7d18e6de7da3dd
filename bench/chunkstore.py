"""What the chunk store's safety costs: dedup verification, and durable puts.

    .venv/bin/python bench/chunkstore.py [--rounds 3] [--keep]

1. **Verification of reused chunks.** An unchanged incremental without change tracking
   reads every allocated chunk of the source and asks `has_chunk(name, length, content)`
   for each. Measured against reading the source image once (what that incremental pays
   anyway), with the page cache warm and cold (`drop_caches`, root only; skipped
   otherwise): has_chunk as it is (the shape check, and a full compare for the names
   whose day it is), without content (the shape check alone), with a full compare every
   time (`full_compare_days=1`), and `get_chunk` (decode + blake3, the re-hash a compare
   replaces).
2. **Put throughput from 10 writer threads** (the engine's default `max_writer_num`),
   barrier every 3 s and at the end, as the engine does: `put_chunk` as it is now
   (fdatasync per chunk in the writer thread, then rename; the barrier fsyncs the dirty
   directories), the same with `sync_file_range` write-back started before the
   fdatasync, and the earlier way (rename without fsync, write-back started with
   `sync_file_range`, barrier = `syncfs` of the whole filesystem).

The image is bench/images.py's 2 GiB mixed image (40% random, 30% text, 30% holes).
Everything lives under .bench/chunkstore/ and is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.images import GiB, MiB, MixedImage, build_image, read_through, remove_tree  # noqa: E402
from hamal_workers import fsutil  # noqa: E402
from hamal_workers.engine import pipeline  # noqa: E402
from hamal_workers.targets.base import CODEC_RAW, CODEC_ZSTD  # noqa: E402
from hamal_workers.targets.chunk_format import chunk_header  # noqa: E402
from hamal_workers.targets.chunkstore import ChunkStore  # noqa: E402

WORK = Path(__file__).resolve().parents[1] / ".bench" / "chunkstore"
WRITERS = 10
BARRIER_EVERY_S = 3.0
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Chunk:
    index: int
    name: bytes
    length: int
    payload: bytes
    codec: int


# --- setup ----------------------------------------------------------------------------


def allocated_chunks(image: Path, chunk: int) -> list[int]:
    """Indexes of the chunks that hold data (holes are not read by the engine)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        found, offset = [], 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            found.extend(range(start // chunk, -(-end // chunk)))
            offset = end
        return sorted(set(found))
    finally:
        os.close(fd)


def pack(image: Path, indexes: list[int], store: ChunkStore) -> list[Chunk]:
    """Cut, name and compress every non-zero chunk as the engine does."""
    compressor = zstandard.ZstdCompressor(level=pipeline.ZSTD_LEVEL)
    chunks = []
    with image.open("rb", buffering=0) as f:
        for index in indexes:
            f.seek(index * store.chunk_size)
            data = f.read(store.chunk_size)
            if data.count(0) == len(data):
                continue
            payload, codec = data, CODEC_RAW
            if pipeline.worth_compressing(compressor, memoryview(data)):
                packed = compressor.compress(data)
                if len(packed) < len(data) * pipeline.COMPRESS_WORTH:
                    payload, codec = packed, CODEC_ZSTD
            chunks.append(Chunk(index, store.chunk_name(data), len(data), payload, codec))
    return chunks


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


# --- 1. verification ------------------------------------------------------------------


def read_source(image: Path, chunks: list[Chunk], chunk: int, threads: int) -> float:
    """Wall time to preadv every stored chunk of the image into reused buffers."""
    fd = os.open(image, os.O_RDONLY)
    local = threading.local()

    def read(c: Chunk) -> None:
        buf = getattr(local, "buf", None) or bytearray(chunk)
        local.buf = buf
        os.preadv(fd, [memoryview(buf)[: c.length]], c.index * chunk)

    try:
        return _timed_pool(read, chunks, threads)
    finally:
        os.close(fd)


def read_and_check(
    image: Path, chunks: list[Chunk], store: ChunkStore, threads: int, mode: str
) -> float:
    """Wall time to read each chunk from the source and check it against the store."""
    every_time = ChunkStore(store.root, full_compare_days=1)
    fd = os.open(image, os.O_RDONLY)
    local = threading.local()

    def check(c: Chunk) -> None:
        buf = getattr(local, "buf", None) or bytearray(store.chunk_size)
        local.buf = buf
        view = memoryview(buf)[: c.length]
        os.preadv(fd, [view], c.index * store.chunk_size)
        content = buf if c.length == len(buf) else view
        if mode == "shape":
            ok = store.has_chunk(c.name, c.length)
        elif mode == "rule":
            ok = store.has_chunk(c.name, c.length, content)
        elif mode == "full":
            ok = every_time.has_chunk(c.name, c.length, content)
        else:
            ok = len(store.get_chunk(c.name)) == c.length
        assert ok, c.index

    try:
        return _timed_pool(check, chunks, threads)
    finally:
        os.close(fd)


def _timed_pool(work: Callable[[Chunk], None], chunks: list[Chunk], threads: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(work, chunks):
            pass
    return time.perf_counter() - started


def verification(image: Path, chunks: list[Chunk], store: ChunkStore, rounds: int) -> None:
    stored = sum(len(c.payload) for c in chunks)
    raw = sum(c.length for c in chunks)
    print(
        f"\n1. verification: {len(chunks)} stored chunks, {raw / MiB:.0f} MiB raw, "
        f"{stored / MiB:.0f} MiB in the store"
    )
    rows = []
    for threads in (1, 2):
        for cache in ("warm", "cold"):
            row = _verification_row(image, chunks, store, rounds, threads, cache)
            if row is None:
                print("   cold cache skipped: cannot drop caches (needs root)")
                continue
            rows.append(row)
    print("   threads cache   source read  +shape only  +has_chunk  +full compare  +get_chunk")
    for threads, cache, t in rows:
        print(
            f"   {threads:>7} {cache:5} {t['source']:>10.2f} s {t['shape']:>10.2f} s "
            f"{t['rule']:>9.2f} s {t['full']:>12.2f} s {t['get']:>9.2f} s"
        )
    print(
        "   (wall time to read every chunk from the source and check it: has_chunk without\n"
        "   content; has_chunk as it is, a full compare on a name's day; a full compare\n"
        "   every time; get_chunk, i.e. decode and re-hash)"
    )


def _verification_row(
    image: Path, chunks: list[Chunk], store: ChunkStore, rounds: int, threads: int, cache: str
) -> tuple[int, str, dict[str, float]] | None:
    def prepare() -> bool:
        if cache == "cold":
            return drop_caches()
        read_through(image)
        for c in chunks:
            store.chunk_path(c.name).read_bytes()
        return True

    times: dict[str, list[float]] = {k: [] for k in ("source", "shape", "rule", "full", "get")}
    for _ in range(rounds):
        for what in times:
            if not prepare():
                return None
            if what == "source":
                times[what].append(read_source(image, chunks, store.chunk_size, threads))
            else:
                times[what].append(read_and_check(image, chunks, store, threads, what))
    return threads, cache, {k: statistics.median(v) for k, v in times.items()}


# --- 2. put throughput ----------------------------------------------------------------


def put_now(store: ChunkStore, c: Chunk) -> None:
    store.put_chunk(c.name, c.payload, c.codec, c.length)


def put_with_writeback_start(store: ChunkStore, c: Chunk) -> None:
    """put_chunk's path with sync_file_range(WRITE) issued before the fdatasync."""
    path = store.chunk_path(c.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.replacing(path) as fd:
        fsutil.write_all(fd, [chunk_header(c.codec), c.payload])
        _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), 2)
    store._mark_dirty([path.parent, path.parent.parent])


def put_earlier_way(store: ChunkStore, c: Chunk) -> None:
    """The store before: no fsync, write-back started, rename; syncfs at the barrier."""
    path = store.chunk_path(c.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.replacing(path, durable=False) as fd:
        fsutil.write_all(fd, [chunk_header(c.codec), c.payload])
        _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), 2)


def syncfs(store: ChunkStore) -> None:
    fd = os.open(store.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


WAYS: dict[str, tuple[Callable[[ChunkStore, Chunk], None], Callable[[ChunkStore], None]]] = {
    "put_chunk now (fdatasync each, barrier fsyncs dirs)": (put_now, ChunkStore.sync),
    "  same + sync_file_range before fdatasync": (put_with_writeback_start, ChunkStore.sync),
    "earlier (no fsync, sync_file_range, barrier syncfs)": (put_earlier_way, syncfs),
}


def put_throughput(chunks: list[Chunk], rounds: int) -> None:
    stored = sum(len(c.payload) for c in chunks)
    print(f"\n2. put from {WRITERS} threads: {len(chunks)} chunks, {stored / MiB:.0f} MiB to write")
    print(f"   {'way':<52} seconds   MiB/s   barriers s  (runs)")
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in WAYS}
    for _ in range(rounds):
        # Interleaved, so no way always runs first on a fresh page cache or an idle disk.
        for label, (put, barrier) in WAYS.items():
            runs[label].append(_put_round(chunks, put, barrier))
    for label, times in runs.items():
        seconds = statistics.median(r[0] for r in times)
        barriers = statistics.median(r[1] for r in times)
        each = " ".join(f"{r[0]:.2f}" for r in times)
        print(
            f"   {label:<52} {seconds:>7.2f} {stored / MiB / seconds:>7.0f} {barriers:>12.2f}"
            f"  ({each})"
        )


def _put_round(
    chunks: list[Chunk],
    put: Callable[[ChunkStore, Chunk], None],
    barrier: Callable[[ChunkStore], None],
) -> tuple[float, float]:
    root = WORK / "puts"
    remove_tree(root)
    os.sync()
    store = ChunkStore(root)
    barrier_time = 0.0
    done = threading.Event()

    def barriers() -> None:
        nonlocal barrier_time
        while not done.wait(BARRIER_EVERY_S):
            started = time.perf_counter()
            barrier(store)
            barrier_time += time.perf_counter() - started

    ticker = threading.Thread(target=barriers)
    started = time.perf_counter()
    ticker.start()
    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(lambda c: put(store, c), chunks):
            pass
    done.set()
    ticker.join()
    last = time.perf_counter()
    barrier(store)
    ended = time.perf_counter()
    remove_tree(root)
    return ended - started, barrier_time + ended - last


# --- main -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep .bench/chunkstore")
    parser.add_argument("--only", choices=["verify", "put"], help="run one part only")
    args = parser.parse_args()
    image = WORK / "image.raw"
    spec = MixedImage(size=2 * GiB)
    counts = build_image(image, spec, seed=7)
    print(f"image: {spec.size / GiB:.0f} GiB, pieces {counts}, on {WORK}")
    remove_tree(WORK / "store")
    store = ChunkStore(WORK / "store")
    chunks = pack(image, allocated_chunks(image, store.chunk_size), store)
    for c in chunks:
        put_now(store, c)
    store.sync()
    try:
        if args.only != "put":
            verification(image, chunks, store, args.rounds)
        if args.only != "verify":
            put_throughput(chunks, args.rounds)
    finally:
        if not args.keep:
            remove_tree(WORK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
