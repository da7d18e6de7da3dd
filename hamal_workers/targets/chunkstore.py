"""The content-addressed chunk store on a filesystem: the embedded default target.

Layout (docs/FORMAT.md is the reference):

    format.json                                   what this directory is, and its version
    chunks/ab/cd/<64 hex>                         b"HMC1" | codec byte | payload
    chunks/ab/cd/.<64 hex>.condemned.<16 hex>     a chunk garbage collection condemned
    staging/<vm_id>/<point_id>/<disk>.manifest    disks of a point not committed yet
    points/<vm_id>/<point_id>/point.json          a committed point ...
    points/<vm_id>/<point_id>/<disk>.manifest     ... and its disks
    points/<vm_id>/<point_id>/metadata.json       ... and the VM it is of (upload_metadata_to_oss)
    gc/record.json                                the collector's round and last pass

Every file is written under a temporary dot-name in its own directory, fsynced, and only
then renamed into place (hamal_workers.fsutil), so a name always shows a whole, durable
file. A chunk's directory entry is made durable by the next `sync()`, which fsyncs
exactly the directories this object changed; manifests and point records are durable
when their call returns. A point becomes visible by renaming its staging directory
into points/, which is atomic: a point exists iff that directory with its point.json
exists. Names that come from users' systems (VM ids, point ids, disk names) are
percent-encoded so that none can leave its directory or collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from hamal_workers import fsutil
from hamal_workers.targets import TargetSpec, chunk_format
from hamal_workers.targets.base import (
    CHUNK_SIZE,
    DIGEST_SIZE,
    BrokenPoint,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    ManifestDigests,
    MissingChunk,
    MissingPoint,
    MissingStagedDisk,
    PointInfo,
    PointScan,
    StagedPoint,
    StoredChunk,
    Target,
    TargetError,
    TargetFull,
)
from hamal_workers.targets.chunk_format import CHUNK_MAGIC, CODECS, Buffer
from hamal_workers.targets.encryption import ChunkCipher, check_store_key, load_key_file
from hamal_workers.targets.manifest_format import (
    decode_manifest,
    encode_manifest,
    manifest_digests,
)

__all__ = ["CHUNK_MAGIC", "ChunkStore", "compared_in_full", "decode_name", "encode_name"]

STORE_FORMAT = "hamal-chunkstore"
STORE_VERSION = 1
# A store whose chunks are sealed (targets/encryption.py): format.json says with which key.
ENCRYPTED_STORE_VERSION = 2
POINT_VERSION = 1
HASH_NAME = "blake3"

FORMAT_FILE = "format.json"
# Beside point.json with [sync] upload_metadata_to_oss: the VM and snapshot the point is of.
METADATA_FILE = "metadata.json"
# Where chunks are written before their rename into chunks/: one place for the sweep.
TEMPORARY_DIR = "tmp"
POINT_FILE = "point.json"
MANIFEST_SUFFIX = ".manifest"
GC_DIR = "gc"
GC_RECORD = "record.json"
# A chunk file's name, and the name garbage collection gives a chunk it condemns: a
# dot-name in the chunk's own directory, so has_chunk and put_chunk no longer see it
# (a rename, atomic) while get_chunk still finds it.
_CHUNK_NAME = re.compile(r"^[0-9a-f]{64}$")
_CONDEMNED_NAME = re.compile(r"^\.([0-9a-f]{64})\.condemned\.([0-9a-f]{16})$")

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 * 1024 * 1024

# has_chunk compares a reused chunk with its content in full on one day in this many.
FULL_COMPARE_DAYS = 7
# A quarantined chunk is kept this long for inspection before sweep_temporary removes it.
DAMAGED_GRACE_S = 7 * 24 * 3600.0

_SAFE_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
# Room for ".manifest" and the temporary-name decorations within NAME_MAX (255).
_MAX_ENCODED_NAME = 200
# Entries that may sit in a fresh volume's root without it being "somebody else's data".
_IGNORED_IN_EMPTY_ROOT = {"lost+found"}
# Where quarantine_chunk writes why it moved a chunk, for whoever inspects it.
_REASON_XATTR = "user.hamal.damaged"


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


def named_dirs(directory: Path) -> Iterator[tuple[str, Path]]:
    """(name, path) of the subdirectories whose file name is an encoded name, sorted.

    Trash and temporary entries are dot-names and never decode, so they are skipped.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        name = decode_name(entry.name)
        if name is not None and entry.is_dir(follow_symlinks=False):
            yield name, Path(entry.path)


