"""The content-addressed chunk store on a filesystem: the embedded default target.

Layout (docs/FORMAT.md is the reference):

    format.json                                   what this directory is, and its version
    chunks/ab/cd/<64 hex>                         b"HMC1" | codec byte | payload
    staging/<vm_id>/<point_id>/<disk>.manifest    disks of a point not committed yet
    points/<vm_id>/<point_id>/point.json          a committed point ...
    points/<vm_id>/<point_id>/<disk>.manifest     ... and its disks

Every file is written under a temporary dot-name in its own directory and renamed into
place, so a reader sees a whole file or none. A point becomes visible by renaming its
staging directory into points/, which is atomic: a point exists iff that directory with
its point.json exists. Names that come from users' systems (VM ids, point ids, disk
names) are percent-encoded so that none can leave its directory or collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import string
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import zstandard

from hamal_workers.targets.base import (
    CHUNK_SIZE,
    CODEC_RAW,
    CODEC_ZSTD,
    DIGEST_SIZE,
    BrokenPoint,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    MissingChunk,
    MissingPoint,
    PointInfo,
    PointScan,
    Target,
    TargetError,
)
from hamal_workers.targets.manifest_format import decode_manifest, encode_manifest

STORE_FORMAT = "hamal-chunkstore"
STORE_VERSION = 1
POINT_VERSION = 1
HASH_NAME = "blake3"
CHUNK_MAGIC = b"HMC1"

FORMAT_FILE = "format.json"
POINT_FILE = "point.json"
MANIFEST_SUFFIX = ".manifest"

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 * 1024 * 1024

_CHUNK_HEADER = len(CHUNK_MAGIC) + 1
_CODECS = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}
_SAFE_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
# Room for ".manifest" and the temporary-name decorations within NAME_MAX (255).
_MAX_ENCODED_NAME = 200
# Every temporary file and trash directory matches this, and no real entry can: encoded
# names never start with a dot and chunk names are hex.
_TEMPORARY = re.compile(r"^\..+\.(tmp|deleted|discarded)\.[0-9a-f]{16}$")
# Entries that may sit in a fresh volume's root without it being "somebody else's data".
_IGNORED_IN_EMPTY_ROOT = {"lost+found"}


# --- names --------------------------------------------------------------------------


def encode_name(name: str) -> str:
    """A file name for a VM id, point id or disk name: reversible, safe, never dot-led."""
    if not isinstance(name, str) or not name:
        raise TargetError(f"invalid name {name!r}: names must be non-empty strings")
    parts = []
    for i, char in enumerate(name):
        if char in _SAFE_CHARS and not (i == 0 and char == "."):
            parts.append(char)
        else:
            try:
                raw = char.encode("utf-8")
            except UnicodeEncodeError:
                raise TargetError(f"invalid name {name!r}: not valid unicode") from None
            parts.append("".join(f"%{b:02X}" for b in raw))
    encoded = "".join(parts)
    if len(encoded) > _MAX_ENCODED_NAME:
        raise TargetError(f"name too long to store ({len(encoded)} bytes encoded): {name[:60]!r}…")
    return encoded


def decode_name(encoded: str) -> str | None:
    """The name a file name stands for, or None if it is not one encode_name makes."""
    try:
        raw = bytearray()
        i = 0
        while i < len(encoded):
            if encoded[i] == "%":
                raw.append(int(encoded[i + 1 : i + 3], 16))
                i += 3
            else:
                raw.extend(encoded[i].encode("ascii"))
                i += 1
        name = raw.decode("utf-8")
        # Only the canonical spelling counts, so one name never has two directories.
        canonical = bool(name) and encode_name(name) == encoded
    except (ValueError, UnicodeError, TargetError):
        return None
    return name if canonical else None


# --- files ----------------------------------------------------------------------------


def _temporary_name(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{kind}.{secrets.token_hex(8)}"


def _write_file(path: Path, parts: Iterable[bytes | memoryview], *, durable: bool) -> int:
    """Write under a temporary name, then rename over `path`: readers never see half a file."""
    tmp = _temporary_name(path)
    try:
        written = _write_new(tmp, parts, durable=durable)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return written


def _write_new(path: Path, parts: Iterable[bytes | memoryview], *, durable: bool) -> int:
    written = 0
    # Disk images hold whatever the VMs hold: not readable by other users.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with open(fd, "wb") as out:
        for part in parts:
            written += out.write(part)
        out.flush()
        if durable:
            os.fsync(out.fileno())
        else:
            _start_writeback(out.fileno())
    return written


_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _start_writeback(fd: int) -> None:
    """Start writing a chunk to disk now, without waiting for it.

    The durability barrier before each checkpoint (syncfs) then finds most data already
    on its way instead of all of it at once: the write-back overlaps reading and hashing.
    """
    fn = getattr(_libc, "sync_file_range", None)
    if fn is not None:
        fn(
            ctypes.c_int(fd),
            ctypes.c_int64(0),
            ctypes.c_int64(0),
            ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
        )


def _fsync_dir(path: Path) -> None:
    """Make renames in `path` durable; some filesystems cannot fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


