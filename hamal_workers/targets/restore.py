"""Restore a disk of a restore point to a sparse image, and verify a point end to end.

Both work on any Target. Chunks are fetched and decoded in a small thread pool (zstd and
blake3 release the GIL) with at most MAX_IN_FLIGHT chunks held at once, so memory stays
bounded whatever the size of the disk.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hamal_workers import fsutil
from hamal_workers.targets.base import (
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

Progress = Callable[[int, int], None]
_Key = TypeVar("_Key")


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
    # 0600: a disk image holds whatever the VM held.
    with fsutil.replacing(out, mode=0o600) as fd:
        written, chunks = _write_image(target, manifest, fd, where, progress, workers)
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
    target: Target,
    manifest: DiskManifest,
    fd: int,
    where: str,
    progress: Progress | None,
    workers: int,
) -> tuple[int, int]:
    # Sized first: every entry not written below stays a hole that reads as zeros.
    os.ftruncate(fd, manifest.size)
    fetched = _fetch_in_order(
        target, ((i, d) for i, d in enumerate(manifest.entries) if d is not None), workers
    )
    with contextlib.closing(fetched):
        return _write_chunks(fd, manifest, fetched, where, progress)


def _write_chunks(
    fd: int,
    manifest: DiskManifest,
    fetched: Iterator[tuple[int, bytes, Future[bytes]]],
    where: str,
    progress: Progress | None,
) -> tuple[int, int]:
    size, chunk_size = manifest.size, manifest.chunk_size
    written = chunks = 0
    for index, digest, future in fetched:
        offset = index * chunk_size
        span = min(chunk_size, size - offset)
        data = _chunk_result(future, where, index, offset, digest)
        if len(data) < span:
            raise CorruptChunk(
                f"{where}: chunk {index} at offset {offset}, digest {digest.hex()}: "
                f"holds {len(data)} bytes, the disk needs {span} there"
            )
        # A stored last chunk may be padded to chunk_size: only the disk's bytes are written.
        _pwrite_all(fd, memoryview(data)[:span], offset)
        written += span
        chunks += 1
        if progress is not None:
            progress(offset + span, size)
    return written, chunks


def _chunk_result(
    future: Future[bytes], where: str, index: int, offset: int, digest: bytes
) -> bytes:
    try:
        return future.result()
    except (MissingChunk, CorruptChunk) as exc:
        raise type(exc)(
            f"{where}: chunk {index} at offset {offset}, digest {digest.hex()}: {exc}"
        ) from exc


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _fetch_in_order(
    target: Target, digests: Iterable[tuple[_Key, bytes]], workers: int
) -> Iterator[tuple[_Key, bytes, Future[bytes]]]:
    """get_chunk in a pool, results in submission order, at most MAX_IN_FLIGHT at a time."""
    pending: deque[tuple[_Key, bytes, Future[bytes]]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hamal-chunk")
    try:
        for key, digest in digests:
            pending.append((key, digest, pool.submit(target.get_chunk, digest)))
            if len(pending) >= MAX_IN_FLIGHT:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        # Reached on errors too (the consumer stops iterating): drop what is not started.
        pool.shutdown(wait=True, cancel_futures=True)


# --- verify ---------------------------------------------------------------------------


@dataclass
class _FirstUse:
    """Where a distinct chunk is first used, and what the point needs of it."""

    disk: str
    index: int
    offset: int
    need: int  # the most bytes any entry using it needs
    uses: int = 1


def verify_point(
    target: Target,
    vm_id: str,
    point_id: str,
    progress: Progress | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
) -> list[str]:
    """Every problem of a committed point, one line each; an empty list means it is good.

    Reads the point record and every manifest, then re-reads and re-hashes each distinct
    chunk once. progress(done, total) counts distinct chunks. MissingPoint if the point
    does not exist at all.
    """
    info, problems = _point_or_problem(target, vm_id, point_id)
    if info is None:
        return problems
    uses: dict[bytes, _FirstUse] = {}
    for disk in sorted(info.disks):
        manifest, problem = _manifest_or_problem(target, info, disk)
        if manifest is None:
            problems.append(problem)
            continue
        _collect_uses(manifest, uses)
    problems.extend(_check_chunks(target, info, uses, progress, workers))
    return problems


def _point_or_problem(
    target: Target, vm_id: str, point_id: str
) -> tuple[PointInfo | None, list[str]]:
    scan = target.scan_points(vm_id)
    for broken in scan.broken:
        if broken.point_id == point_id:
            return None, [f"VM {vm_id} point {point_id}: {broken.problem}"]
    for info in scan.points:
        if info.point_id == point_id:
            return info, []
    raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")


def _manifest_or_problem(
    target: Target, info: PointInfo, disk: str
) -> tuple[DiskManifest | None, str]:
    where = f"VM {info.vm_id} point {info.point_id} disk {disk}"
    try:
        manifest = target.manifest(info.vm_id, info.point_id, disk)
    except TargetError as exc:
        return None, f"{where}: {exc}"
    if manifest.size != info.disks[disk]:
        return None, (
            f"{where}: the manifest says {manifest.size} bytes, the point record {info.disks[disk]}"
        )
    return manifest, ""


def _collect_uses(manifest: DiskManifest, uses: dict[bytes, _FirstUse]) -> None:
    for index, digest in enumerate(manifest.entries):
        if digest is None:
            continue
        offset = index * manifest.chunk_size
        need = min(manifest.chunk_size, manifest.size - offset)
        first = uses.get(digest)
        if first is None:
            uses[digest] = _FirstUse(manifest.disk, index, offset, need)
        else:
            first.uses += 1
            first.need = max(first.need, need)


def _check_chunks(
    target: Target,
    info: PointInfo,
    uses: dict[bytes, _FirstUse],
    progress: Progress | None,
    workers: int,
) -> list[str]:
    problems = []
    total = len(uses)
    fetched = _fetch_in_order(target, ((d, d) for d in uses), workers)
    with contextlib.closing(fetched):
        for done, (digest, _, future) in enumerate(fetched, start=1):
            first = uses[digest]
            problem = _chunk_problem(future, first)
            if problem:
                also = f"; {first.uses - 1} other entries use it too" if first.uses > 1 else ""
                problems.append(
                    f"VM {info.vm_id} point {info.point_id} disk {first.disk} chunk {first.index} "
                    f"(offset {first.offset}) digest {digest.hex()}: {problem}{also}"
                )
            if progress is not None:
                progress(done, total)
    return problems


def _chunk_problem(future: Future[bytes], first: _FirstUse) -> str:
    try:
        data = future.result()
    except TargetError as exc:
        return str(exc)
    if len(data) < first.need:
        return f"holds {len(data)} bytes, the disk needs {first.need} there"
    return ""
