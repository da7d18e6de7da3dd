"""What every target offers the engine, the tasks and the `hamal` command.

A target stores restore points. A restore point is every disk of one VM at one
snapshot; each disk is a manifest that maps chunk index -> chunk name (or "zero").
Chunks are fixed-size pieces of the disk at absolute offsets, named by the target
(`chunk_name`: blake3 of the raw content today, a keyed hash once chunks are
encrypted), so the same chunk put twice is stored once and an incremental point only
adds the chunks that changed.

The life of a point, which spans several Celery tasks on several workers:

    disk task:  put_chunk ... (each chunk durable before its name appears)
                sync()        (the barrier: directories and anything else this object wrote)
                -> checkpoint in Redis
                stage_disk    (the disk's manifest, durable, invisible to readers)
    finalize:   commit_point(disks=[every disk of the run])
                             (refused, naming the disks, when one is not staged and readable)

A point that was not committed does not exist. Commit relies on neither a rename
nor a directory listing: it is given the disks the point must have, and a point
exists once its record is written (the filesystem store may still use a rename
internally; an object store writes the record last).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

DIGEST_SIZE = 32
CHUNK_SIZE = 4 * 1024 * 1024

# Codecs of a stored chunk payload. The name is always of the raw content.
CODEC_RAW = 0
CODEC_ZSTD = 1


class TargetError(Exception):
    """A target could not do what was asked; the message says what and where."""


class TargetFull(TargetError):
    """The target has no room (ENOSPC, EDQUOT): nothing partial was left behind."""


class MissingPoint(TargetError):
    """No committed restore point with that VM and id."""


class CorruptManifest(TargetError):
    """A manifest that is truncated, altered, or of a format this reader does not know."""


class MissingChunk(TargetError):
    """A manifest names a chunk the store does not hold."""


class CorruptChunk(TargetError):
    """A chunk whose content does not hash to its name, or that cannot be decoded."""


class MissingStagedDisk(TargetError):
    """Commit was refused: these disks of the point are not staged, or not readable."""

    def __init__(self, message: str, disks: Sequence[str]) -> None:
        super().__init__(message)
        self.disks = tuple(disks)

    def __reduce__(self) -> tuple[object, ...]:
        # Celery pickles nothing, but a multiprocessing pool may: keep the disks.
        return (type(self), (str(self), self.disks))


@dataclass(frozen=True)
class DiskManifest:
    """One disk of one restore point: entry i covers bytes [i*chunk_size, (i+1)*chunk_size)."""

    disk: str
    size: int
    chunk_size: int
    # None means the chunk is all zeros (or a hole): nothing is stored for it.
    entries: list[bytes | None]

    @property
    def chunk_count(self) -> int:
        return len(self.entries)

    def stored_digests(self) -> Iterator[bytes]:
        return (d for d in self.entries if d is not None)


@dataclass(frozen=True)
class PointInfo:
    """A committed restore point."""

    vm_id: str
    vm_name: str
    point_id: str
    created: float  # unix time of the snapshot the point was taken from
    disks: dict[str, int]  # disk name -> size in bytes
    # Free-form, JSON: the platform, its snapshot id, and per disk its change token
    # (meta["tokens"][disk]) -- what the next incremental diffs from.
    meta: dict[str, object] = field(default_factory=dict)

    def token(self, disk: str) -> str:
        """The disk's change token at this point's snapshot ("" when the platform gave none)."""
        tokens = self.meta.get("tokens")
        value = tokens.get(disk) if isinstance(tokens, dict) else None
        return value if isinstance(value, str) else ""

    def flag(self, disk: str) -> str:
        """The disk flag: which source disk this point's copy of `disk` came from ("" = none)."""
        flags = self.meta.get("flags")
        value = flags.get(disk) if isinstance(flags, dict) else None
        return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class BrokenPoint:
    """A committed point whose record cannot be read: listed so it is never silently hidden."""

    vm_id: str
    point_id: str
    problem: str


@dataclass(frozen=True)
class PointScan:
    """What a listing found: the readable points (oldest first) and the broken ones."""

    points: list[PointInfo]
    broken: list[BrokenPoint]


@dataclass(frozen=True)
class StagedPoint:
    """A point with staged disks that was never committed (for the sweep of leftovers)."""

    vm_id: str
    point_id: str
    age_s: float  # seconds since its newest staged disk was written


@dataclass(frozen=True)
class StoredChunk:
    """One entry of the chunk listing that garbage collection walks (hamal_workers/gc.py)."""

    name: bytes
    # 0 for a chunk under its name; N for a copy that garbage collection round N condemned.
    condemned: int
    # Unix time it was written (or condemned); a call, since a listing may not carry it.
    modified: Callable[[], float]