_syncfs_fn: Any = None
_syncfs_lock = threading.Lock()


def _syncfs(fd: int, where: Path) -> None:
    """syncfs(2) on the filesystem of `fd`: flushes only that filesystem, unlike sync(2)."""
    global _syncfs_fn
    with _syncfs_lock:
        if _syncfs_fn is None:
            libc = ctypes.CDLL(None, use_errno=True)
            _syncfs_fn = getattr(libc, "syncfs", False)
    if not _syncfs_fn:
        os.sync()
        return
    if _syncfs_fn(fd) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            os.sync()
            return
        # Since Linux 5.8 syncfs reports writeback errors: data written earlier is lost.
        raise TargetError(
            f"syncfs on {where} failed: {os.strerror(err)}; recent writes may be lost"
        )


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _digest_hex(digest: bytes) -> str:
    if not isinstance(digest, bytes | bytearray) or len(digest) != DIGEST_SIZE:
        raise ValueError(f"a chunk digest is {DIGEST_SIZE} bytes, got {digest!r:.80}")
    return bytes(digest).hex()


# --- the store ------------------------------------------------------------------------


class ChunkStore(Target):
    """A chunk store rooted at a directory; safe to share between processes and hosts."""

    def __init__(
        self, root: str | os.PathLike[str], *, chunk_size: int | None = None, create: bool = True
    ) -> None:
        """Open the store at `root`, creating it if the directory is missing or empty.

        chunk_size only matters for a new store (default CHUNK_SIZE); an existing store
        keeps its own, and asking for a different one is an error. With create=False a
        missing store is an error instead (read-only commands use that, so a typo in a path
        does not silently make an empty store).
        """
        self.root = Path(root)
        fmt = self._open_format(chunk_size, create)
        self.chunk_size = int(fmt["chunk_size"])
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.root)!r})"

    # --- format.json -------------------------------------------------------------------
    def _open_format(self, chunk_size: int | None, create: bool) -> dict[str, Any]:
        path = self.root / FORMAT_FILE
        if not path.exists():
            if not create:
                raise TargetError(f"no chunk store at {self.root} ({FORMAT_FILE} is missing)")
            self._create(chunk_size if chunk_size is not None else CHUNK_SIZE)
        fmt = self._read_format(path)
        if chunk_size is not None and chunk_size != fmt["chunk_size"]:
            raise TargetError(
                f"chunk store {self.root} uses chunks of {fmt['chunk_size']} bytes, "
                f"not {chunk_size}"
            )
        for sub in ("chunks", "staging", "points"):
            (self.root / sub).mkdir(exist_ok=True)
        return fmt

    def _create(self, chunk_size: int) -> None:
        _check_chunk_size(chunk_size, f"new chunk store {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        foreign = [
            n
            for n in _listdir(self.root)
            if n not in _IGNORED_IN_EMPTY_ROOT and not _TEMPORARY.match(n)
        ]
        if foreign:
            raise TargetError(
                f"{self.root} is not empty and has no {FORMAT_FILE}: it is not a hamal chunk "
                f"store (found {', '.join(foreign[:5])}); refusing to write into it"
            )
        fmt = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "chunk_size": chunk_size,
            "hash": HASH_NAME,
            "codecs": {str(k): v for k, v in _CODECS.items()},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = self.root / FORMAT_FILE
        tmp = _temporary_name(path)
        try:
            _write_new(tmp, [json.dumps(fmt, indent=2).encode() + b"\n"], durable=True)
            # link, not rename: when two workers create the store at once, the first wins
            # and the second adopts its format instead of replacing it.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        _fsync_dir(self.root)

    def _read_format(self, path: Path) -> dict[str, Any]:
        try:
            fmt = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TargetError(f"cannot read chunk store format {path}: {exc}") from None
        if not isinstance(fmt, dict) or fmt.get("format") != STORE_FORMAT:
            raise TargetError(f"{path}: not a hamal chunk store (format is not {STORE_FORMAT!r})")
        version = fmt.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise TargetError(f"{path}: chunk store version {version!r} is not a number")
        if version > STORE_VERSION:
            raise TargetError(
                f"{path}: chunk store format version {version} is newer than this reader "
                f"({STORE_VERSION}); upgrade hamal to use this store"
            )
        if version != STORE_VERSION:
            raise TargetError(f"{path}: unknown chunk store format version {version}")
        if fmt.get("hash") != HASH_NAME:
            raise TargetError(f"{path}: unknown hash {fmt.get('hash')!r} (this reader: blake3)")
        _check_chunk_size(fmt.get("chunk_size"), str(path))
        return fmt

    # --- chunks ------------------------------------------------------------------------
    def chunk_path(self, digest: bytes) -> Path:
        hexd = _digest_hex(digest)
        return self.root / "chunks" / hexd[:2] / hexd[2:4] / hexd

    def has_chunk(self, digest: bytes) -> bool:
        return self.chunk_path(digest).exists()

    def put_chunk(self, digest: bytes, payload: bytes | memoryview, codec: int) -> int:
        if codec not in _CODECS:
            raise ValueError(f"unknown chunk codec {codec}")
        path = self.chunk_path(digest)
        if path.exists():
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not fsynced one by one: the engine calls sync() before it records progress.
        return _write_file(path, [CHUNK_MAGIC + bytes([codec]), payload], durable=False)

    def get_chunk(self, digest: bytes) -> bytes:
        path = self.chunk_path(digest)
        hexd = path.name
        # Raw payload is at most chunk_size; zstd can exceed its input by a small bound.
        limit = self.chunk_size + self.chunk_size // 128 + 1024
        try:
            with open(path, "rb") as f:
                header = f.read(_CHUNK_HEADER)
                payload = f.read(limit + 1)
        except FileNotFoundError:
            raise MissingChunk(f"chunk {hexd} is missing: {path}") from None
        except OSError as exc:
            raise CorruptChunk(f"chunk {hexd} cannot be read from {path}: {exc}") from None
        if len(header) < _CHUNK_HEADER or header[:4] != CHUNK_MAGIC:
            raise _corrupt(hexd, path, "is truncated or not a hamal chunk")
        if len(payload) > limit:
            raise _corrupt(hexd, path, "is larger than any chunk can be")
        content = self._decode(header[4], payload, hexd, path)
        actual = blake3.blake3(content).digest()
        if actual != digest:
            raise _corrupt(hexd, path, f"holds content that hashes to {actual.hex()}")
        return content

    def _decode(self, codec: int, payload: bytes, hexd: str, path: Path) -> bytes:
        if codec == CODEC_RAW:
            content = payload
        elif codec == CODEC_ZSTD:
            content = self._decompress(payload, hexd, path)
        else:
            raise _corrupt(hexd, path, f"has unknown codec {codec}")
        if len(content) > self.chunk_size:
            raise _corrupt(hexd, path, f"holds {len(content)} bytes, more than a chunk")
        return content

    def _decompress(self, payload: bytes, hexd: str, path: Path) -> bytes:
        # A decompressor is not safe to share between threads; restore decodes in a pool.
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            # decompress() trusts a frame's declared size over max_output_size: check it.
            declared = zstandard.frame_content_size(payload)
            if declared > self.chunk_size:
                raise zstandard.ZstdError(f"frame declares {declared} bytes")
            return dctx.decompress(payload, max_output_size=self.chunk_size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise _corrupt(hexd, path, f"cannot be decompressed: {exc}") from None

    # --- staging -----------------------------------------------------------------------
    def _staging_dir(self, vm_id: str, point_id: str) -> Path:
        return self.root / "staging" / encode_name(vm_id) / encode_name(point_id)

    def _point_dir(self, vm_id: str, point_id: str) -> Path:
        return self.root / "points" / encode_name(vm_id) / encode_name(point_id)

    @staticmethod
    def _manifest_name(disk: str) -> str:
        return encode_name(disk) + MANIFEST_SUFFIX

    def stage_disk(self, vm_id: str, point_id: str, manifest: DiskManifest) -> None:
        where = f"disk {manifest.disk!r} of VM {vm_id} point {point_id}"
        if manifest.chunk_size != self.chunk_size:
            raise TargetError(
                f"cannot stage {where}: chunks of {manifest.chunk_size} bytes, "
                f"the store uses {self.chunk_size}"
            )
        try:
            data = encode_manifest(manifest)
        except ValueError as exc:
            raise TargetError(f"cannot stage {where}: {exc}") from None
        name = self._manifest_name(manifest.disk)
        committed = self._point_dir(vm_id, point_id)
        if (committed / POINT_FILE).exists():
            # A redelivered disk task after the commit: fine if it brings the same manifest.
            with contextlib.suppress(OSError):
                if (committed / name).read_bytes() == data:
                    return
            raise TargetError(f"cannot stage {where}: the point is already committed")
        staging = self._staging_dir(vm_id, point_id)
        staging.mkdir(parents=True, exist_ok=True)
        _write_file(staging / name, [data], durable=False)

    def staged_disks(self, vm_id: str, point_id: str) -> list[str]:
        return sorted(self._manifest_files(self._staging_dir(vm_id, point_id)))

    @staticmethod
    def _manifest_files(directory: Path) -> dict[str, Path]:
        found = {}
        for entry in _listdir(directory):
            if entry.endswith(MANIFEST_SUFFIX):
                disk = decode_name(entry[: -len(MANIFEST_SUFFIX)])
                if disk is not None:
                    found[disk] = directory / entry
        return found

    def discard_point(self, vm_id: str, point_id: str) -> None:
        staging = self._staging_dir(vm_id, point_id)
        # Renamed away first so a commit racing with the discard sees all or nothing.
        trash = _temporary_name(staging, "discarded")
        try:
            os.rename(staging, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # --- commit ------------------------------------------------------------------------
    def commit_point(
        self, vm_id: str, vm_name: str, point_id: str, created: float, meta: dict[str, object]
    ) -> PointInfo:
        final = self._point_dir(vm_id, point_id)
        if (final / POINT_FILE).exists():
            return self._read_point(final, vm_id, point_id)
        info = PointInfo(vm_id, vm_name, point_id, float(created), {}, dict(meta))
        try:
            return self._commit(info)
        except (OSError, TargetError) as exc:
            # A concurrent finalize of the same point may have committed it first.
            if (final / POINT_FILE).exists():
                return self._read_point(final, vm_id, point_id)
            if isinstance(exc, TargetError):
                raise
            raise TargetError(f"cannot commit VM {vm_id} point {point_id}: {exc}") from exc

    def _commit(self, info: PointInfo) -> PointInfo:
        staging = self._staging_dir(info.vm_id, info.point_id)
        final = self._point_dir(info.vm_id, info.point_id)
        info = replace(info, disks=self._staged_sizes(staging, info.vm_id, info.point_id))
        _write_file(staging / POINT_FILE, [_point_record(info)], durable=True)
        # Chunks and manifests must be durable before the point that names them is.
        self.sync()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, final)
        _fsync_dir(final.parent)
        _fsync_dir(staging.parent)
        return info

    def _staged_sizes(self, staging: Path, vm_id: str, point_id: str) -> dict[str, int]:
        files = self._manifest_files(staging)
        if not files:
            raise TargetError(f"cannot commit VM {vm_id} point {point_id}: no disk is staged")
        sizes = {}
        for disk, path in files.items():
            # Decoded, not just listed: never commit a point whose manifest is damaged.
            manifest = decode_manifest(path.read_bytes(), str(path))
            if manifest.disk != disk:
                raise CorruptManifest(f"manifest {path} is of disk {manifest.disk!r}")
            sizes[disk] = manifest.size
        return sizes

    # --- committed points --------------------------------------------------------------
    def scan_points(self, vm_id: str | None = None) -> PointScan:
        points: list[PointInfo] = []
        broken: list[BrokenPoint] = []
        for vm, vm_dir in self._vm_dirs(vm_id):
            for entry in _listdir(vm_dir):
                point_id = decode_name(entry)
                if point_id is None or not (vm_dir / entry).is_dir():
                    continue  # trash of a delete in progress, or not ours
                try:
                    points.append(self._read_point(vm_dir / entry, vm, point_id))
                except CorruptManifest as exc:
                    broken.append(BrokenPoint(vm, point_id, str(exc)))
        points.sort(key=lambda p: (p.created, p.point_id))
        return PointScan(points, broken)

    def points(self, vm_id: str | None = None) -> list[PointInfo]:
        """Committed points, oldest first; CorruptManifest if any of them cannot be read.

        Raising rather than skipping: the engine bases an incremental on the newest point,
        and silently skipping a broken newest point would base it on an older one.
        """
        scan = self.scan_points(vm_id)
        if scan.broken:
            first = scan.broken[0]
            raise CorruptManifest(
                f"{len(scan.broken)} restore point(s) cannot be read; first: {first.problem}"
            )
        return scan.points

    def _vm_dirs(self, vm_id: str | None) -> Iterator[tuple[str, Path]]:
        root = self.root / "points"
        if vm_id is not None:
            yield vm_id, root / encode_name(vm_id)
            return
        for entry in _listdir(root):
            vm = decode_name(entry)
            if vm is not None and (root / entry).is_dir():
                yield vm, root / entry

    def _read_point(self, directory: Path, vm_id: str, point_id: str) -> PointInfo:
        path = directory / POINT_FILE
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise CorruptManifest(f"restore point record {path} is missing") from None
        except (OSError, ValueError) as exc:
            raise CorruptManifest(f"restore point record {path} is unreadable: {exc}") from None
        try:
            return _parse_point_record(record, vm_id, point_id)
        except ValueError as exc:
            raise CorruptManifest(f"restore point record {path}: {exc}") from None

    def manifest(self, vm_id: str, point_id: str, disk: str) -> DiskManifest:
        directory = self._point_dir(vm_id, point_id)
        path = directory / self._manifest_name(disk)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._missing_manifest(directory, vm_id, point_id, disk, path) from None
        except OSError as exc:
            raise CorruptManifest(f"manifest {path} cannot be read: {exc}") from None
        manifest = decode_manifest(data, str(path))
        if manifest.disk != disk or manifest.chunk_size != self.chunk_size:
            raise CorruptManifest(
                f"manifest {path} is of disk {manifest.disk!r} with chunks of "
                f"{manifest.chunk_size} bytes, expected disk {disk!r} and {self.chunk_size}"
            )
        return manifest

    def _missing_manifest(
        self, directory: Path, vm_id: str, point_id: str, disk: str, path: Path
    ) -> TargetError:
        if not (directory / POINT_FILE).exists():
            return MissingPoint(f"VM {vm_id} has no restore point {point_id}")
        info = self._read_point(directory, vm_id, point_id)
        if disk in info.disks:
            return CorruptManifest(f"manifest {path} is missing, yet {POINT_FILE} lists the disk")
        have = ", ".join(sorted(info.disks)) or "none"
        return TargetError(
            f"restore point {point_id} of VM {vm_id} has no disk {disk!r} (its disks: {have})"
        )

    def delete_point(self, vm_id: str, point_id: str) -> None:
        """Remove a committed point. Its chunks stay: other points may share them."""
        final = self._point_dir(vm_id, point_id)
        # Renamed out of the listing first, so the point vanishes at once, not file by file.
        trash = _temporary_name(final, "deleted")
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            raise MissingPoint(f"VM {vm_id} has no restore point {point_id}") from None
        _fsync_dir(final.parent)
        # What a failed removal leaves is already invisible; sweep_temporary finishes it.
        shutil.rmtree(trash, ignore_errors=True)

    # --- maintenance -------------------------------------------------------------------
    def sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd, self.root)
        finally:
            os.close(fd)

    def sweep_temporary(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files and trash directories a crash left behind; return how many.

        Only entries older than `older_than_s` go, so a write in progress elsewhere is safe.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for directory, dirs, files in os.walk(self.root):
            for name in [*dirs, *files]:
                path = Path(directory) / name
                if not _TEMPORARY.match(name) or _mtime(path) > cutoff:
                    continue
                if name in dirs:
                    dirs.remove(name)  # do not walk into what is being removed
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed += 1
        return removed


# --- point.json -----------------------------------------------------------------------


def _point_record(info: PointInfo) -> bytes:
    record = {
        "version": POINT_VERSION,
        "vm_id": info.vm_id,
        "vm_name": info.vm_name,
        "point_id": info.point_id,
        "created": info.created,
        "disks": info.disks,
        "meta": info.meta,
    }
    try:
        record["created_utc"] = datetime.fromtimestamp(info.created, UTC).isoformat()
        return json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise TargetError(f"restore point {info.point_id} cannot be recorded: {exc}") from None


def _parse_point_record(record: object, vm_id: str, point_id: str) -> PointInfo:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    version = record.get("version")
    if not isinstance(version, int) or version != POINT_VERSION:
        if isinstance(version, int) and version > POINT_VERSION:
            raise ValueError(
                f"point format version {version} is newer than this reader ({POINT_VERSION})"
            )
        raise ValueError(f"unknown point format version {version!r}")
    if record.get("vm_id") != vm_id or record.get("point_id") != point_id:
        raise ValueError(
            f"it names VM {record.get('vm_id')!r} point {record.get('point_id')!r}, "
            "not the directory it is in"
        )
    created, disks, meta = record.get("created"), record.get("disks"), record.get("meta", {})
    vm_name = record.get("vm_name")
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise ValueError(f"bad created time {created!r}")
    if not isinstance(vm_name, str):
        raise ValueError(f"bad vm_name {vm_name!r}")
    if not isinstance(disks, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in disks.items()
    ):
        raise ValueError("bad disks table")
    if not isinstance(meta, dict):
        raise ValueError("bad meta")
    return PointInfo(vm_id, vm_name, point_id, float(created), dict(disks), dict(meta))


def _check_chunk_size(value: object, where: str) -> None:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE
        and value & (value - 1) == 0
    )
    if not ok:
        raise TargetError(
            f"{where}: chunk size {value!r} is not a power of two between "
            f"{MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )


def _corrupt(hexd: str, path: Path, why: str) -> CorruptChunk:
    return CorruptChunk(f"chunk {hexd} is corrupt: {path} {why}")


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")
