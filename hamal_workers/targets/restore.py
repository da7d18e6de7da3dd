"""Restore a disk of a restore point to a sparse image; find damaged chunks; repair them.

All three work on any Target. Chunks are fetched and decoded in a small thread pool
(zstd and blake3 release the GIL) with at most MAX_IN_FLIGHT chunks held at once, so
memory stays bounded whatever the size of the disk.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import zstandard

from hamal_workers import fsutil
from hamal_workers.targets.base import (
    CODEC_RAW,
    CODEC_ZSTD,
    BrokenPoint,
    CorruptChunk,
    DiskManifest,
    MissingChunk,
    MissingPoint,
    PointInfo,
    Target,
    TargetError,
)

MAX_IN_FLIGHT = 8
DEFAULT_WORKERS = 4
# How many places that use a damaged chunk repair reads from the source before it gives up.
MAX_REPAIR_READS = 16

Progress = Callable[[int, int], None]
ReadContent = Callable[[str, str, int], bytes | None]
_Key = TypeVar("_Key")
_Job = TypeVar("_Job")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class RestoreResult:
    bytes_written: int  # bytes of chunk data written; holes are not counted
    chunks: int  # entries restored from a stored chunk
    zero_chunks: int  # entries left as holes
    seconds: float


# --- restore --------------------------------------------------------------------------


def restore_disk(
    target: Target,
    vm_id: str,
    point_id: str,
    disk: str,
    out_path: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
    workers: int = DEFAULT_WORKERS,
) -> RestoreResult:
    """Write the disk as a sparse regular file at out_path; progress(done, total) in bytes.

    The image is built in a new file under a random temporary name beside out_path
    (created exclusively, through no link, mode 0600), fsynced, and renamed into place,
    so out_path is either the whole disk or untouched and nothing planted beside it is
    ever written through. On any error that file is removed and the error raised; a bad
    chunk's message names the VM, point, disk, chunk index, offset and digest.
    """
    started = time.monotonic()
    out = Path(out_path)
    _check_destination(out, overwrite)
    manifest = target.manifest(vm_id, point_id, disk)
    where = f"VM {vm_id} point {point_id} disk {disk}"

    def read(index: int, name: bytes) -> bytes:
        return target.read_entry(vm_id, point_id, disk, index, name)

    # 0600: a disk image holds whatever the VM held.
    with fsutil.replacing(out, mode=0o600) as fd:
        written, chunks = _write_image(read, manifest, fd, where, progress, workers)
    fsutil.fsync_dir(out.parent)
    if progress is not None:
        progress(manifest.size, manifest.size)
    return RestoreResult(
        bytes_written=written,
        chunks=chunks,
        zero_chunks=manifest.chunk_count - chunks,
        seconds=time.monotonic() - started,
    )


def _check_destination(out: Path, overwrite: bool) -> None:
    try:
        st = out.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        # Renaming over a device node or directory would not write into it: it would lose it.
        raise FileExistsError(f"{out} exists and is not a regular file; refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"{out} exists; overwrite it explicitly (--force) to replace it")


def _write_image(
    read: Callable[[int, bytes], bytes],
    manifest: DiskManifest,
    fd: int,
    where: str,
    progress: Progress | None,
    workers: int,
) -> tuple[int, int]:
    # Sized first: every entry not written below stays a hole that reads as zeros.
    os.ftruncate(fd, manifest.size)
    with fsutil.UncachedWriter(fd) as writer:
        return _write_chunks(read, manifest, writer, where, progress, workers)


def _write_chunks(
    read: Callable[[int, bytes], bytes],
    manifest: DiskManifest,
    writer: fsutil.UncachedWriter,
    where: str,
    progress: Progress | None,
    workers: int,
) -> tuple[int, int]:
    size, chunk_size = manifest.size, manifest.chunk_size

    def restore_chunk(index: int, name: bytes) -> int:
        # In the pool: fetch, check and write at its place, around the page cache where
        # the filesystem allows (else starting its write-back), so the final fsync finds
        # little left to do and writes overlap decoding.
        offset = index * chunk_size
        span = min(chunk_size, size - offset)
        try:
            data = read(index, name)
        except (MissingChunk, CorruptChunk) as exc:
            raise type(exc)(
                f"{where}: chunk {index} at offset {offset}, digest {name.hex()}: {exc}"
            ) from exc
        if len(data) < span:
            raise CorruptChunk(
                f"{where}: chunk {index} at offset {offset}, digest {name.hex()}: "
                f"holds {len(data)} bytes, the disk needs {span} there"
            )
        # A stored last chunk may be padded to chunk_size: only the disk's bytes are written.
        writer.pwrite(memoryview(data)[:span], offset)
        if not writer.direct:
            fsutil.start_writeback(writer.fd, offset, span)
        return span

    entries = ((i, (i, d)) for i, d in enumerate(manifest.entries) if d is not None)
    written = chunks = 0
    done = _in_order(entries, lambda job: restore_chunk(*job), workers)
    with contextlib.closing(done):
        for index, future in done:
            span = future.result()
            written += span
            chunks += 1
            if progress is not None:
                progress(index * chunk_size + span, size)
    return written, chunks


def _in_order(
    jobs: Iterable[tuple[_Key, _Job]], work: Callable[[_Job], _Out], workers: int
) -> Iterator[tuple[_Key, Future[_Out]]]:
    """work(job) in a pool, results in submission order, at most MAX_IN_FLIGHT at a time."""
    pending: deque[tuple[_Key, Future[_Out]]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hamal-chunk")
    try:
        for key, job in jobs:
            pending.append((key, pool.submit(work, job)))
            if len(pending) >= MAX_IN_FLIGHT:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        # Reached on errors too (the consumer stops iterating): drop what is not started.
        pool.shutdown(wait=True, cancel_futures=True)


# --- verify ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkUse:
    """One manifest entry that names a chunk."""

    vm_id: str
    point_id: str
    disk: str
    index: int


@dataclass(frozen=True)
class DamagedChunk:
    """A chunk that is missing, corrupt or too short, and every entry that uses it."""

    name: bytes
    problem: str
    uses: list[ChunkUse]


@dataclass(frozen=True)
class ChunkCheck:
    """What find_damaged_chunks found."""

    points: list[PointInfo]  # the readable points it checked, oldest first
    # Points whose record or a manifest cannot be read (problem says which disk).
    broken: list[BrokenPoint]
    damaged: list[DamagedChunk]  # in the order of their first use
    chunks: int  # distinct chunks read (every entry, where entries are places)
    # Points whose data the target no longer holds (a replica's older generations), and why:
    # not checked, and not counted as bad.
    unheld: list[tuple[PointInfo, str]] = field(default_factory=list)

    def bad_points(self) -> set[tuple[str, str]]:
        """(vm_id, point_id) of every point that cannot be restored whole."""
        bad = {(b.vm_id, b.point_id) for b in self.broken}
        bad.update((u.vm_id, u.point_id) for d in self.damaged for u in d.uses)
        return bad


def find_damaged_chunks(
    target: Target,
    vm_id: str | None = None,
    point_id: str | None = None,
    progress: Progress | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
) -> ChunkCheck:
    """Check the committed points of one VM (or every VM, or one point) chunk by chunk.

    Reads every point record and manifest, then reads, decodes and re-hashes each distinct
    chunk once (progress(done, total) counts them). Only when some chunk is damaged are
    the manifests read a second time, to list the entries that use it. Memory is bounded
    by the number of distinct chunks, not by the number of entries or points.
    MissingPoint when point_id names no point of the VM.
    """
    points, broken = _points_to_check(target, vm_id, point_id)
    verdicts = [(p, target.why_unrestorable(p)) for p in points]
    unheld = [(p, why) for p, why in verdicts if why]
    points = [p for p, why in verdicts if not why]
    if target.entries_are_places:
        damaged, read = _check_places(target, points, broken, progress, workers)
        return ChunkCheck(points, broken, damaged, read, unheld)
    needs: dict[bytes, int] = {}
    for info in points:
        for manifest in _manifests(target, info):
            if isinstance(manifest, BrokenPoint):
                broken.append(manifest)
            else:
                _collect_needs(manifest, needs)
    problems = _chunk_problems(target, needs, progress, workers)
    damaged = _with_uses(target, points, problems) if problems else []
    return ChunkCheck(points, broken, damaged, len(needs), unheld)


def verify_point(
    target: Target,
    vm_id: str,
    point_id: str,
    progress: Progress | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
) -> list[str]:
    """Every problem of one committed point, one line each; an empty list means it is good.

    A damaged chunk is one line naming its first use; MissingPoint if there is no point.
    """
    check = find_damaged_chunks(target, vm_id, point_id, progress, workers=workers)
    lines = [f"VM {b.vm_id} point {b.point_id}: {b.problem}" for b in check.broken]
    for chunk in check.damaged:
        first = chunk.uses[0]
        others = len(chunk.uses) - 1
        also = f"; {others} other entries use it too" if others else ""
        lines.append(
            f"VM {first.vm_id} point {first.point_id} disk {first.disk} chunk {first.index} "
            f"digest {chunk.name.hex()}: {chunk.problem}{also}"
        )
    return lines


def _points_to_check(
    target: Target, vm_id: str | None, point_id: str | None
) -> tuple[list[PointInfo], list[BrokenPoint]]:
    scan = target.scan_points(vm_id)
    if point_id is None:
        return scan.points, list(scan.broken)
    points = [p for p in scan.points if p.point_id == point_id]
    broken = [b for b in scan.broken if b.point_id == point_id]
    if not points and not broken:
        raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")
    return points, broken


def _manifests(target: Target, info: PointInfo) -> Iterator[DiskManifest | BrokenPoint]:
    """Each disk's manifest in turn, or a BrokenPoint saying why it cannot be used."""
    for disk in sorted(info.disks):
        try:
            manifest = target.manifest(info.vm_id, info.point_id, disk)
        except TargetError as exc:
            yield BrokenPoint(info.vm_id, info.point_id, f"disk {disk}: {exc}")
            continue
        if manifest.size != info.disks[disk]:
            yield BrokenPoint(
                info.vm_id,
                info.point_id,
                f"disk {disk}: the manifest says {manifest.size} bytes, "
                f"the point record {info.disks[disk]}",
            )
            continue
        yield manifest


