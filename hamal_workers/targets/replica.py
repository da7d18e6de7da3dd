"""The raw replica target (`[target] type = replica`): each source disk kept as a disk.

Every disk is mirrored into a raw image file or a block device and updated in place from
the changed extents, so that the copy can be attached and booted as it is (block storage
mode, for a migration). Only the newest committed generation of a replica exists: a
restore point records which generation it committed, and a point whose generation was
overwritten since is listed but neither restored nor verified.

Layout under `[replica] directory` (docs/FORMAT.md, "The replica target"):

    format.json                                   what this directory is
    images/<vm_id>/<disk>.raw                     replicas of disks not in [replica] devices
    replicas/<32 hex>.json                        one record per replica, named by its path:
                                                  the disk flag, the committed generation and
                                                  a write in progress ("writing")
    staging/<vm_id>/<point_id>/<disk>.manifest    disks of a point not committed yet
    points/<vm_id>/<point_id>/point.json          a committed point; meta.replica gives the
                                                  path and generation of each disk ...
    points/<vm_id>/<point_id>/<disk>.manifest     ... and the chunk names at that generation

The disk flag is kept in the target's directory, keyed by the replica's resolved path,
rather than beside the image: a block device has no "beside", the replica must equal its
source byte for byte so the flag cannot live inside it, and two disks configured onto one
file or device through different spellings (a /dev/disk/by-id link) meet one record.

A replica's record says `writing` from the moment a disk task opens it until the point is
committed. A run that fails leaves it so: the replica is then neither the committed
generation nor the next one. It is still a correct base for the next sync, which diffs
from the committed generation's change tokens: every block the failed run wrote was
written in the source since that generation, so the next diff covers it again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from hamal_workers import fsutil
from hamal_workers.targets import TargetSpec
from hamal_workers.targets.base import (
    CHUNK_SIZE,
    BrokenPoint,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    DiskWriter,
    ManifestDigests,
    MissingChunk,
    MissingPoint,
    PointInfo,
    PointScan,
    StagedPoint,
    StoredChunk,
    Target,
    TargetError,
    TargetFull,
)
from hamal_workers.targets.chunkstore import (
    FORMAT_FILE,
    MANIFEST_SUFFIX,
    METADATA_FILE,
    POINT_FILE,
    check_chunk_size,
    encode_name,
    manifest_files,
    manifest_to_stage,
    named_dirs,
    newest_mtime,
    parse_point_record,
    point_record,
    read_metadata,
    remove_tree,
    staged_sizes,
    write_metadata,
)
from hamal_workers.targets.manifest_format import decode_manifest

__all__ = ["DiskFlagMismatch", "ReplicaRecord", "ReplicaTarget", "SupersededPoint"]

REPLICA_FORMAT = "hamal-replica"
REPLICA_VERSION = 1
RECORD_VERSION = 1
HASH_NAME = "blake3"
IMAGE_SUFFIX = ".raw"
GC_FILE = "gc.json"
# The directories the target writes its own files into (never through a link).
_SUBDIRS = ("images", "replicas", "staging", "points")
# A record is a few hundred bytes: anything far larger is not one.
_MAX_RECORD = 64 * 1024
_FILE, _DEVICE = "file", "device"

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
# fallocate cannot make this range zeros here: write them instead.
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})
_libc = ctypes.CDLL(None, use_errno=True)


class DiskFlagMismatch(TargetError):
    """The replica's disk flag names another source disk: nothing was written to it."""


class SupersededPoint(TargetError):
    """The point's generation of a replica was overwritten in place by a newer one."""


