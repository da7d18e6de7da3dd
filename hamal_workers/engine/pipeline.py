"""The data path of one disk sync: planned chunks in, stored chunks and a manifest out.

    reader threads (pre_disk_readers_count)          writer threads ([target] writers)
    read chunk -> zero? -> name -> stored? -> probe, zstd --[bounded queue]--> put_chunk
                     \\________________________________________________/
                                          results -> this thread: entries, progress, checkpoint

Naming (the target's hash) and compression run in the reader threads: blake3 and zstd
release the GIL, so they use every core; writers make each chunk durable as they store
it, so the barrier before a checkpoint only has directories left to flush. Raw chunks
live only in a fixed pool of reused buffers and the upload queue is bounded, so memory
depends on the reader count and the chunk size, never on the disk size. An entry is
recorded only after its chunk is stored, and the checkpoint is flushed only after the
target's durability barrier, so a checkpoint never names a chunk a crash could lose.

A target that keeps a disk as a disk (a raw replica) gives a DiskWriter instead: every
chunk read is named (for the manifest) and written at its offset by the reader thread,
zeros included, and nothing is looked up, compressed or put.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import zstandard

from hamal_workers.engine.extents import to_runs
from hamal_workers.engine.plan import ALLOCATED, DiskPlan
from hamal_workers.engine.reuse_fence import NoFence, ReuseFence
from hamal_workers.engine.throttle import Throttle
from hamal_workers.platforms.base import DiskReader
from hamal_workers.targets.base import CODEC_RAW, CODEC_ZSTD, DiskManifest, DiskWriter, Target

# Stored compressed only when that saves at least this much: raw chunks restore faster.
COMPRESS_WORTH = 0.95
ZSTD_LEVEL = 1
# Compressing a probe of the chunk first spares compressing random data whole, only to
# store it raw: three slices from its start, middle and end.
PROBE_SLICE = 16 * 1024
_POLL_S = 0.2


class EngineError(Exception):
    """A disk sync failed; the message names the disk, the chunk and the cause."""


class FlushTimeout(EngineError):
    """The durability barrier before a checkpoint took longer than fsync_timeout."""


@dataclass(frozen=True)
class EngineSettings:
    readers: int = 2
    writers: int = 4
    release_cpu_ms_per_mb: int = 0
    checkpoint_every_s: float = 3.0
    fsync_timeout_s: float = 0.0  # 0 = no limit
    progress_every_s: float = 1.0


class Checkpointer(Protocol):
    def load(self) -> dict[int, bytes | None]:
        """Entries already stored by an earlier delivery of this disk sync."""

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int
    ) -> None:
        """Add entries stored since the last save; called after a durability barrier.

        gc_ack: the garbage collection round these entries make safe (reuse_fence.py).
        """


class NoCheckpoint:
    def load(self) -> dict[int, bytes | None]:
        return {}

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int
    ) -> None:
        pass


@dataclass
class DiskResult:
    manifest: DiskManifest
    bytes_read: int = 0
    bytes_stored: int = 0
    chunks_read: int = 0
    chunks_new: int = 0
    chunks_zero: int = 0
    chunks_resumed: int = 0
    seconds: float = 0.0
    planned_chunks: int = 0
    mode: str = ""


@dataclass(frozen=True)
class _Stored:
    index: int
    digest: bytes | None
    read: int
    stored: int
    gc_round: int | None = None  # the fence round its decision was made under


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class _Upload:
    index: int
    digest: bytes
    payload: bytes | memoryview
    codec: int
    read: int
    buffer: bytearray | None  # back to the pool once written
    gc_round: int


class BufferPool:
    """Chunk buffers reused across reads: bounded memory, no page faults per chunk.

    Reader threads block here when every buffer is in flight, which is what bounds the
    raw data held by a disk sync to `size` chunks, whatever the number of writers.
    """

    def __init__(self, count: int, chunk_size: int) -> None:
        self._free: queue.Queue[bytearray] = queue.Queue()
        # Made when first needed: a disk of a few chunks never pays for the whole pool.
        self._unmade = count
        self._chunk_size = chunk_size
        self._lock = threading.Lock()

    def take(self, stop: threading.Event) -> bytearray | None:
        while not stop.is_set():
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                if self._unmade > 0:
                    self._unmade -= 1
                    return bytearray(self._chunk_size)
            try:
                return self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


@functools.cache
def _zeros(size: int) -> bytes:
    """A chunk of zeros to compare with, made once per chunk size and process."""
    return bytes(size)


def worth_compressing(compressor: zstandard.ZstdCompressor, data: memoryview) -> bool:
    length = len(data)
    if length <= 4 * PROBE_SLICE:
        return True
    middle = length // 2
    probe = b"".join((data[:PROBE_SLICE], data[middle : middle + PROBE_SLICE], data[-PROBE_SLICE:]))
    return len(compressor.compress(probe)) < len(probe) * COMPRESS_WORTH


def sync_disk(
    plan: DiskPlan,
    open_reader: Callable[[], DiskReader],
    target: Target,
    settings: EngineSettings,
    checkpoint: Checkpointer | None = None,
    check_lease: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] | None = None,
    after_flush: Callable[[], None] | None = None,
    fence: ReuseFence | None = None,
    disk_writer: DiskWriter | None = None,
) -> DiskResult:
    """Read the plan's chunks, store the new ones, and return the disk's manifest.

    `check_lease` raises when the task lost its right to write; it is called before
    every chunk write and every checkpoint, so a task that lost its lease stops writing.
    `after_flush` runs after each checkpoint (the fault suite's crash point). `fence`
    tells garbage collection which of its rounds the checkpoints cover (reuse_fence.py).
    `disk_writer`: the target's writer of a disk kept in place (Target.open_disk_writer).
    """
    return _DiskSync(
        plan,
        open_reader,
        target,
        settings,
        checkpoint or NoCheckpoint(),
        check_lease,
        progress,
        after_flush,
        fence or NoFence(),
        disk_writer,
    ).run()


class _DiskSync:
    def __init__(
        self,
        plan: DiskPlan,
        open_reader: Callable[[], DiskReader],
        target: Target,
        settings: EngineSettings,
        checkpoint: Checkpointer,
        check_lease: Callable[[], None],
        progress: Callable[[int, int], None] | None,
        after_flush: Callable[[], None] | None,
        fence: ReuseFence,
        disk_writer: DiskWriter | None = None,
    ) -> None:
        self.disk_writer = disk_writer
        self.after_flush = after_flush
        self.fence = fence
        self.plan = plan
        self.open_reader = open_reader
        self.target = target
        self.settings = settings
        self.checkpoint = checkpoint
        self.check_lease = check_lease
        self.progress = progress
        self.stop = threading.Event()
        self.results: queue.Queue[_Stored | _Failed] = queue.Queue()
        self.uploads: queue.Queue[_Upload | None] = queue.Queue(maxsize=max(1, settings.readers))
        self.zero = _zeros(plan.chunk_size)
        self._next_lock = threading.Lock()
        # Each reader holds one buffer while hashing and one may wait in the queue.
        self.pool = BufferPool(2 * max(1, settings.readers) + 1, plan.chunk_size)

    # --- orchestration ---------------------------------------------------------
    def run(self) -> DiskResult:
        started = time.monotonic()
        plan = self.plan
        entries = list(plan.initial)
        resumed = self.checkpoint.load()
        for index, digest in resumed.items():
            entries[index] = digest
        todo = [i for i in plan.to_read if i not in resumed]
        result = DiskResult(
            manifest=DiskManifest(plan.disk, plan.size, plan.chunk_size, entries),
            chunks_resumed=len(plan.to_read) - len(todo),
            planned_chunks=len(plan.to_read),
            mode=plan.mode,
        )
        self._todo: Iterator[int] = iter(todo)
        if self.disk_writer is not None and plan.mode == ALLOCATED:
            self._zero_unread()
        readers = [
            threading.Thread(target=self._reader, name=f"reader-{n}", daemon=True)
            for n in range(max(1, min(self.settings.readers, len(todo))))
        ]
        writers = [
            threading.Thread(target=self._writer, name=f"writer-{n}", daemon=True)
            for n in range(max(1, min(self.settings.writers, len(todo))))
        ]
        for t in readers + writers:
            t.start()
        try:
            self._collect(len(todo), entries, result)
        finally:
            self.stop.set()
            self._drain_uploads()
            for t in readers:
                t.join()
            for _ in writers:
                self.uploads.put(None)
            for t in writers:
                t.join()
        result.seconds = time.monotonic() - started
        return result

    def _collect(self, expected: int, entries: list[bytes | None], result: DiskResult) -> None:
        total = len(self.plan.to_read)
        done = result.chunks_resumed
        unsaved: dict[int, bytes | None] = {}
        next_flush = time.monotonic() + self.settings.checkpoint_every_s
        next_progress = 0.0
        received = 0
        while received < expected:
            try:
                item = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                item = None
            if isinstance(item, _Failed):
                raise item.error
            if item is not None:
                if item.gc_round is not None:
                    self.fence.leave(item.gc_round)
                received += 1
                done += 1
                entries[item.index] = item.digest
                unsaved[item.index] = item.digest
                result.bytes_read += item.read
                result.bytes_stored += item.stored
                result.chunks_read += 1
                result.chunks_new += item.stored > 0
                result.chunks_zero += item.digest is None
            now = time.monotonic()
            if now >= next_flush and unsaved:
                self._flush(unsaved, done, total)
                unsaved = {}
                next_flush = time.monotonic() + self.settings.checkpoint_every_s
            if self.progress and now >= next_progress:
                self.progress(self._done_bytes(done), self.plan.read_bytes_planned)
                next_progress = now + self.settings.progress_every_s
        if unsaved:
            self._flush(unsaved, done, total)
        if self.progress:
            self.progress(self.plan.read_bytes_planned, self.plan.read_bytes_planned)

    def _zero_unread(self) -> None:
        """An ALLOCATED plan says every chunk it does not read is zero: a replica that held
        something there before (an older generation, another disk) must read zeros too.

        Again on a resumed task: it is idempotent and touches no chunk the plan reads.
        """
        assert self.disk_writer is not None
        plan = self.plan
        read = set(plan.to_read)
        unread = [i for i in range(len(plan.initial)) if i not in read]
        for start, count in to_runs(unread):
            self.check_lease()
            offset = start * plan.chunk_size
            self.disk_writer.write_zeros(offset, min(count * plan.chunk_size, plan.size - offset))

    def _done_bytes(self, done_chunks: int) -> int:
        return min(done_chunks * self.plan.chunk_size, self.plan.read_bytes_planned)

    def _flush(self, unsaved: dict[int, bytes | None], done: int, total: int) -> None:
        """Durability barrier on the target, then the checkpoint: never the other way round."""
        self.check_lease()
        # Before the barrier, in this thread: every decision it does not count is in `unsaved`.
        gc_ack = self.fence.ack()
        timeout = self.settings.fsync_timeout_s
        if timeout > 0:
            barrier = threading.Thread(target=self.target.sync, name="flush", daemon=True)
            barrier.start()
            barrier.join(timeout)
            if barrier.is_alive():
                raise FlushTimeout(
                    f"disk {self.plan.disk}: flushing the target took more than "
                    f"{timeout:g} s ([data_sync_v2] fsync_timeout)"
                )
        else:
            self.target.sync()
        self.checkpoint.save(unsaved, done, total, gc_ack)
        if self.after_flush is not None:
            self.after_flush()

    def _drain_uploads(self) -> None:
        while True:
            try:
                self.uploads.get_nowait()
            except queue.Empty:
                return

    # --- threads ---------------------------------------------------------------
    def _next_index(self) -> int | None:
        with self._next_lock:
            return next(self._todo, None)

    def _reader(self) -> None:
        try:
            reader = self.open_reader()
        except BaseException as exc:  # noqa: BLE001 - handed to the collector
            self.results.put(_Failed(exc))
            return
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        throttle = Throttle(self.settings.release_cpu_ms_per_mb)
        try:
            while not self.stop.is_set():
                index = self._next_index()
                if index is None:
                    return
                buf = self.pool.take(self.stop)
                if buf is None:
                    return
                upload = self._process(index, buf, reader, compressor, throttle)
                if upload is None:
                    self.pool.give(buf)
                else:
                    if upload.buffer is None:
                        self.pool.give(buf)
                    self._put_upload(upload)
        except BaseException as exc:  # noqa: BLE001 - handed to the collector
            self.results.put(_Failed(exc))
        finally:
            reader.close()

    def _process(
        self,
        index: int,
        buf: bytearray,
        reader: DiskReader,
        compressor: zstandard.ZstdCompressor,
        throttle: Throttle,
    ) -> _Upload | None:
        """Read, recognise, hash and pack one chunk; None when nothing needs writing."""
        plan = self.plan
        offset = index * plan.chunk_size
        length = min(plan.chunk_size, plan.size - offset)
        data = memoryview(buf)[:length]
        got = reader.readinto(offset, data)
        if got != length:
            raise EngineError(
                f"disk {plan.disk}: short read at offset {offset}: {got} of {length} bytes"
            )
        throttle.after_read(length)
        # bytearray == bytes is a memcmp; a memoryview comparison is ten times slower.
        zero = buf == self.zero if length == plan.chunk_size else data == self.zero[:length]
        if self.disk_writer is not None:
            self._write_in_place(index, offset, data, zero)
            return None
        if zero:
            self.results.put(_Stored(index, None, length, 0))
            return None
        name = self.target.chunk_name(data)
        # From here until the collector has the entry, the chunk may be one that garbage
        # collection is condemning: counted in flight, so no checkpoint claims otherwise.
        gc_round = self.fence.enter()
        # Never existence for content: the store checks what it holds against `data`.
        if self.target.has_chunk(name, length, data):
            self.results.put(_Stored(index, name, length, 0, gc_round))
            return None
        if worth_compressing(compressor, data):
            packed = compressor.compress(data)
            if len(packed) < length * COMPRESS_WORTH:
                return _Upload(index, name, packed, CODEC_ZSTD, length, None, gc_round)
        return _Upload(index, name, data, CODEC_RAW, length, buf, gc_round)

    def _write_in_place(self, index: int, offset: int, data: memoryview, zero: bool) -> None:
        """The chunk at its place in the replica, named so the manifest can be checked."""
        assert self.disk_writer is not None
        name = None if zero else self.target.chunk_name(data)
        self.check_lease()
        if zero:
            self.disk_writer.write_zeros(offset, len(data))
        else:
            self.disk_writer.write(offset, data)
        self.results.put(_Stored(index, name, len(data), 0 if zero else len(data)))

    def _put_upload(self, upload: _Upload) -> None:
        while not self.stop.is_set():
            try:
                self.uploads.put(upload, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _writer(self) -> None:
        while True:
            upload = self.uploads.get()
            if upload is None:
                return
            if self.stop.is_set():
                continue
            try:
                self.check_lease()
                stored = self.target.put_chunk(
                    upload.digest, upload.payload, upload.codec, upload.read
                )
                self.results.put(
                    _Stored(upload.index, upload.digest, upload.read, stored, upload.gc_round)
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the collector
                self.results.put(_Failed(exc))
            finally:
                if upload.buffer is not None:
                    self.pool.give(upload.buffer)