def _check_places(
    target: Target,
    points: list[PointInfo],
    broken: list[BrokenPoint],
    progress: Progress | None,
    workers: int,
) -> tuple[list[DamagedChunk], int]:
    """Every entry read at its own place and checked against its name (a raw replica).

    Manifests are read twice, a first time to count and report the broken ones, so that
    memory holds one manifest at a time whatever the number of points.
    """
    readable: list[tuple[PointInfo, str]] = []
    total = 0
    for info in points:
        for manifest in _manifests(target, info):
            if isinstance(manifest, BrokenPoint):
                broken.append(manifest)
            else:
                readable.append((info, manifest.disk))
                total += sum(1 for d in manifest.entries if d is not None)

    def jobs() -> Iterator[tuple[tuple[ChunkUse, bytes], tuple[ChunkUse, bytes]]]:
        for info, disk in readable:
            manifest = target.manifest(info.vm_id, info.point_id, disk)
            for index, name in enumerate(manifest.entries):
                if name is not None:
                    job = (ChunkUse(info.vm_id, info.point_id, disk, index), name)
                    yield job, job

    def check(job: tuple[ChunkUse, bytes]) -> bytes:
        use, name = job
        return target.read_entry(use.vm_id, use.point_id, use.disk, use.index, name)

    damaged: dict[bytes, DamagedChunk] = {}
    read = 0
    checked = _in_order(jobs(), check, workers)
    with contextlib.closing(checked):
        for (use, name), future in checked:
            read += 1
            problem = _chunk_problem(future, 0)
            if problem:
                damaged.setdefault(name, DamagedChunk(name, problem, [])).uses.append(use)
            if progress is not None:
                progress(read, total)
    return list(damaged.values()), read