@dataclass(frozen=True)
class ReplicaRecord:
    """What the target knows of one replica (replicas/<32 hex>.json)."""

    path: str  # the resolved path of the image file or block device
    kind: str  # "file" or "device"
    vm_id: str  # whose disk's copy it holds, or is being written with
    vm_name: str
    disk: str
    # The disk flag: the source disk its copy is of ("" = that disk carries no flag).
    identity: str
    generation: int  # the committed generation; 0 before the first commit
    point_id: str  # the restore point that committed `generation` ("" = none)
    writing: str  # the run writing it since that generation ("" = none: it is whole)

    def encode(self) -> bytes:
        record = {"version": RECORD_VERSION, **asdict(self)}
        record["updated_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
        return json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, where: str) -> ReplicaRecord:
        try:
            record = json.loads(data)
        except ValueError as exc:
            raise TargetError(f"replica record {where} is unreadable: {exc}") from None
        if not isinstance(record, dict):
            raise TargetError(f"replica record {where} is not a JSON object")
        version = record.get("version")
        if version != RECORD_VERSION:
            newer = isinstance(version, int) and version > RECORD_VERSION
            why = f"is newer than this reader ({RECORD_VERSION})" if newer else "is unknown"
            raise TargetError(f"replica record {where}: version {version!r} {why}")
        strings = ("path", "kind", "vm_id", "vm_name", "disk", "identity", "point_id", "writing")
        bad = [name for name in strings if not isinstance(record.get(name), str)]
        generation = record.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            bad.append("generation")
        if bad:
            raise TargetError(f"replica record {where}: bad {', '.join(bad)}")
        return cls(**{name: record[name] for name in (*strings, "generation")})

    @property
    def owner(self) -> str:
        return f"VM {_label(self.vm_name, self.vm_id)} disk {self.disk}"


def _label(vm_name: str, vm_id: str) -> str:
    return vm_id if vm_name in ("", vm_id) else f"{vm_name} ({vm_id})"


def _replicas_of(info: PointInfo) -> dict[str, tuple[str, int]]:
    """disk -> (replica path, generation) as the point's record gives them."""
    found: dict[str, tuple[str, int]] = {}
    table = info.meta.get("replica")
    if isinstance(table, dict):
        for disk, entry in table.items():
            if isinstance(entry, dict):
                path, generation = entry.get("path"), entry.get("generation")
                if isinstance(path, str) and isinstance(generation, int):
                    found[disk] = (path, generation)
    return found