@dataclass(frozen=True)
class ManifestDigests:
    """The entries of one stored manifest as written: count x DIGEST_SIZE bytes, zeros for holes."""

    vm_id: str
    point_id: str
    disk: str
    digests: bytes | memoryview


class DiskWriter(ABC):
    """A disk the target keeps as a disk (a raw replica), updated in place by the engine.

    The engine writes every chunk it reads at its offset, zeros included, from its reader
    threads (thread-safe); the target's sync() makes those writes durable before any
    checkpoint names them. close(durable=True) also makes durable what is left, so a
    disk whose chunks were all resumed from a checkpoint still ends on stable storage.
    """

    # The restore point whose copy of the disk the target holds ("" = none): a sync that
    # reads only what changed since another point would leave the rest of it wrong.
    holds: str = ""

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def write_zeros(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros (a hole where the file allows)."""

    @abstractmethod
    def close(self, *, durable: bool = True) -> None: ...

    def __enter__(self) -> DiskWriter:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        # After an error nothing more needs to last: the checkpoint only names what a
        # barrier covered, and flushing a failing device would hide the first error.
        self.close(durable=exc is None)


class Target(ABC):
    """A store of restore points: targets/chunkstore.py (filesystem), targets/s3store.py (S3),
    targets/replica.py (raw replicas, written in place: no chunks)."""

    chunk_size: int = CHUNK_SIZE

    # --- naming ---------------------------------------------------------------
    @abstractmethod
    def chunk_name(self, content: bytes | bytearray | memoryview) -> bytes:
        """The DIGEST_SIZE-byte name of a chunk with this raw content. Thread-safe."""

    # --- chunks ---------------------------------------------------------------
    @abstractmethod
    def has_chunk(
        self, name: bytes, length: int, content: bytes | bytearray | memoryview | None = None
    ) -> bool:
        """True only when an intact chunk of `length` raw bytes is stored under `name`.

        Dedup asks this before it reuses a chunk, so it never takes existence for
        content: at least the header and the length are checked, and with `content`
        (the raw bytes the caller holds, which hash to `name`) the stored chunk is
        compared in full where that is cheap (the filesystem store: each name on one day
        in seven, docs/FORMAT.md). A damaged chunk is quarantined (moved out of the way,
        so the next put stores it again) and False is returned. `length` must be
        len(content): a correct caller never asks for another length under a name.
        """

    @abstractmethod
    def put_chunk(self, name: bytes, payload: bytes | memoryview, codec: int, length: int) -> int:
        """Store a chunk (idempotent); return the bytes written, 0 if it was already there.

        `length` is the raw content's length. The name appears only once the whole
        chunk is durable: a crash or a write-back error never leaves a named chunk
        that is empty or short. TargetFull when there is no room, with no partial file.
        """

    @abstractmethod
    def get_chunk(self, name: bytes) -> bytes:
        """The raw content of a chunk, verified against its name.

        A chunk garbage collection has condemned (and not dropped) still reads: a point
        committed while its chunk was condemned restores before the next round revives it.
        """

    @abstractmethod
    def quarantine_chunk(self, name: bytes, reason: str) -> bool:
        """Move a damaged chunk out of the way so that the next put stores it again.

        True when something was moved. The damaged copy is kept aside for a while for
        inspection, never read as a chunk again.
        """

    # --- points ---------------------------------------------------------------
    @abstractmethod
    def stage_disk(self, vm_id: str, point_id: str, manifest: DiskManifest) -> None:
        """Keep a disk's manifest for a point not committed yet: durable, idempotent.

        Durable together with every chunk put through this object before it (it runs
        the barrier first): a staged manifest never names a chunk a crash could lose,
        even when the commit runs in another process, whose sync() cannot cover them.
        """

    @abstractmethod
    def staged_disks(self, vm_id: str, point_id: str) -> list[str]: ...

    @abstractmethod
    def staged_points(self) -> list[StagedPoint]:
        """Every point with staged disks that is not committed (the sweep removes leftovers)."""

    @abstractmethod
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

        MissingStagedDisk, naming them, when any of `disks` has no staged manifest or
        one that cannot be read; nothing becomes visible then.
        """

    @abstractmethod
    def discard_point(self, vm_id: str, point_id: str) -> None:
        """Forget a point that was staged but will never be committed."""

    @abstractmethod
    def delete_point(self, vm_id: str, point_id: str) -> None:
        """Remove a committed point (retention), at once. Its chunks stay: others may share
        them, and garbage collection frees those nothing names; its manifests stay out of
        sight (iter_deleted_manifests) until the collector has read whose chunks it frees."""

    @abstractmethod
    def point_ids(self, vm_id: str) -> list[str]:
        """Ids of the VM's committed points, oldest first, without reading their records.

        Cheap even with thousands of points: the engine walks it newest first to find
        the base of an incremental.
        """

    @abstractmethod
    def scan_points(self, vm_id: str | None = None) -> PointScan:
        """Every committed point (oldest first); a point whose record is broken is reported."""

    @abstractmethod
    def point(self, vm_id: str, point_id: str) -> PointInfo:
        """A committed point by id, or its newest readable one for point_id == "latest".

        MissingPoint when there is none; CorruptManifest when its record is broken.
        """

    @abstractmethod
    def manifest(self, vm_id: str, point_id: str, disk: str) -> DiskManifest: ...

    # --- metadata beside a point ([sync] upload_metadata_to_oss) ----------------------
    def save_point_metadata(self, vm_id: str, point_id: str, record: dict[str, object]) -> None:
        """Keep `record` (JSON) beside a committed point, durably; MissingPoint without one.

        Deleted with the point. A target that cannot keep it says so.
        """
        raise TargetError(f"{self!r} keeps no metadata beside its restore points")

    def point_metadata(self, vm_id: str, point_id: str) -> dict[str, object] | None:
        """The record save_point_metadata kept beside the point, or None."""
        return None

    # --- garbage collection (hamal_workers/gc.py, docs/GC.md) -----------------
    @abstractmethod
    def iter_chunks(self) -> Iterator[StoredChunk]:
        """Every chunk and every condemned copy, streamed: memory does not grow with the store."""

    @abstractmethod
    def iter_manifests(self, staged: bool) -> Iterator[ManifestDigests]:
        """Every committed (staged=False) or staged manifest, from the manifests themselves.

        Whatever a point record says, every manifest there is counts, so a point whose
        record is damaged still keeps its chunks. CorruptManifest for one that cannot be
        read: the collector then deletes nothing.
        """

    @abstractmethod
    def iter_deleted_manifests(self) -> Iterator[ManifestDigests]:
        """Manifests of points delete_point removed and purge_deleted has not purged yet.

        The collector reads them only to tell whose deletion freed a chunk; they keep
        nothing alive. A manifest that cannot be read is skipped.
        """

    @abstractmethod
    def purge_deleted(self, vm_id: str, point_id: str) -> None:
        """Forget a deleted point's manifests for good (after the collector read them)."""

    @abstractmethod
    def condemn_chunk(self, name: bytes, gc_round: int) -> int:
        """Take a chunk out of reach of has_chunk and put_chunk, atomically.

        The bytes it takes (0 when it was not there). The condemned copy stays readable
        by get_chunk until drop_condemned or revive_chunk.
        """

    @abstractmethod
    def revive_chunk(self, name: bytes, gc_round: int) -> bool:
        """Put a condemned copy back under its name, durably; True if there was one."""

    @abstractmethod
    def drop_condemned(self, name: bytes, gc_round: int) -> int:
        """Delete a condemned copy for good; the bytes that freed (0 if it was gone)."""

    @abstractmethod
    def stored_size(self, name: bytes) -> int | None:
        """The bytes a chunk takes in the store (its condemned copy if that is all), or None."""

    @abstractmethod
    def gc_record(self) -> dict[str, object]:
        """The collector's record kept in the store: its published round and last pass."""

    @abstractmethod
    def save_gc_record(self, record: dict[str, object]) -> None:
        """Replace the collector's record, durably and all at once."""

    # --- durability and room ------------------------------------------------
    @abstractmethod
    def sync(self) -> None:
        """Durability barrier over exactly what this object wrote: never a whole filesystem.

        Once it returns, everything put or staged through this object (from any thread)
        survives a power loss.
        """

    def free_bytes(self) -> int | None:
        """Room left for new chunks, or None when the target cannot tell (object stores)."""
        return None

    # --- disks kept as disks (targets/replica.py) -----------------------------
    # A chunk store keeps one copy of each name, so verify reads each distinct name once;
    # a raw replica keeps every entry at its own place, so verify reads every entry.
    entries_are_places: bool = False

    def open_disk_writer(
        self, vm_id: str, vm_name: str, point_id: str, disk: str, size: int, flag: str | None
    ) -> DiskWriter | None:
        """The writer a disk sync writes every chunk through, or None (chunk stores).

        flag: which source disk this is (the disk flag), checked against the one the
        target keeps before anything is written; None when the disk carries no flag.
        """
        return None

    def read_entry(self, vm_id: str, point_id: str, disk: str, index: int, name: bytes) -> bytes:
        """The raw content of entry `index` of a committed disk, checked against `name`."""
        return self.get_chunk(name)

    def why_unrestorable(self, info: PointInfo) -> str:
        """Why a committed point's data is no longer held ("" when it is): a raw replica
        holds only its newest generation. Such a point is listed, never restored or verified."""
        return ""

    # --- derived --------------------------------------------------------------
    def points(self, vm_id: str | None = None) -> list[PointInfo]:
        """Readable committed points, oldest first (broken ones are left out: see scan_points)."""
        return self.scan_points(vm_id).points