def _collect_needs(manifest: DiskManifest, needs: dict[bytes, int]) -> None:
    """For each chunk, the most bytes any entry using it needs (short only at a disk's end)."""
    for index, digest in enumerate(manifest.entries):
        if digest is not None:
            need = min(manifest.chunk_size, manifest.size - index * manifest.chunk_size)
            if needs.get(digest, 0) < need:
                needs[digest] = need


def _chunk_problems(
    target: Target, needs: dict[bytes, int], progress: Progress | None, workers: int
) -> dict[bytes, str]:
    problems = {}
    total = len(needs)
    fetched = _in_order(((d, d) for d in needs), target.get_chunk, workers)
    with contextlib.closing(fetched):
        for done, (digest, future) in enumerate(fetched, start=1):
            problem = _chunk_problem(future, needs[digest])
            if problem:
                problems[digest] = problem
            if progress is not None:
                progress(done, total)
    return problems


def _chunk_problem(future: Future[bytes], need: int) -> str:
    try:
        data = future.result()
    except TargetError as exc:
        return str(exc)
    if len(data) < need:
        return f"holds {len(data)} bytes, the disk needs {need} there"
    return ""


def _with_uses(
    target: Target, points: list[PointInfo], problems: dict[bytes, str]
) -> list[DamagedChunk]:
    uses: dict[bytes, list[ChunkUse]] = {}
    for info in points:
        for manifest in _manifests(target, info):
            if isinstance(manifest, BrokenPoint):
                continue  # reported by the first pass
            for index, digest in enumerate(manifest.entries):
                if digest is not None and digest in problems:
                    use = ChunkUse(info.vm_id, info.point_id, manifest.disk, index)
                    uses.setdefault(digest, []).append(use)
    return [DamagedChunk(name, problems[name], found) for name, found in uses.items()]