def manifest_files(directory: Path) -> dict[str, Path]:
    """Disk name -> manifest file of a staging or point directory ({} when it is gone)."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(MANIFEST_SUFFIX):
                disk = decode_name(entry[: -len(MANIFEST_SUFFIX)])
                if disk is not None:
                    found[disk] = directory / entry
    return found


def newest_mtime(directory: Path) -> float:
    """The newest mtime of a directory and its entries (0 if it is gone)."""
    try:
        newest = directory.stat().st_mtime
        for entry in os.scandir(directory):
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except FileNotFoundError:
        return 0.0
    return newest


def _digest_hex(digest: bytes) -> str:
    if not isinstance(digest, bytes | bytearray) or len(digest) != DIGEST_SIZE:
        raise ValueError(f"a chunk digest is {DIGEST_SIZE} bytes, got {digest!r:.80}")
    return bytes(digest).hex()


def _make_dirs_durable(path: Path) -> None:
    for changed in fsutil.make_dirs(path):
        fsutil.fsync_dir(changed)


# --- the store ------------------------------------------------------------------------


class ChunkStore(Target):
    """A chunk store rooted at a directory; safe to share between processes and hosts.

    One object may be used from many threads at once. sync() covers what this object
    wrote; another process's writes are that process's to sync.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        create: bool = True,
        full_compare_days: int = FULL_COMPARE_DAYS,
        cipher: ChunkCipher | None = None,
    ) -> None:
        """Open the store at `root`, creating it if the directory is missing or empty.

        chunk_size only matters for a new store (default CHUNK_SIZE); an existing store
        keeps its own, and asking for a different one is an error. With create=False a
        missing store is an error instead (read-only commands use that, so a typo in a path
        does not silently make an empty store). full_compare_days: how many days it takes
        has_chunk to compare every name in full once (1: every call compares). cipher: the
        store's key, which an encrypted store requires and a plain one refuses
        (targets/encryption.py).
        """
        if full_compare_days < 1:
            raise ValueError(f"full_compare_days must be at least 1, not {full_compare_days}")
        self.full_compare_days = full_compare_days
        self.root = Path(root)
        self.cipher = cipher
        fmt = self._open_format(chunk_size, create)
        self.chunk_size = int(fmt["chunk_size"])
        # Directories whose entries changed since the last sync(): what it must fsync.
        self._dirty: set[Path] = set()
        self._dirty_lock = threading.Lock()
        # One barrier at a time, so a second caller waits for the fsyncs it relies on.
        self._sync_lock = threading.Lock()

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
        check_store_key(f"chunk store {self.root}", fmt.get("encryption"), self.cipher)
        if chunk_size is not None and chunk_size != fmt["chunk_size"]:
            raise TargetError(
                f"chunk store {self.root} uses chunks of {fmt['chunk_size']} bytes, "
                f"not {chunk_size}"
            )
        for sub in ("chunks", "staging", "points", TEMPORARY_DIR, GC_DIR):
            _make_dirs_durable(self.root / sub)
        return fmt

    def _create(self, chunk_size: int) -> None:
        check_chunk_size(chunk_size, f"new chunk store {self.root}")
        _make_dirs_durable(self.root)
        names = sorted(os.listdir(self.root))
        if FORMAT_FILE in names:
            return  # another process created the store since we looked: adopt its format
        foreign = [
            n
            for n in names
            if n not in _IGNORED_IN_EMPTY_ROOT and not fsutil.TEMPORARY_NAME.match(n)
        ]
        if foreign:
            raise TargetError(
                f"{self.root} is not empty and has no {FORMAT_FILE}: it is not a hamal chunk "
                f"store (found {', '.join(foreign[:5])}); refusing to write into it"
            )
        fmt = new_format(chunk_size, self.cipher)
        path = self.root / FORMAT_FILE
        tmp = fsutil.temporary_name(path)
        try:
            fsutil.write_atomic(tmp, [json.dumps(fmt, indent=2).encode() + b"\n"])
            # link, not rename: when two workers create the store at once, the first wins
            # and the second adopts its format instead of replacing it.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsutil.fsync_dir(self.root)

    def _read_format(self, path: Path) -> dict[str, Any]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TargetError(f"cannot read chunk store format {path}: {exc}") from None
        return parse_format(data, str(path))

    # --- chunks ------------------------------------------------------------------------
    def chunk_name(self, content: Buffer) -> bytes:
        if self.cipher is not None:
            return self.cipher.name(content)
        return blake3.blake3(content).digest()

    def chunk_path(self, name: bytes) -> Path:
        hexd = _digest_hex(name)
        return self.root / "chunks" / hexd[:2] / hexd[2:4] / hexd

    def has_chunk(self, name: bytes, length: int, content: Buffer | None = None) -> bool:
        """True only when the chunk stored under `name` is intact and `length` raw bytes.

        Every call checks the header, the codec and the length (raw: the file size; zstd:
        the size its frame declares, and that the frame's blocks end exactly at the end of
        the file): a few small reads, which catch a truncated, zeroed or foreign file.

        With `content`, the stored chunk is also decoded and compared with it byte for
        byte -- but only on the day its name's turn comes (`compared_in_full`): each day
        a different 1/full_compare_days of all names. Comparing every reused chunk in
        full would cost an unchanged incremental 4-6 times its source read with a warm
        page cache and about as much again with a cold one (bench/chunkstore.py), since
        the whole stored chunk must be read and decompressed. With the rotation a sync
        pays a seventh of that, about its source read or less, and a chunk reused by
        daily syncs is still compared in full at least once a week; `hamal verify`
        checks everything on demand.

        A damaged chunk is quarantined (quarantine_chunk) and False returned, so that the
        caller stores it again.
        """
        if content is not None and len(content) != length:
            raise ValueError(f"content of {len(content)} bytes for a chunk of {length}")
        path = self.chunk_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._failure(exc, f"cannot open chunk {path}") from None
        try:
            problem = self._chunk_problem(fd, name, length, content)
            if problem is None:
                return True
            checked = os.fstat(fd)
        finally:
            os.close(fd)
        self._quarantine(path, problem, checked)
        return False

    def _chunk_problem(
        self, fd: int, name: bytes, length: int, content: Buffer | None
    ) -> str | None:
        try:
            if content is not None and self._compare_today(name):
                # Checks the shape too, on the whole file read once instead of piecemeal.
                return chunk_format.content_problem(fd, content, self.chunk_size, name, self.cipher)
            # A few small reads: without read-ahead, since chunks are written around the
            # page cache and a reused one is mostly not in it.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return chunk_format.shape_problem(fd, length)
        except OSError as exc:
            # A read error (EIO) is damage here: a fresh copy goes elsewhere on the disk.
            return f"cannot be read: {exc.strerror or exc}"

    def _compare_today(self, name: bytes) -> bool:
        today = int(time.time() // 86400)
        return compared_in_full(name, today, self.full_compare_days)

    def quarantine_chunk(self, name: bytes, reason: str) -> bool:
        """Rename the chunk to `.<hex>.damaged.<16 hex>` in its directory; True if moved.

        The copy is kept for DAMAGED_GRACE_S (sweep_temporary), with `reason` in its
        extended attribute user.hamal.damaged where the filesystem has them.
        """
        return self._quarantine(self.chunk_path(name), reason, None)

    def _quarantine(self, path: Path, reason: str, checked: os.stat_result | None) -> bool:
        damaged = fsutil.temporary_name(path, "damaged")
        try:
            if checked is not None and not _same_file(path, checked):
                return False  # a fresh copy replaced the one found damaged
            os.rename(path, damaged)
        except FileNotFoundError:
            return False
        except OSError as exc:
            # Left in place, a damaged chunk would be taken for good by the next put.
            raise self._failure(exc, f"cannot move damaged chunk {path} aside") from None
        # A rename keeps the old mtime: the grace before the sweep starts now.
        with contextlib.suppress(OSError):
            os.utime(damaged)
        with contextlib.suppress(OSError):
            os.setxattr(damaged, _REASON_XATTR, reason.encode()[:1024])
        self._mark_dirty([path.parent])
        return True

    def put_chunk(self, name: bytes, payload: bytes | memoryview, codec: int, length: int) -> int:
        """Store a chunk; 0 if an intact one (by has_chunk's checks) is already there.

        The file is written under a temporary name and fdatasynced in the calling thread
        before it is renamed to its name, so a name is only ever a complete, durable chunk.
        The directory entry becomes durable at the next sync().
        """
        if not 0 < length <= self.chunk_size:
            raise ValueError(f"a chunk of {length} bytes; chunks are at most {self.chunk_size}")
        chunk_format.check_payload(payload, codec, length)
        if self.has_chunk(name, length):
            return 0
        path = self.chunk_path(name)
        if self.cipher is None:
            parts = [chunk_format.chunk_header(codec), payload]
        else:
            parts = list(chunk_format.seal_payload(self.cipher, name, codec, payload))
        try:
            written = self._write_chunk(path, parts)
        except OSError as exc:
            raise self._failure(exc, f"cannot store chunk {path.name}") from None
        self._mark_dirty([path.parent])
        return written

    def _write_chunk(self, path: Path, parts: list[Buffer]) -> int:
        # Written in tmp/: a put cut short leaves its file where a sweep finds it at once.
        if not path.parent.is_dir():
            # The first chunk of its directory: create it, and sync its parents later.
            self._mark_dirty(fsutil.make_dirs(path.parent))
        return _write_durable(path, parts, self.root / TEMPORARY_DIR)

    def get_chunk(self, name: bytes) -> bytes:
        path = self.chunk_path(name)
        hexd = path.name
        limit = chunk_format.max_payload(self.chunk_size)
        try:
            with _open_chunk_or_condemned(path) as f:
                header = f.read(chunk_format.HEADER_SIZE)
                payload = f.read(limit + 1)
        except FileNotFoundError:
            raise MissingChunk(f"chunk {hexd} is missing: {path}") from None
        except OSError as exc:
            raise CorruptChunk(f"chunk {hexd} cannot be read from {path}: {exc}") from None
        if len(header) < chunk_format.HEADER_SIZE or header[:4] != CHUNK_MAGIC:
            raise _corrupt(hexd, path, "is truncated or not a hamal chunk")
        if len(payload) > limit:
            raise _corrupt(hexd, path, "is larger than any chunk can be")
        try:
            content = chunk_format.decode_payload(
                header[4], payload, self.chunk_size, name, self.cipher
            )
        except ValueError as exc:
            raise _corrupt(hexd, path, str(exc)) from None
        actual = self.chunk_name(content)
        if actual != name:
            raise _corrupt(hexd, path, f"holds content that hashes to {actual.hex()}")
        return content

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
        data = manifest_to_stage(manifest, self.chunk_size, where)
        name = self._manifest_name(manifest.disk)
        committed = self._point_dir(vm_id, point_id)
        if (committed / POINT_FILE).exists():
            # A redelivered disk task after the commit: fine if it brings the same manifest.
            with contextlib.suppress(OSError):
                if (committed / name).read_bytes() == data:
                    return
            raise TargetError(f"cannot stage {where}: the point is already committed")
        # The manifest names chunks this object put: they must be durable before it is.
        self.sync()
        staging = self._staging_dir(vm_id, point_id)
        try:
            _make_dirs_durable(staging)
            fsutil.write_atomic(staging / name, [data])
        except OSError as exc:
            raise self._failure(exc, f"cannot stage {where}") from None

    def staged_disks(self, vm_id: str, point_id: str) -> list[str]:
        return sorted(manifest_files(self._staging_dir(vm_id, point_id)))

    def staged_points(self) -> list[StagedPoint]:
        """Every staged, uncommitted point; age_s counts from its newest staged file."""
        now = time.time()
        found = []
        for vm_id, vm_dir in named_dirs(self.root / "staging"):
            for point_id, directory in named_dirs(vm_dir):
                if (self._point_dir(vm_id, point_id) / POINT_FILE).exists():
                    continue  # a late stage after its commit: not a point of its own
                age = max(0.0, now - newest_mtime(directory))
                found.append(StagedPoint(vm_id, point_id, age))
        return found

    def discard_point(self, vm_id: str, point_id: str) -> None:
        # Renamed away first so a commit racing with the discard sees all or nothing.
        remove_tree(self._staging_dir(vm_id, point_id), "discarded")

    # --- commit ------------------------------------------------------------------------
    def commit_point(
        self,
        vm_id: str,
        vm_name: str,
        point_id: str,
        created: float,
        disks: Sequence[str],
        meta: dict[str, object],
    ) -> PointInfo:
        """Make the point visible with exactly `disks`, all at once (idempotent).

        Each listed disk's staged manifest is read and decoded; staged manifests of other
        disks are dropped. Then point.json is written and fsynced in the staging directory,
        which is renamed into points/ (atomic) and its parent fsynced.
        """
        final = self._point_dir(vm_id, point_id)
        if (final / POINT_FILE).exists():
            return self._read_point(final, vm_id, point_id)
        wanted = sorted(set(disks))
        if not wanted:
            raise TargetError(f"cannot commit VM {vm_id} point {point_id}: no disks given")
        info = PointInfo(vm_id, vm_name, point_id, float(created), {}, dict(meta))
        try:
            return self._commit(info, wanted)
        except (OSError, TargetError) as exc:
            # A concurrent finalize of the same point may have committed it first.
            if (final / POINT_FILE).exists():
                return self._read_point(final, vm_id, point_id)
            if isinstance(exc, TargetError):
                raise
            raise self._failure(exc, f"cannot commit VM {vm_id} point {point_id}") from exc

    def _commit(self, info: PointInfo, disks: list[str]) -> PointInfo:
        staging = self._staging_dir(info.vm_id, info.point_id)
        final = self._point_dir(info.vm_id, info.point_id)
        info = replace(info, disks=self._staged_sizes(staging, info, disks))
        for disk, path in manifest_files(staging).items():
            if disk not in info.disks:
                path.unlink()
        # Durable with its directory, so the drops above are too.
        fsutil.write_atomic(staging / POINT_FILE, [point_record(info)])
        # Chunks must be durable before the point that names them is.
        self.sync()
        _make_dirs_durable(final.parent)
        os.rename(staging, final)
        fsutil.fsync_dir(final.parent)
        fsutil.fsync_dir(staging.parent)
        return info

    def _staged_sizes(self, staging: Path, info: PointInfo, disks: list[str]) -> dict[str, int]:
        def read(disk: str) -> tuple[bytes, str] | None:
            path = staging / self._manifest_name(disk)
            try:
                return path.read_bytes(), str(path)
            except FileNotFoundError:
                return None

        return staged_sizes(info, disks, self.chunk_size, read)

    # --- committed points --------------------------------------------------------------
    def point_ids(self, vm_id: str) -> list[str]:
        """Ids of the VM's committed points, sorted: oldest first for time-sortable ids."""
        return sorted(pid for pid, _ in named_dirs(self.root / "points" / encode_name(vm_id)))

    def point(self, vm_id: str, point_id: str) -> PointInfo:
        """A committed point by id; for "latest", the last readable one in point_ids order."""
        if point_id != "latest":
            return self._read_point(self._point_dir(vm_id, point_id), vm_id, point_id)
        for candidate in reversed(self.point_ids(vm_id)):
            with contextlib.suppress(CorruptManifest):
                return self._read_point(self._point_dir(vm_id, candidate), vm_id, candidate)
        raise MissingPoint(f"VM {vm_id} has no readable restore point")

    def save_point_metadata(self, vm_id: str, point_id: str, record: dict[str, object]) -> None:
        directory = self._point_dir(vm_id, point_id)
        try:
            write_metadata(directory, vm_id, point_id, record)
        except OSError as exc:
            raise self._failure(exc, f"cannot write {directory / METADATA_FILE}") from None

    def point_metadata(self, vm_id: str, point_id: str) -> dict[str, object] | None:
        return read_metadata(self._point_dir(vm_id, point_id))

    def scan_points(self, vm_id: str | None = None) -> PointScan:
        points: list[PointInfo] = []
        broken: list[BrokenPoint] = []
        for vm, vm_dir in self._vm_dirs(vm_id):
            for point_id, directory in named_dirs(vm_dir):
                try:
                    points.append(self._read_point(directory, vm, point_id))
                except CorruptManifest as exc:
                    broken.append(BrokenPoint(vm, point_id, str(exc)))
        points.sort(key=lambda p: (p.created, p.point_id))
        return PointScan(points, broken)

    def _vm_dirs(self, vm_id: str | None) -> Iterable[tuple[str, Path]]:
        if vm_id is not None:
            return [(vm_id, self.root / "points" / encode_name(vm_id))]
        return named_dirs(self.root / "points")

    def _read_point(self, directory: Path, vm_id: str, point_id: str) -> PointInfo:
        path = directory / POINT_FILE
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            if not directory.is_dir():
                raise MissingPoint(f"VM {vm_id} has no restore point {point_id}") from None
            raise CorruptManifest(f"restore point record {path} is missing") from None
        except (OSError, ValueError) as exc:
            raise CorruptManifest(f"restore point record {path} is unreadable: {exc}") from None
        try:
            return parse_point_record(record, vm_id, point_id)
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
        """Remove a committed point: one rename to gc/deleted/, so it vanishes at once.

        Its chunks stay (other points may share them), and so do its manifests, out of
        every listing, until garbage collection has read whose chunks it frees.
        """
        final = self._point_dir(vm_id, point_id)
        deleted = self._deleted_dir(vm_id, point_id)
        try:
            if not final.is_dir():
                raise FileNotFoundError(final)
            _make_dirs_durable(deleted.parent)
            try:
                os.rename(final, deleted)
            except OSError:
                if not deleted.exists():
                    raise
                # A point of that id deleted before and not purged: this one goes for good.
                remove_tree(final, "deleted")
            fsutil.fsync_dir(final.parent)
            fsutil.fsync_dir(deleted.parent)
        except FileNotFoundError:
            raise MissingPoint(f"VM {vm_id} has no restore point {point_id}") from None
        except OSError as exc:
            raise self._failure(exc, f"cannot delete VM {vm_id} point {point_id}") from None

    def _deleted_dir(self, vm_id: str, point_id: str) -> Path:
        return self.root / GC_DIR / "deleted" / encode_name(vm_id) / encode_name(point_id)

    def iter_deleted_manifests(self) -> Iterator[ManifestDigests]:
        for vm_id, point_id, disk, path in self._manifest_tree(self.root / GC_DIR / "deleted"):
            try:
                digests = manifest_digests(path.read_bytes(), str(path))
            except (OSError, CorruptManifest):
                continue  # only for telling whose chunks went; nothing depends on it
            yield ManifestDigests(vm_id, point_id, disk, digests)

    def purge_deleted(self, vm_id: str, point_id: str) -> None:
        remove_tree(self._deleted_dir(vm_id, point_id), "deleted")

    # --- garbage collection ------------------------------------------------------------
    def iter_chunks(self) -> Iterator[StoredChunk]:
        """Chunks and condemned copies, one directory at a time, in name order."""
        for top in _sorted_subdirs(self.root / "chunks"):
            for directory in _sorted_subdirs(top):
                try:
                    entries = sorted(os.scandir(directory), key=lambda e: e.name)
                except FileNotFoundError:
                    continue
                for entry in entries:
                    if _CHUNK_NAME.match(entry.name):
                        yield StoredChunk(bytes.fromhex(entry.name), 0, _mtime_of(entry))
                    elif match := _CONDEMNED_NAME.match(entry.name):
                        gc_round = int(match.group(2), 16)
                        yield StoredChunk(bytes.fromhex(match.group(1)), gc_round, _mtime_of(entry))

    def iter_manifests(self, staged: bool) -> Iterator[ManifestDigests]:
        top = self.root / ("staging" if staged else "points")
        for vm_id, point_id, disk, path in self._manifest_tree(top):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # committed or deleted since the listing: read where it went
            except OSError as exc:
                raise CorruptManifest(f"manifest {path} cannot be read: {exc}") from None
            yield ManifestDigests(vm_id, point_id, disk, manifest_digests(data, str(path)))

    def _manifest_tree(self, top: Path) -> Iterator[tuple[str, str, str, Path]]:
        """(vm_id, point_id, disk, path) of every manifest under top/<vm>/<point>/."""
        for vm_id, vm_dir in named_dirs(top):
            for point_id, directory in named_dirs(vm_dir):
                for disk, path in manifest_files(directory).items():
                    yield vm_id, point_id, disk, path

    def _condemned_path(self, name: bytes, gc_round: int) -> Path:
        path = self.chunk_path(name)
        return path.parent / f".{path.name}.condemned.{gc_round:016x}"

    def condemn_chunk(self, name: bytes, gc_round: int) -> int:
        path = self.chunk_path(name)
        condemned = self._condemned_path(name, gc_round)
        try:
            size = path.lstat().st_size
            os.rename(path, condemned)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._failure(exc, f"cannot condemn chunk {path.name}") from None
        # The condemned time, which the rename keeps from the write otherwise.
        with contextlib.suppress(OSError):
            os.utime(condemned)
        # Not made durable: a condemn a crash undoes brings the chunk back, which is safe.
        return size

    def revive_chunk(self, name: bytes, gc_round: int) -> bool:
        path = self.chunk_path(name)
        condemned = self._condemned_path(name, gc_round)
        try:
            # A link, not a rename: a copy put again under the name meanwhile stays.
            os.link(condemned, path)
        except FileExistsError:
            pass
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._failure(exc, f"cannot revive chunk {path.name}") from None
        try:
            # The name durable before the condemned copy goes: a crash keeps one of them.
            fsutil.fsync_dir(path.parent)
            os.unlink(condemned)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._failure(exc, f"cannot revive chunk {path.name}") from None
        return True

    def drop_condemned(self, name: bytes, gc_round: int) -> int:
        condemned = self._condemned_path(name, gc_round)
        try:
            size = condemned.lstat().st_size
            condemned.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._failure(exc, f"cannot delete condemned chunk {condemned.name}") from None
        return size  # a drop a crash undoes is dropped again by the next pass

    def stored_size(self, name: bytes) -> int | None:
        path = self.chunk_path(name)
        for candidate in [path, *_condemned_copies(path)]:
            with contextlib.suppress(FileNotFoundError):
                return candidate.lstat().st_size
        return None

    def gc_record(self) -> dict[str, object]:
        path = self.root / GC_DIR / GC_RECORD
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise TargetError(f"garbage collection record {path} is unreadable: {exc}") from None
        if not isinstance(record, dict):
            raise TargetError(f"garbage collection record {path} is not a JSON object")
        return record

    def save_gc_record(self, record: dict[str, object]) -> None:
        path = self.root / GC_DIR / GC_RECORD
        try:
            _make_dirs_durable(path.parent)
            data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
            fsutil.write_atomic(path, [data])
        except OSError as exc:
            raise self._failure(exc, "cannot save the garbage collection record") from None

    # --- durability and room -----------------------------------------------------------
    def _mark_dirty(self, directories: Iterable[Path]) -> None:
        with self._dirty_lock:
            self._dirty.update(directories)

    def sync(self) -> None:
        """Fsync every directory this object changed since the last sync(), from any thread.

        Chunk files are already durable (put_chunk fdatasyncs them), and manifests and
        point records are durable when written: what is left is the directory entries
        that name new chunks. Nothing else on the filesystem is flushed.
        """
        with self._sync_lock:
            with self._dirty_lock:
                pending, self._dirty = sorted(self._dirty), set()
            for i, directory in enumerate(pending):
                try:
                    fsutil.fsync_dir(directory)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    # Kept dirty: the next barrier tries again instead of forgetting them.
                    self._mark_dirty(pending[i:])
                    raise TargetError(
                        f"chunk store {self.root}: cannot make {directory} durable: "
                        f"{exc.strerror or exc}; chunks written there may be lost"
                    ) from None

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _failure(self, exc: OSError, what: str) -> TargetError:
        """A TargetError naming the store; TargetFull when the filesystem or quota is full."""
        if fsutil.is_no_room(exc):
            return TargetFull(
                f"chunk store {self.root} is full: {what}: {exc.strerror}; "
                "free space on it or give it more, then retry"
            )
        return TargetError(f"chunk store {self.root}: {what}: {exc.strerror or exc}")

    # --- maintenance -------------------------------------------------------------------
    def sweep_temporary(
        self,
        older_than_s: float = 3600.0,
        damaged_older_than_s: float = DAMAGED_GRACE_S,
        *,
        everywhere: bool = True,
    ) -> int:
        """Remove temporary files and trash a crash left behind; return how many.

        Only entries older than `older_than_s` go, so a write in progress elsewhere is safe
        (and one cut short by the sweep only fails its put, which is tried again);
        quarantined chunks are kept for `damaged_older_than_s`, for inspection. With
        everywhere=False only tmp/ and staging/ are looked at: where chunks and manifests
        are written, cheap enough for every scan; the whole tree is for now and then.
        """
        now = time.time()
        removed = 0
        tops = [self.root] if everywhere else [self.root / TEMPORARY_DIR, self.root / "staging"]
        walks = (step for top in tops for step in os.walk(top))
        for directory, dirs, files in walks:
            for name in [*dirs, *files]:
                match = fsutil.TEMPORARY_NAME.match(name)
                if match is None:
                    continue
                grace = damaged_older_than_s if match.group(1) == "damaged" else older_than_s
                path = Path(directory) / name
                if _mtime(path) > now - grace:
                    continue
                if name in dirs:
                    dirs.remove(name)  # do not walk into what is being removed
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed += 1
        return removed


def compared_in_full(name: bytes, day: int, every_days: int) -> bool:
    """Whether has_chunk compares chunk `name` in full on `day` (days since the epoch).

    Each name gets its turn on exactly one day in every `every_days`, and on any day
    about 1/every_days of all names have theirs: names are uniform hashes.
    """
    return (int.from_bytes(name[:8], "big") + day) % every_days == 0


def remove_tree(directory: Path, kind: str) -> None:
    """Rename a directory to a trash dot-name (it vanishes at once), then remove it.

    Gone already: nothing to do. What a failed removal leaves, sweep_temporary finishes.
    """
    trash = fsutil.temporary_name(directory, kind)
    try:
        os.rename(directory, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _sorted_subdirs(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


def _mtime_of(entry: os.DirEntry[str]) -> Callable[[], float]:
    """The entry's mtime, looked up only when asked: most chunks never are."""

    def modified() -> float:
        try:
            return entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return time.time()  # gone meanwhile: as young as can be, so left alone

    return modified


def _condemned_copies(path: Path) -> list[Path]:
    prefix = f".{path.name}.condemned."
    try:
        return sorted(path.parent / n for n in os.listdir(path.parent) if n.startswith(prefix))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _open_chunk_or_condemned(path: Path) -> Iterator[Any]:
    """The chunk file, or a condemned copy of it; FileNotFoundError when neither exists."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        for copy in _condemned_copies(path):
            try:
                f = open(copy, "rb")  # noqa: SIM115 - closed below
                break
            except FileNotFoundError:
                continue
        else:
            try:  # revived between the two looks
                f = open(path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                raise
    with f:
        yield f


def _write_durable(path: Path, parts: list[Buffer], temp_dir: Path) -> int:
    with fsutil.replacing(path, mode=0o640, temp_dir=temp_dir) as fd:
        return fsutil.write_uncached(fd, parts)


def _same_file(path: Path, checked: os.stat_result) -> bool:
    now = os.lstat(path)
    return (now.st_dev, now.st_ino) == (checked.st_dev, checked.st_ino)


# --- staging, shared by every store ----------------------------------------------------


def manifest_to_stage(manifest: DiskManifest, chunk_size: int, where: str) -> bytes:
    """The manifest's bytes, for a store of `chunk_size` chunks; TargetError when unfit."""
    if manifest.chunk_size != chunk_size:
        raise TargetError(
            f"cannot stage {where}: chunks of {manifest.chunk_size} bytes, "
            f"the store uses {chunk_size}"
        )
    try:
        return encode_manifest(manifest)
    except ValueError as exc:
        raise TargetError(f"cannot stage {where}: {exc}") from None


def staged_sizes(
    info: PointInfo,
    disks: list[str],
    chunk_size: int,
    read: Callable[[str], tuple[bytes, str] | None],
) -> dict[str, int]:
    """Each disk's size from its staged manifest (`read(disk)`: its bytes and where they
    are, None when not staged); MissingStagedDisk naming every disk that is not fit.

    Decoded, not just listed: a point is never committed with a manifest that is damaged.
    """
    sizes: dict[str, int] = {}
    problems: dict[str, str] = {}
    for disk in disks:
        try:
            found = read(disk)
            if found is None:
                problems[disk] = "is not staged"
                continue
            data, where = found
            manifest = decode_manifest(data, where)
        except CorruptManifest as exc:
            problems[disk] = str(exc)
            continue
        if manifest.disk != disk or manifest.chunk_size != chunk_size:
            problems[disk] = (
                f"has manifest {where} of disk {manifest.disk!r} with chunks of "
                f"{manifest.chunk_size} bytes"
            )
            continue
        sizes[disk] = manifest.size
    if problems:
        listed = "; ".join(f"disk {d!r} {why}" for d, why in problems.items())
        raise MissingStagedDisk(
            f"cannot commit VM {info.vm_id} point {info.point_id}: {listed}",
            disks=list(problems),
        )
    return sizes


# --- format.json ----------------------------------------------------------------------


def new_format(chunk_size: int, cipher: ChunkCipher | None = None) -> dict[str, Any]:
    """What format.json says of a new store (the filesystem's and the bucket's alike).

    An encrypted store is version 2, so that a reader that predates encryption refuses it
    instead of failing on every chunk.
    """
    fmt: dict[str, Any] = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION if cipher is None else ENCRYPTED_STORE_VERSION,
        "chunk_size": chunk_size,
        "hash": HASH_NAME,
        "codecs": {str(k): v for k, v in CODECS.items()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cipher is not None:
        fmt["encryption"] = cipher.record().to_json()
    return fmt


def parse_format(data: bytes, where: str) -> dict[str, Any]:
    """A store's format.json, checked: a format or version this reader does not know is refused."""
    try:
        fmt = json.loads(data)
    except ValueError as exc:
        raise TargetError(f"cannot read chunk store format {where}: {exc}") from None
    if not isinstance(fmt, dict) or fmt.get("format") != STORE_FORMAT:
        raise TargetError(f"{where}: not a hamal chunk store (format is not {STORE_FORMAT!r})")
    version = fmt.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TargetError(f"{where}: chunk store version {version!r} is not a number")
    if version > ENCRYPTED_STORE_VERSION:
        raise TargetError(
            f"{where}: chunk store format version {version} is newer than this reader "
            f"({ENCRYPTED_STORE_VERSION}); upgrade hamal to use this store"
        )
    if version not in (STORE_VERSION, ENCRYPTED_STORE_VERSION):
        raise TargetError(f"{where}: unknown chunk store format version {version}")
    if (version == ENCRYPTED_STORE_VERSION) != ("encryption" in fmt):
        raise TargetError(
            f"{where}: a version {version} store "
            + (
                "must say how it is encrypted"
                if version == ENCRYPTED_STORE_VERSION
                else "is never encrypted"
            )
        )
    if fmt.get("hash") != HASH_NAME:
        raise TargetError(f"{where}: unknown hash {fmt.get('hash')!r} (this reader: blake3)")
    check_chunk_size(fmt.get("chunk_size"), where)
    return fmt


# --- metadata.json --------------------------------------------------------------------


def write_metadata(directory: Path, vm_id: str, point_id: str, record: dict[str, object]) -> None:
    """The record beside a committed point's point.json, durably; MissingPoint, OSError."""
    if not (directory / POINT_FILE).is_file():
        raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")
    data = json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"
    fsutil.write_atomic(directory / METADATA_FILE, [data])


def read_metadata(directory: Path) -> dict[str, object] | None:
    path = directory / METADATA_FILE
    try:
        return parse_metadata(path.read_bytes(), str(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_metadata(data: bytes, where: str) -> dict[str, object]:
    """A point's metadata record; CorruptManifest when it is not a JSON object."""
    try:
        record = json.loads(data)
    except ValueError as exc:
        raise CorruptManifest(f"{where}: not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CorruptManifest(f"{where}: not a metadata record")
    return record


# --- point.json -----------------------------------------------------------------------


def point_record(info: PointInfo) -> bytes:
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


def parse_point_record(record: object, vm_id: str, point_id: str) -> PointInfo:
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


def check_chunk_size(value: object, where: str) -> None:
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


def configured_cipher(settings: Any) -> ChunkCipher | None:
    """[target] encryption_key_file's key, or None when chunks are not encrypted."""
    path = settings.target.encryption_key_file
    return load_key_file(path) if path else None


def _open(settings: Any, create: bool) -> ChunkStore:
    return ChunkStore(
        settings.target.path,
        create=create,
        full_compare_days=settings.target.full_compare_days,
        cipher=configured_cipher(settings),
    )


SPEC = TargetSpec(type="local", open=_open)