class ReplicaWriter(DiskWriter):
    """One replica open for a disk sync: positioned writes, zeros as holes where possible."""

    def __init__(self, target: ReplicaTarget, fd: int, record: ReplicaRecord) -> None:
        self.target = target
        self.fd = fd
        self.path = record.path
        self.kind = record.kind
        self.holds = record.point_id
        self._io = fsutil.UncachedWriter(fd)
        # Its size may have just changed: the first barrier covers that too.
        self._unsynced = True
        self._zeros = bytes(target.chunk_size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self._io.pwrite(memoryview(data), offset)
        except OSError as exc:
            raise self.target.failure(exc, f"cannot write replica {self.path}") from None
        if not self._io.direct:
            fsutil.start_writeback(self.fd, offset, len(data))
        self._unsynced = True

    def write_zeros(self, offset: int, length: int) -> None:
        # A hole in an image file; on a device, zeros the device may write by itself.
        mode = _FALLOC_FL_KEEP_SIZE
        mode |= _FALLOC_FL_PUNCH_HOLE if self.kind == _FILE else _FALLOC_FL_ZERO_RANGE
        result = _libc.fallocate(
            ctypes.c_int(self.fd),
            ctypes.c_int(mode),
            ctypes.c_int64(offset),
            ctypes.c_int64(length),
        )
        if result == 0:
            # Set once done, never before: a barrier that runs between would clear it.
            self._unsynced = True
            return
        code = ctypes.get_errno()
        if code not in _NO_FALLOCATE:
            failure = OSError(code, os.strerror(code))
            raise self.target.failure(failure, f"cannot zero replica {self.path}") from None
        for start in range(offset, offset + length, len(self._zeros)):
            piece = min(len(self._zeros), offset + length - start)
            self.write(start, memoryview(self._zeros)[:piece])

    def sync(self) -> None:
        if not self._unsynced:
            return
        # Cleared first: a write that lands during the flush leaves it set for the next one.
        self._unsynced = False
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self._unsynced = True
            raise TargetError(
                f"replica {self.path}: cannot make it durable: {exc.strerror or exc}; "
                "what was written since the last checkpoint may be lost"
            ) from None

    def close(self, *, durable: bool = True) -> None:
        try:
            if durable:
                self.sync()
        finally:
            self.target.forget_writer(self)
            self._io.close()
            os.close(self.fd)


class ReplicaTarget(Target):
    """Replicas of every disk, their records and the points that committed them.

    Safe to share between processes: a replica is written by one disk task at a time
    (the disk's lease, and an exclusive flock on the replica while it is open); sync()
    covers the replicas this object has open.
    """

    entries_are_places = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        devices: Mapping[tuple[str, str], str] | None = None,
        *,
        create: bool = True,
    ) -> None:
        """Open the target at `directory`, creating it if the directory is missing or empty.

        devices: (VM id or name, disk) -> an existing image file or block device, for the
        disks not kept as images under images/. create=False: a missing target is an error.
        """
        self.root = Path(os.path.realpath(directory))
        self.devices = dict(devices or {})
        fmt = self._open_format(create)
        self.chunk_size = int(fmt["chunk_size"])
        self._writers: set[ReplicaWriter] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ReplicaTarget({str(self.root)!r})"

    # --- format.json -------------------------------------------------------------------
    def _open_format(self, create: bool) -> dict[str, Any]:
        path = self.root / FORMAT_FILE
        if not path.exists():
            if not create:
                raise TargetError(f"no replica target at {self.root} ({FORMAT_FILE} is missing)")
            self._create()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TargetError(f"cannot read replica target format {path}: {exc}") from None
        fmt = _parse_format(data, str(path))
        for sub in _SUBDIRS:
            self._real_dirs(self.root / sub)
        return fmt

    def _create(self) -> None:
        for changed in fsutil.make_dirs(self.root):
            fsutil.fsync_dir(changed)
        names = sorted(os.listdir(self.root))
        if FORMAT_FILE in names:
            return  # another process created it since we looked
        foreign = [n for n in names if n != "lost+found" and not fsutil.TEMPORARY_NAME.match(n)]
        if foreign:
            raise TargetError(
                f"{self.root} is not empty and has no {FORMAT_FILE}: it is not a hamal replica "
                f"target (found {', '.join(foreign[:5])}); refusing to write into it"
            )
        fmt = {
            "format": REPLICA_FORMAT,
            "version": REPLICA_VERSION,
            "chunk_size": CHUNK_SIZE,
            "hash": HASH_NAME,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = self.root / FORMAT_FILE
        tmp = fsutil.temporary_name(path)
        try:
            fsutil.write_atomic(tmp, [json.dumps(fmt, indent=2).encode() + b"\n"])
            # A link, not a rename: of two processes creating it at once, the first wins.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsutil.fsync_dir(self.root)

    def _real_dirs(self, path: Path) -> None:
        """Make `path` (under the root) and its parents, refusing any symbolic link there:
        a link planted in the target's directory would send its writes elsewhere."""
        current = self.root
        for part in path.relative_to(self.root).parts:
            current = current / part
            try:
                os.mkdir(current, 0o750)
                fsutil.fsync_dir(current.parent)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self.failure(exc, f"cannot create {current}") from None
            mode = os.lstat(current).st_mode
            if not stat.S_ISDIR(mode):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
                raise TargetError(
                    f"replica target {self.root}: {current} is {what}; refusing to write "
                    "through it (remove it: hamal makes its own directories)"
                )

    # --- where each disk's replica is ----------------------------------------------------
    def replica_path(self, vm_id: str, vm_name: str, disk: str) -> str:
        """The resolved path of the disk's replica: [replica] devices, else its image."""
        return self._placement(vm_id, vm_name, disk)[0]

    def _placement(self, vm_id: str, vm_name: str, disk: str) -> tuple[str, bool]:
        """(resolved path, whether [replica] devices gives it) of the disk's replica."""
        configured = self.devices.get((vm_id, disk)) or self.devices.get((vm_name, disk))
        if configured:
            return os.path.realpath(configured), True
        return str(self._image_dir(vm_id) / (encode_name(disk) + IMAGE_SUFFIX)), False

    def _image_dir(self, vm_id: str) -> Path:
        return self.root / "images" / encode_name(vm_id)

    def _record_file(self, path: str) -> Path:
        return self.root / "replicas" / f"{blake3.blake3(path.encode()).hexdigest()[:32]}.json"

    def record(self, path: str) -> ReplicaRecord | None:
        """The replica's record, with a commit it lags behind applied; None when it has none."""
        record = self._read_record(path)
        return self._rolled_forward(record) if record is not None else None

    def _read_record(self, path: str) -> ReplicaRecord | None:
        file = self._record_file(path)
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TargetError(f"replica record {file} cannot be read: {exc.strerror}") from None
        with open(fd, "rb") as fh:
            data = fh.read(_MAX_RECORD + 1)
        if len(data) > _MAX_RECORD:
            raise TargetError(f"replica record {file} is too large to be one")
        record = ReplicaRecord.decode(data, str(file))
        if record.path != path:
            raise TargetError(f"replica record {file} is of {record.path}, not {path}")
        return record

    def _rolled_forward(self, record: ReplicaRecord) -> ReplicaRecord:
        """A finalize that died between writing the point and the record left `writing` set
        on a generation that is committed: the point is what counts."""
        if not record.writing:
            return record
        try:
            info = self.point(record.vm_id, record.writing)
        except TargetError:
            return record  # not committed (yet): a write in progress, or a failed one
        placed = _replicas_of(info).get(record.disk)
        if placed is None or placed[0] != record.path:
            return record
        return replace(record, generation=placed[1], point_id=info.point_id, writing="")

    def _save_record(self, record: ReplicaRecord) -> None:
        try:
            fsutil.write_atomic(self._record_file(record.path), [record.encode()])
        except OSError as exc:
            raise self.failure(exc, f"cannot record replica {record.path}") from None

    # --- writing a disk in place ---------------------------------------------------------
    def open_disk_writer(
        self, vm_id: str, vm_name: str, point_id: str, disk: str, size: int, flag: str | None
    ) -> ReplicaWriter:
        """The disk's replica, open for this run: its flag checked, its record saying that
        this run writes it, and sized to the disk. Nothing of a refused replica is touched."""
        path, configured = self._placement(vm_id, vm_name, disk)
        wanted = f"VM {_label(vm_name, vm_id)} disk {disk}"
        fd = self._open_device(path, wanted) if configured else self._open_image(vm_id, disk)
        try:
            try:
                # One writer per replica, even if a paused worker wakes up with it open.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TargetError(
                    f"replica {path} of {wanted} is open for writing by another process"
                ) from None
            status = os.fstat(fd)
            kind = _DEVICE if stat.S_ISBLK(status.st_mode) else _FILE
            record = self.record(path)
            if record is not None and record.identity and flag and record.identity != flag:
                raise DiskFlagMismatch(
                    f"replica {path} belongs to {record.owner}, not {wanted}: its disk flag "
                    f"names source disk {record.identity}, this disk is {flag}; nothing was "
                    f"written to it. Give this disk another replica ([replica] devices), or "
                    f"delete {self._record_file(path)} to let it overwrite that one"
                )
            have = os.lseek(fd, 0, os.SEEK_END)
            if kind == _DEVICE and have < size:
                raise TargetError(
                    f"replica {path} of {wanted} is a block device of {have} bytes, smaller "
                    f"than the disk's {size}: give it a device of at least {size} bytes"
                )
            # Recorded before the first byte: from here on the replica is not whole until a
            # commit, and the flag is this disk's.
            mine = replace(
                record or ReplicaRecord(path, kind, "", "", "", "", 0, "", ""),
                kind=kind,
                vm_id=vm_id,
                vm_name=vm_name,
                disk=disk,
                identity=flag or "",
                writing=point_id,
            )
            self._save_record(mine)
            if kind == _FILE and have != size:
                # Created sparse at the disk's size; grown (or cut) with the disk.
                try:
                    os.ftruncate(fd, size)
                except OSError as exc:
                    raise self.failure(exc, f"cannot size replica {path} to {size}") from None
            writer = ReplicaWriter(self, fd, mine)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._writers.add(writer)
        return writer

    def _open_device(self, path: str, wanted: str) -> int:
        """A block device or image file given in [replica] devices (it may be a link: its
        resolved path is what the record is keyed by)."""
        try:
            # Never O_CREAT: a device or image file given in [replica] devices must exist,
            # or a typo would fill /dev (a RAM file system) with a new file. O_EXCL on a
            # block device: Linux refuses it while the device is mounted or held.
            device = stat.S_ISBLK(os.stat(path).st_mode)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if device else 0))
        except FileNotFoundError:
            raise TargetError(
                f"replica {path} of {wanted} ([replica] devices) does not exist: a block "
                "device or image file given there must exist, hamal never creates it"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise TargetError(
                    f"replica {path} of {wanted} is in use (mounted, or held by the "
                    "kernel); refusing to write into it"
                ) from None
            raise self.failure(exc, f"cannot open replica {path} of {wanted}") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            os.close(fd)
            raise TargetError(
                f"replica {path} of {wanted} is neither a block device nor a regular file"
            )
        return fd

    def _open_image(self, vm_id: str, disk: str) -> int:
        """The disk's image under images/, created if missing; never through a link."""
        directory = self._image_dir(vm_id)
        self._real_dirs(directory)
        name = encode_name(disk) + IMAGE_SUFFIX
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            dir_fd = os.open(directory, flags)
        except OSError as exc:
            raise self.failure(exc, f"cannot open {directory}") from None
        try:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
            except FileNotFoundError:
                create = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL
                fd = os.open(name, create, 0o600, dir_fd=dir_fd)
                os.fsync(dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TargetError(
                    f"replica {directory / name} is a symbolic link; refusing to write "
                    "through it (remove it: hamal makes its own images)"
                ) from None
            raise self.failure(exc, f"cannot open replica {directory / name}") from None
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TargetError(f"replica {directory / name} is not a regular file; refusing it")
        return fd

    def forget_writer(self, writer: ReplicaWriter) -> None:
        with self._lock:
            self._writers.discard(writer)

    def sync(self) -> None:
        """fdatasync every replica this object has open and wrote since the last sync()."""
        with self._lock:
            writers = list(self._writers)
        for writer in writers:
            writer.sync()

    # --- reading a committed point back ---------------------------------------------------
    def why_unrestorable(self, info: PointInfo) -> str:
        problems = (self._unheld(info, disk, brief=True) for disk in sorted(info.disks))
        return "; ".join(problem for problem in problems if problem)

    def _unheld(
        self, info: PointInfo, disk: str, *, brief: bool = False, writing_ok: bool = False
    ) -> str:
        """Why this disk's replica no longer holds the point's copy ("" when it does).

        brief: for a listing, without the paths and points an error message names.
        writing_ok: a replica being written still counts (the next sync's base).
        """
        placed = _replicas_of(info).get(disk)
        if placed is None:
            return f"disk {disk}: the point's record names no replica"
        path, generation = placed
        now = self.replica_path(info.vm_id, info.vm_name, disk)
        if now != path:
            # [replica] devices changed: the new replica does not hold this generation.
            if brief:
                return f"disk {disk}: its replica is {now} now"
            return (
                f"disk {disk}: its replica is {now} now ([replica] devices), not {path}, "
                f"which held this point's generation {generation} and is no longer kept"
            )
        try:
            record = self.record(path)
        except TargetError as exc:
            return f"disk {disk}: {exc}"
        superseded = self._superseded(info, disk, path, generation, record, brief=brief)
        if superseded:
            return superseded
        assert record is not None
        if not record.writing or writing_ok:
            return ""
        if brief:
            return f"disk {disk}: its replica is being written (run {record.writing})"
        return (
            f"disk {disk}: replica {path} is being written by run {record.writing} since "
            f"generation {generation}, and is whole again once a sync commits"
        )

    @staticmethod
    def _superseded(
        info: PointInfo,
        disk: str,
        path: str,
        generation: int,
        record: ReplicaRecord | None,
        *,
        brief: bool = False,
    ) -> str:
        if record is not None and (record.point_id, record.generation) == (
            info.point_id,
            generation,
        ):
            return ""
        if brief:
            held = f"generation {record.generation} only" if record and record.point_id else "none"
            return (
                f"disk {disk}: overwritten in place (the replica holds {held}; "
                f"this point was generation {generation})"
            )
        if record is None or not record.point_id:
            holds = "no committed generation"
        else:
            holds = (
                f"generation {record.generation} only (restore point {record.point_id} of "
                f"{record.owner})"
            )
        return (
            f"disk {disk}: replica {path} holds {holds}; this point's generation "
            f"{generation} was overwritten in place"
        )

    def read_entry(self, vm_id: str, point_id: str, disk: str, index: int, name: bytes) -> bytes:
        info = self.point(vm_id, point_id)
        if disk not in info.disks:
            raise CorruptManifest(f"VM {vm_id} point {point_id} has no disk {disk!r}")
        problem = self._unheld(info, disk)
        if problem:
            raise TargetError(f"VM {vm_id} point {point_id} {problem}")
        path, generation = _replicas_of(info)[disk]
        offset = index * self.chunk_size
        length = min(self.chunk_size, info.disks[disk] - offset)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MissingChunk(f"replica {path} cannot be opened: {exc.strerror}") from None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise CorruptChunk(f"replica {path} ends before offset {offset + length}")
        actual = blake3.blake3(data).digest()
        if actual != name:
            raise CorruptChunk(
                f"replica {path} at offset {offset} does not hold what generation "
                f"{generation} committed there (blake3 {actual.hex()}, expected {name.hex()})"
            )
        return data

    # --- chunks: a replica keeps none -----------------------------------------------------
    def chunk_name(self, content: bytes | bytearray | memoryview) -> bytes:
        return blake3.blake3(content).digest()

    def has_chunk(
        self, name: bytes, length: int, content: bytes | bytearray | memoryview | None = None
    ) -> bool:
        return False

    def put_chunk(self, name: bytes, payload: bytes | memoryview, codec: int, length: int) -> int:
        raise TargetError(
            f"{self!r} stores no chunks: each disk is written in place (open_disk_writer)"
        )

    def get_chunk(self, name: bytes) -> bytes:
        raise MissingChunk(
            f"{self!r} keeps disks, not chunks: chunk {name.hex()} is read at its place"
        )

    def quarantine_chunk(self, name: bytes, reason: str) -> bool:
        return False

    # --- staging and commit ----------------------------------------------------------------
    def _staging_dir(self, vm_id: str, point_id: str) -> Path:
        return self.root / "staging" / encode_name(vm_id) / encode_name(point_id)

    def _point_dir(self, vm_id: str, point_id: str) -> Path:
        return self.root / "points" / encode_name(vm_id) / encode_name(point_id)

    def stage_disk(self, vm_id: str, point_id: str, manifest: DiskManifest) -> None:
        where = f"disk {manifest.disk!r} of VM {vm_id} point {point_id}"
        data = manifest_to_stage(manifest, self.chunk_size, where)
        name = encode_name(manifest.disk) + MANIFEST_SUFFIX
        committed = self._point_dir(vm_id, point_id)
        if (committed / POINT_FILE).exists():
            with contextlib.suppress(OSError):
                if (committed / name).read_bytes() == data:
                    return
            raise TargetError(f"cannot stage {where}: the point is already committed")
        # The manifest names what the replica holds: durable before the manifest is.
        self.sync()
        staging = self._staging_dir(vm_id, point_id)
        self._real_dirs(staging)
        try:
            fsutil.write_atomic(staging / name, [data])
        except OSError as exc:
            raise self.failure(exc, f"cannot stage {where}") from None

    def staged_disks(self, vm_id: str, point_id: str) -> list[str]:
        return sorted(manifest_files(self._staging_dir(vm_id, point_id)))

    def staged_points(self) -> list[StagedPoint]:
        now = time.time()
        found = []
        for vm_id, vm_dir in named_dirs(self.root / "staging"):
            for point_id, directory in named_dirs(vm_dir):
                if (self._point_dir(vm_id, point_id) / POINT_FILE).exists():
                    continue
                age = max(0.0, now - newest_mtime(directory))
                found.append(StagedPoint(vm_id, point_id, age))
        return found

    def discard_point(self, vm_id: str, point_id: str) -> None:
        # The replicas keep what the run wrote, and their records say `writing`: the next
        # sync diffs from the committed generation and covers it (see the module docstring).
        remove_tree(self._staging_dir(vm_id, point_id), "discarded")

    def commit_point(
        self,
        vm_id: str,
        vm_name: str,
        point_id: str,
        created: float,
        disks: Sequence[str],
        meta: dict[str, object],
    ) -> PointInfo:
        """Make the point visible with exactly `disks`, then record each replica's new
        generation (idempotent: a commit cut short between the two is completed here, and
        by any reader meanwhile, see _rolled_forward)."""
        final = self._point_dir(vm_id, point_id)
        if (final / POINT_FILE).exists():
            info = self.point(vm_id, point_id)
            self._settle(info)
            return info
        wanted = sorted(set(disks))
        if not wanted:
            raise TargetError(f"cannot commit VM {vm_id} point {point_id}: no disks given")
        staging = self._staging_dir(vm_id, point_id)
        info = PointInfo(vm_id, vm_name, point_id, float(created), {}, dict(meta))

        def read(disk: str) -> tuple[bytes, str] | None:
            path = staging / (encode_name(disk) + MANIFEST_SUFFIX)
            try:
                return path.read_bytes(), str(path)
            except FileNotFoundError:
                return None

        sizes = staged_sizes(info, wanted, self.chunk_size, read)
        replicas: dict[str, object] = {}
        for disk in wanted:
            path = self.replica_path(vm_id, vm_name, disk)
            record = self.record(path)
            if record is None or (record.writing, record.vm_id, record.disk) != (
                point_id,
                vm_id,
                disk,
            ):
                holder = f"{record.owner}, run {record.writing or 'none'}" if record else "none"
                raise TargetError(
                    f"cannot commit VM {vm_id} point {point_id}: replica {path} of disk {disk} "
                    f"was not written by this run (its record: {holder})"
                )
            replicas[disk] = {"path": path, "generation": record.generation + 1}
        info = replace(info, disks=sizes, meta={**info.meta, "replica": replicas})
        try:
            for disk, path in manifest_files(staging).items():
                if disk not in sizes:
                    path.unlink()
            fsutil.write_atomic(staging / POINT_FILE, [point_record(info)])
            self._real_dirs(final.parent)
            os.rename(staging, final)
            fsutil.fsync_dir(final.parent)
            fsutil.fsync_dir(staging.parent)
        except OSError as exc:
            if (final / POINT_FILE).exists():  # a concurrent finalize committed it first
                return self.point(vm_id, point_id)
            raise self.failure(exc, f"cannot commit VM {vm_id} point {point_id}") from None
        self._settle(info)
        return info

    def _settle(self, info: PointInfo) -> None:
        """Each replica's record: the point's generation committed, no write in progress."""
        for path, generation in _replicas_of(info).values():
            record = self._read_record(path)
            if record is None or record.writing != info.point_id:
                continue  # settled already, or written by a newer run since
            self._save_record(
                replace(record, generation=generation, point_id=info.point_id, writing="")
            )

    # --- committed points -------------------------------------------------------------------
    def point_ids(self, vm_id: str) -> list[str]:
        return sorted(pid for pid, _ in named_dirs(self.root / "points" / encode_name(vm_id)))

    def point(self, vm_id: str, point_id: str) -> PointInfo:
        if point_id != "latest":
            return self._read_point(vm_id, point_id)
        for candidate in reversed(self.point_ids(vm_id)):
            with contextlib.suppress(CorruptManifest):
                return self._read_point(vm_id, candidate)
        raise MissingPoint(f"VM {vm_id} has no readable restore point")

    def scan_points(self, vm_id: str | None = None) -> PointScan:
        points: list[PointInfo] = []
        broken: list[BrokenPoint] = []
        vms = (
            [(vm_id, self.root / "points" / encode_name(vm_id))]
            if vm_id is not None
            else named_dirs(self.root / "points")
        )
        for vm, vm_dir in vms:
            for point_id, _ in named_dirs(vm_dir):
                try:
                    points.append(self._read_point(vm, point_id))
                except CorruptManifest as exc:
                    broken.append(BrokenPoint(vm, point_id, str(exc)))
        points.sort(key=lambda p: (p.created, p.point_id))
        return PointScan(points, broken)

    def _read_point(self, vm_id: str, point_id: str) -> PointInfo:
        directory = self._point_dir(vm_id, point_id)
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
        """The chunk names of the disk at the point's generation; SupersededPoint when the
        replica has been overwritten since (so no sync diffs against it, and no restore
        reads it). A replica being written still gives it: the next sync's base."""
        info = self.point(vm_id, point_id)
        if disk not in info.disks:
            have = ", ".join(sorted(info.disks)) or "none"
            raise TargetError(
                f"restore point {point_id} of VM {vm_id} has no disk {disk!r} (its disks: {have})"
            )
        path = self._point_dir(vm_id, point_id) / (encode_name(disk) + MANIFEST_SUFFIX)
        try:
            manifest = decode_manifest(path.read_bytes(), str(path))
        except OSError as exc:
            raise CorruptManifest(f"manifest {path} cannot be read: {exc}") from None
        if manifest.disk != disk or manifest.chunk_size != self.chunk_size:
            raise CorruptManifest(
                f"manifest {path} is of disk {manifest.disk!r} with chunks of "
                f"{manifest.chunk_size} bytes, expected disk {disk!r} and {self.chunk_size}"
            )
        problem = self._unheld(info, disk, writing_ok=True)
        if problem:
            raise SupersededPoint(f"VM {vm_id} point {point_id} {problem}")
        return manifest

    def delete_point(self, vm_id: str, point_id: str) -> None:
        """Remove a point's record and manifests; its replicas stay as they are."""
        final = self._point_dir(vm_id, point_id)
        if not final.is_dir():
            raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")
        remove_tree(final, "deleted")
        fsutil.fsync_dir(final.parent)

    def save_point_metadata(self, vm_id: str, point_id: str, record: dict[str, object]) -> None:
        directory = self._point_dir(vm_id, point_id)
        try:
            write_metadata(directory, vm_id, point_id, record)
        except OSError as exc:
            raise self.failure(exc, f"cannot write {directory / METADATA_FILE}") from None

    def point_metadata(self, vm_id: str, point_id: str) -> dict[str, object] | None:
        return read_metadata(self._point_dir(vm_id, point_id))

    # --- garbage collection: there are no chunks to collect ---------------------------------
    def iter_chunks(self) -> Iterator[StoredChunk]:
        return iter(())

    def iter_manifests(self, staged: bool) -> Iterator[ManifestDigests]:
        # Manifests keep no chunk alive here: they only check the replicas.
        return iter(())

    def iter_deleted_manifests(self) -> Iterator[ManifestDigests]:
        return iter(())

    def purge_deleted(self, vm_id: str, point_id: str) -> None:
        pass

    def condemn_chunk(self, name: bytes, gc_round: int) -> int:
        return 0

    def revive_chunk(self, name: bytes, gc_round: int) -> bool:
        return False

    def drop_condemned(self, name: bytes, gc_round: int) -> int:
        return 0

    def stored_size(self, name: bytes) -> int | None:
        return None

    def gc_record(self) -> dict[str, object]:
        path = self.root / GC_FILE
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise TargetError(f"garbage collection record {path} is unreadable: {exc}") from None
        return record if isinstance(record, dict) else {}

    def save_gc_record(self, record: dict[str, object]) -> None:
        data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
        try:
            fsutil.write_atomic(self.root / GC_FILE, [data])
        except OSError as exc:
            raise self.failure(exc, "cannot save the garbage collection record") from None

    # --- errors and maintenance -------------------------------------------------------------
    def failure(self, exc: OSError, what: str) -> TargetError:
        """A TargetError naming the target; TargetFull when the file system or quota is full."""
        if fsutil.is_no_room(exc):
            return TargetFull(
                f"replica target {self.root} is full: {what}: {exc.strerror}; "
                "free space where the replica is, then retry"
            )
        return TargetError(f"replica target {self.root}: {what}: {exc.strerror or exc}")

    def sweep_temporary(self, older_than_s: float = 3600.0, *, everywhere: bool = True) -> int:
        """Remove what a write cut short left among the records (never under images/)."""
        now = time.time()
        removed = 0
        tops = ["replicas", "staging", "points"] if everywhere else ["staging"]
        for top in tops:
            for directory, dirs, files in os.walk(self.root / top):
                for name in [*dirs, *files]:
                    if not fsutil.TEMPORARY_NAME.match(name):
                        continue
                    path = Path(directory) / name
                    with contextlib.suppress(FileNotFoundError):
                        if path.lstat().st_mtime > now - older_than_s:
                            continue
                        if name in dirs:
                            dirs.remove(name)
                            remove_tree(path, "deleted")
                        else:
                            path.unlink()
                        removed += 1
        return removed


# --- small file helpers -------------------------------------------------------------------


def _parse_format(data: bytes, where: str) -> dict[str, Any]:
    try:
        fmt = json.loads(data)
    except ValueError as exc:
        raise TargetError(f"cannot read replica target format {where}: {exc}") from None
    kind = fmt.get("format") if isinstance(fmt, dict) else None
    if kind != REPLICA_FORMAT:
        raise TargetError(
            f"{where}: not a hamal replica target (format is {kind!r}, not {REPLICA_FORMAT!r}); "
            "[replica] directory must be a directory of its own"
        )
    version = fmt.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != REPLICA_VERSION:
        newer = isinstance(version, int) and version > REPLICA_VERSION
        why = f"is newer than this reader ({REPLICA_VERSION})" if newer else "is unknown"
        raise TargetError(f"{where}: replica target format version {version!r} {why}")
    if fmt.get("hash") != HASH_NAME:
        raise TargetError(f"{where}: unknown hash {fmt.get('hash')!r} (this reader: blake3)")
    check_chunk_size(fmt.get("chunk_size"), where)
    return fmt


def _open(settings: Any, create: bool) -> ReplicaTarget:
    if getattr(settings.target, "encryption_key_file", ""):
        raise TargetError(
            "[target] encryption_key_file is set, and [target] type is replica: a replica is "
            "the disk itself, kept raw to be attached as it is; encryption is for chunk stores"
        )
    return ReplicaTarget(settings.replica.directory, settings.replica.devices_map(), create=create)


SPEC = TargetSpec(type="replica", open=_open)