# --- repair ---------------------------------------------------------------------------


@dataclass
class RepairResult:
    repaired: list[bytes] = field(default_factory=list)  # names stored again
    unrepaired: list[tuple[bytes, str]] = field(default_factory=list)  # name, why not


def repair_chunks(
    target: Target, damaged: Iterable[DamagedChunk], read_content: ReadContent
) -> RepairResult:
    """Store damaged chunks again from the current source where it still holds them.

    read_content(vm_id, disk, index) returns the source's current bytes for that chunk
    (None if it cannot tell). A chunk is stored again only when those bytes carry its
    name (target.chunk_name); newer points' places are tried first, at most
    MAX_REPAIR_READS per chunk. The rest are reported with the reason.
    """
    result = RepairResult()
    for chunk in damaged:
        why = _repair_one(target, chunk, read_content)
        if why is None:
            result.repaired.append(chunk.name)
        else:
            result.unrepaired.append((chunk.name, why))
    return result


def _repair_one(target: Target, chunk: DamagedChunk, read_content: ReadContent) -> str | None:
    places = list(dict.fromkeys((u.vm_id, u.disk, u.index) for u in reversed(chunk.uses)))
    tried = places[:MAX_REPAIR_READS]
    for vm_id, disk, index in tried:
        data = read_content(vm_id, disk, index)
        if data is not None and target.chunk_name(data) == chunk.name:
            _store_again(target, chunk.name, data)
            return None
    if not tried:
        return "no entry uses it"
    return f"the source no longer holds it (read {len(tried)} of {len(places)} places)"


def _store_again(target: Target, name: bytes, data: bytes) -> None:
    with contextlib.suppress(MissingChunk, CorruptChunk):
        target.get_chunk(name)
        return  # stored again meanwhile (a sync found it damaged and put it)
    target.quarantine_chunk(name, "found damaged by verify, stored again from the source")
    packed = zstandard.ZstdCompressor(level=1).compress(data)
    if len(packed) < len(data):
        target.put_chunk(name, packed, CODEC_ZSTD, len(data))
    else:
        target.put_chunk(name, data, CODEC_RAW, len(data))
