"""The chunk store in an S3-compatible bucket (`[target] type = s3`, `[s3]`).

The same objects as the filesystem store (docs/FORMAT.md), under `[s3] prefix`:

    format.json
    chunks/ab/cd/<64 hex>                         b"HMC1" | codec | payload; metadata length
    chunks/ab/cd/.<64 hex>.condemned.<16 hex>     a chunk garbage collection condemned
    staging/<vm_id>/<point_id>/<disk>.manifest
    points/<vm_id>/<point_id>/<disk>.manifest
    points/<vm_id>/<point_id>/point.json          written last: the point exists iff it does
    points/<vm_id>/<point_id>/metadata.json       the VM and its snapshot (upload_metadata_to_oss)
    gc/deleted/<vm_id>/<point_id>/...             points retention deleted, for the collector
    gc/record.json
    quarantine/<64 hex>.<unix time>               a chunk found damaged, kept aside

S3 has no rename, so the order of writes is what keeps a point whole: a commit copies the
staged manifests into points/, then writes point.json, then drops the staging copies; a
point whose record was never written is not a point (every listing goes by point.json),
and its manifests still keep their chunks from the collector. Every PUT is durable when
it returns, so `sync()` has nothing left to do. A bucket that lost its proxy describes
itself: a new proxy given only `[s3]` lists and restores every point from it.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import blake3

from hamal_workers.targets import TargetSpec, chunk_format
from hamal_workers.targets.base import (
    CHUNK_SIZE,
    BrokenPoint,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    ManifestDigests,
    MissingChunk,
    MissingPoint,
    PointInfo,
    PointScan,
    StagedPoint,
    StoredChunk,
    Target,
    TargetError,
)
from hamal_workers.targets.chunk_format import CHUNK_MAGIC, Buffer
from hamal_workers.targets.chunkstore import (
    FORMAT_FILE,
    FULL_COMPARE_DAYS,
    MANIFEST_SUFFIX,
    METADATA_FILE,
    POINT_FILE,
    compared_in_full,
    configured_cipher,
    decode_name,
    encode_name,
    manifest_to_stage,
    new_format,
    parse_format,
    parse_metadata,
    parse_point_record,
    point_record,
    staged_sizes,
)
from hamal_workers.targets.encryption import ChunkCipher, check_store_key
from hamal_workers.targets.manifest_format import decode_manifest
from hamal_workers.targets.manifest_format import manifest_digests as digests_of
from hamal_workers.targets.objects import Bucket, ObjectError, ObjectMissing

GC_RECORD = "gc/record.json"
_CHUNK_KEY = re.compile(r"^chunks/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})$")
_CONDEMNED_KEY = re.compile(
    r"^chunks/[0-9a-f]{2}/[0-9a-f]{2}/\.([0-9a-f]{64})\.condemned\.([0-9a-f]{16})$"
)


class S3Store(Target):
    """A chunk store in a bucket; safe to share between processes and proxies."""

    def __init__(
        self,
        bucket: Bucket,
        *,
        chunk_size: int | None = None,
        create: bool = True,
        full_compare_days: int = FULL_COMPARE_DAYS,
        cipher: ChunkCipher | None = None,
    ) -> None:
        if full_compare_days < 1:
            raise ValueError(f"full_compare_days must be at least 1, not {full_compare_days}")
        self.bucket = bucket
        self.cipher = cipher
        self.full_compare_days = full_compare_days
        fmt = self._open_format(chunk_size, create)
        self.chunk_size = int(fmt["chunk_size"])

    def __repr__(self) -> str:
        return f"S3Store({self.bucket.where()!r})"

    def _open_format(self, chunk_size: int | None, create: bool) -> dict[str, Any]:
        where = self.bucket.where(FORMAT_FILE)
        try:
            data = self.bucket.get(FORMAT_FILE)
        except ObjectMissing:
            if not create:
                raise TargetError(f"no chunk store at {self.bucket.where()} ({FORMAT_FILE} "
                                  "is missing)") from None  # fmt: skip
            data = self._create(chunk_size if chunk_size is not None else CHUNK_SIZE)
        fmt = parse_format(data, where)
        check_store_key(f"chunk store {self.bucket.where()}", fmt.get("encryption"), self.cipher)
        if chunk_size is not None and chunk_size != fmt["chunk_size"]:
            raise TargetError(
                f"chunk store {self.bucket.where()} uses chunks of {fmt['chunk_size']} bytes, "
                f"not {chunk_size}"
            )
        return fmt

    def _create(self, chunk_size: int) -> bytes:
        self.bucket.check()
        foreign = [o.key for _, o in zip(range(5), self.bucket.list(""), strict=False)]
        if foreign:
            raise TargetError(
                f"{self.bucket.where()} is not empty and has no {FORMAT_FILE}: it is not a "
                f"hamal chunk store (found {', '.join(foreign)}); refusing to write into it"
            )
        data = json.dumps(new_format(chunk_size, self.cipher), indent=2).encode() + b"\n"
        self.bucket.put(FORMAT_FILE, data)
        # Two proxies creating the store at once both wrote a format of the same chunk size
        # unless they were told different ones; whichever landed last is the store's.
        return self.bucket.get(FORMAT_FILE)

    # --- chunks ------------------------------------------------------------------------
    def chunk_name(self, content: Buffer) -> bytes:
        if self.cipher is not None:
            return self.cipher.name(content)
        return blake3.blake3(content).digest()

    @staticmethod
    def chunk_key(name: bytes) -> str:
        hexd = name.hex()
        return f"chunks/{hexd[:2]}/{hexd[2:4]}/{hexd}"

    @staticmethod
    def _condemned_key(name: bytes, gc_round: int) -> str:
        hexd = name.hex()
        return f"chunks/{hexd[:2]}/{hexd[2:4]}/.{hexd}.condemned.{gc_round:016x}"

    def has_chunk(self, name: bytes, length: int, content: Buffer | None = None) -> bool:
        """True only when the object under `name` holds a chunk of `length` raw bytes.

        An object is written whole or not at all, so its size and the length recorded
        with it at the PUT tell a stored chunk from a foreign or truncated object in one
        HEAD. With `content`, on the name's day (`compared_in_full`), it is read and
        compared in full. A damaged one is quarantined and False returned.
        """
        key = self.chunk_key(name)
        info = self.bucket.head(key)
        if info is None:
            return False
        problem = ""
        if info.metadata.get("length") != str(length):
            problem = f"records {info.metadata.get('length')!r} raw bytes, not {length}"
        elif info.size < chunk_format.HEADER_SIZE:
            problem = "is shorter than a chunk header"
        elif content is not None and compared_in_full(
            name, int(time.time() // 86400), self.full_compare_days
        ):
            try:
                if self.get_chunk(name) != bytes(content):
                    problem = "holds other content"
            except CorruptChunk as exc:
                problem = str(exc)
        if problem:
            self.quarantine_chunk(name, problem)
            return False
        return True

    def put_chunk(self, name: bytes, payload: bytes | memoryview, codec: int, length: int) -> int:
        if not 0 < length <= self.chunk_size:
            raise ValueError(f"a chunk of {length} bytes; chunks are at most {self.chunk_size}")
        chunk_format.check_payload(payload, codec, length)
        if self.has_chunk(name, length):
            return 0
        if self.cipher is None:
            body = chunk_format.chunk_header(codec) + bytes(payload)
        else:
            body = b"".join(chunk_format.seal_payload(self.cipher, name, codec, payload))
        self.bucket.put(self.chunk_key(name), body, {"length": str(length)})
        return len(body)

    def get_chunk(self, name: bytes) -> bytes:
        hexd = name.hex()
        key = self.chunk_key(name)
        try:
            data = self.bucket.get(key)
        except ObjectMissing:
            condemned = self._condemned_copies(name)
            if not condemned:
                raise MissingChunk(f"chunk {hexd} is missing: {self.bucket.where(key)}") from None
            key = condemned[0]
            try:
                data = self.bucket.get(key)
            except ObjectMissing:
                raise MissingChunk(f"chunk {hexd} is missing: {self.bucket.where(key)}") from None
        where = self.bucket.where(key)
        header, payload = data[: chunk_format.HEADER_SIZE], data[chunk_format.HEADER_SIZE :]
        if len(header) < chunk_format.HEADER_SIZE or header[:4] != CHUNK_MAGIC:
            raise CorruptChunk(f"chunk {hexd} is corrupt: {where} is truncated or not a chunk")
        if len(payload) > chunk_format.max_payload(self.chunk_size):
            raise CorruptChunk(f"chunk {hexd} is corrupt: {where} is larger than any chunk")
        try:
            content = chunk_format.decode_payload(
                header[4], payload, self.chunk_size, name, self.cipher
            )
        except ValueError as exc:
            raise CorruptChunk(f"chunk {hexd} is corrupt: {where} {exc}") from None
        actual = self.chunk_name(content)
        if actual != name:
            raise CorruptChunk(
                f"chunk {hexd} is corrupt: {where} holds content that hashes to {actual.hex()}"
            )
        return content

    def _condemned_copies(self, name: bytes) -> list[str]:
        hexd = name.hex()
        prefix = f"chunks/{hexd[:2]}/{hexd[2:4]}/.{hexd}.condemned."
        return [o.key for o in self.bucket.list(prefix)]

    def quarantine_chunk(self, name: bytes, reason: str) -> bool:
        key = self.chunk_key(name)
        aside = f"quarantine/{name.hex()}.{int(time.time())}"
        try:
            self.bucket.copy(key, aside)
        except ObjectMissing:
            return False
        with contextlib.suppress(ObjectError):
            self.bucket.put(aside + ".reason", reason.encode()[:1024])
        self.bucket.delete([key])
        return True

    # --- staging -----------------------------------------------------------------------
    @staticmethod
    def _staging(vm_id: str, point_id: str) -> str:
        return f"staging/{encode_name(vm_id)}/{encode_name(point_id)}/"

    @staticmethod
    def _point(vm_id: str, point_id: str) -> str:
        return f"points/{encode_name(vm_id)}/{encode_name(point_id)}/"

    @staticmethod
    def _manifest_name(disk: str) -> str:
        return encode_name(disk) + MANIFEST_SUFFIX

    def stage_disk(self, vm_id: str, point_id: str, manifest: DiskManifest) -> None:
        where = f"disk {manifest.disk!r} of VM {vm_id} point {point_id}"
        data = manifest_to_stage(manifest, self.chunk_size, where)
        name = self._manifest_name(manifest.disk)
        committed = self._point(vm_id, point_id)
        if self.bucket.head(committed + POINT_FILE) is not None:
            # A redelivered disk task after the commit: fine if it brings the same manifest.
            with contextlib.suppress(ObjectError):
                if self.bucket.get(committed + name) == data:
                    return
            raise TargetError(f"cannot stage {where}: the point is already committed")
        self.bucket.put(self._staging(vm_id, point_id) + name, data)

    def _manifest_keys(self, prefix: str) -> dict[str, str]:
        """disk -> key of every manifest directly under prefix."""
        found = {}
        for child in self.bucket.children(prefix):
            if child.endswith(MANIFEST_SUFFIX):
                disk = decode_name(child[: -len(MANIFEST_SUFFIX)])
                if disk is not None:
                    found[disk] = prefix + child
        return found

    def staged_disks(self, vm_id: str, point_id: str) -> list[str]:
        return sorted(self._manifest_keys(self._staging(vm_id, point_id)))

    def staged_points(self) -> list[StagedPoint]:
        now = time.time()
        newest: dict[tuple[str, str], float] = {}
        for obj in self.bucket.list("staging/"):
            parts = obj.key.split("/")
            if len(parts) != 4:
                continue
            vm_id, point_id = decode_name(parts[1]), decode_name(parts[2])
            if vm_id is None or point_id is None:
                continue
            key = (vm_id, point_id)
            newest[key] = max(newest.get(key, 0.0), obj.modified)
        found = []
        for (vm_id, point_id), modified in sorted(newest.items()):
            if self.bucket.head(self._point(vm_id, point_id) + POINT_FILE) is not None:
                continue  # a late stage after its commit: not a point of its own
            found.append(StagedPoint(vm_id, point_id, max(0.0, now - modified)))
        return found

    def discard_point(self, vm_id: str, point_id: str) -> None:
        self.bucket.delete(o.key for o in list(self.bucket.list(self._staging(vm_id, point_id))))
        # A commit cut short before its record: its copies in points/ go too.
        final = self._point(vm_id, point_id)
        if self.bucket.head(final + POINT_FILE) is None:
            self.bucket.delete(o.key for o in list(self.bucket.list(final)))

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
        """Copy the staged manifests into points/, then write point.json: idempotent."""
        final = self._point(vm_id, point_id)
        if self.bucket.head(final + POINT_FILE) is not None:
            return self.point(vm_id, point_id)
        wanted = sorted(set(disks))
        if not wanted:
            raise TargetError(f"cannot commit VM {vm_id} point {point_id}: no disks given")
        info = PointInfo(vm_id, vm_name, point_id, float(created), {}, dict(meta))
        staging = self._staging(vm_id, point_id)
        info = replace(info, disks=self._staged_sizes(staging, info, wanted))
        for disk in wanted:
            name = self._manifest_name(disk)
            self.bucket.copy(staging + name, final + name)
        self.bucket.put(final + POINT_FILE, point_record(info))
        self.bucket.delete(o.key for o in list(self.bucket.list(staging)))
        return info

    def _staged_sizes(self, staging: str, info: PointInfo, disks: list[str]) -> dict[str, int]:
        def read(disk: str) -> tuple[bytes, str] | None:
            key = staging + self._manifest_name(disk)
            try:
                return self.bucket.get(key), self.bucket.where(key)
            except ObjectMissing:
                return None

        return staged_sizes(info, disks, self.chunk_size, read)

    # --- committed points --------------------------------------------------------------
    def _records(self, vm_id: str | None) -> Iterator[tuple[str, str]]:
        """(vm_id, point_id) of every point record, in key order."""
        top = f"points/{encode_name(vm_id)}/" if vm_id is not None else "points/"
        for obj in self.bucket.list(top):
            parts = obj.key.split("/")
            if len(parts) == 4 and parts[3] == POINT_FILE:
                vm, point = decode_name(parts[1]), decode_name(parts[2])
                if vm is not None and point is not None:
                    yield vm, point

    def point_ids(self, vm_id: str) -> list[str]:
        return sorted(point for _, point in self._records(vm_id))

    def point(self, vm_id: str, point_id: str) -> PointInfo:
        if point_id != "latest":
            return self._read_point(vm_id, point_id)
        for candidate in reversed(self.point_ids(vm_id)):
            with contextlib.suppress(CorruptManifest, MissingPoint):
                return self._read_point(vm_id, candidate)
        raise MissingPoint(f"VM {vm_id} has no readable restore point")

    def save_point_metadata(self, vm_id: str, point_id: str, record: dict[str, object]) -> None:
        prefix = self._point(vm_id, point_id)
        if self.bucket.head(prefix + POINT_FILE) is None:
            raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")
        data = json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"
        self.bucket.put(prefix + METADATA_FILE, data)

    def point_metadata(self, vm_id: str, point_id: str) -> dict[str, object] | None:
        key = self._point(vm_id, point_id) + METADATA_FILE
        try:
            data = self.bucket.get(key)
        except ObjectMissing:
            return None
        return parse_metadata(data, self.bucket.where(key))

    def scan_points(self, vm_id: str | None = None) -> PointScan:
        points: list[PointInfo] = []
        broken: list[BrokenPoint] = []
        for vm, point_id in self._records(vm_id):
            try:
                points.append(self._read_point(vm, point_id))
            except CorruptManifest as exc:
                broken.append(BrokenPoint(vm, point_id, str(exc)))
            except MissingPoint:
                continue  # deleted since the listing
        points.sort(key=lambda p: (p.created, p.point_id))
        return PointScan(points, broken)

    def _read_point(self, vm_id: str, point_id: str) -> PointInfo:
        key = self._point(vm_id, point_id) + POINT_FILE
        try:
            record = json.loads(self.bucket.get(key))
        except ObjectMissing:
            raise MissingPoint(f"VM {vm_id} has no restore point {point_id}") from None
        except ValueError as exc:
            raise CorruptManifest(
                f"restore point record {self.bucket.where(key)} is unreadable: {exc}"
            ) from None
        try:
            return parse_point_record(record, vm_id, point_id)
        except ValueError as exc:
            raise CorruptManifest(f"restore point record {self.bucket.where(key)}: {exc}") from None

    def manifest(self, vm_id: str, point_id: str, disk: str) -> DiskManifest:
        key = self._point(vm_id, point_id) + self._manifest_name(disk)
        try:
            data = self.bucket.get(key)
        except ObjectMissing:
            info = self._read_point(vm_id, point_id)  # MissingPoint when there is none
            if disk in info.disks:
                raise CorruptManifest(
                    f"manifest {self.bucket.where(key)} is missing, yet {POINT_FILE} lists the disk"
                ) from None
            have = ", ".join(sorted(info.disks)) or "none"
            raise TargetError(
                f"restore point {point_id} of VM {vm_id} has no disk {disk!r} (its disks: {have})"
            ) from None
        manifest = decode_manifest(data, self.bucket.where(key))
        if manifest.disk != disk or manifest.chunk_size != self.chunk_size:
            raise CorruptManifest(
                f"manifest {self.bucket.where(key)} is of disk {manifest.disk!r} with chunks "
                f"of {manifest.chunk_size} bytes, expected disk {disk!r} and {self.chunk_size}"
            )
        return manifest

    def delete_point(self, vm_id: str, point_id: str) -> None:
        """Copies to gc/deleted/, then the record goes (the point vanishes), then the rest."""
        final = self._point(vm_id, point_id)
        if self.bucket.head(final + POINT_FILE) is None:
            raise MissingPoint(f"VM {vm_id} has no restore point {point_id}")
        deleted = self._deleted(vm_id, point_id)
        keys = [o.key for o in self.bucket.list(final)]
        for key in keys:
            self.bucket.copy(key, deleted + key[len(final) :])
        self.bucket.delete([final + POINT_FILE])
        self.bucket.delete(k for k in keys if not k.endswith(POINT_FILE))

    @staticmethod
    def _deleted(vm_id: str, point_id: str) -> str:
        return f"gc/deleted/{encode_name(vm_id)}/{encode_name(point_id)}/"

    def iter_deleted_manifests(self) -> Iterator[ManifestDigests]:
        for vm_id, point_id, disk, key in self._manifest_tree("gc/deleted/"):
            try:
                digests = digests_of(self.bucket.get(key), self.bucket.where(key))
            except (ObjectError, CorruptManifest):
                continue  # only for telling whose chunks went; nothing depends on it
            yield ManifestDigests(vm_id, point_id, disk, digests)

    def purge_deleted(self, vm_id: str, point_id: str) -> None:
        prefix = self._deleted(vm_id, point_id)
        self.bucket.delete(o.key for o in list(self.bucket.list(prefix)))

    # --- garbage collection ------------------------------------------------------------
    def iter_chunks(self) -> Iterator[StoredChunk]:
        for obj in self.bucket.list("chunks/"):
            modified = obj.modified
            if match := _CHUNK_KEY.match(obj.key):
                yield StoredChunk(bytes.fromhex(match.group(1)), 0, lambda m=modified: m)
            elif match := _CONDEMNED_KEY.match(obj.key):
                gc_round = int(match.group(2), 16)
                name = bytes.fromhex(match.group(1))
                yield StoredChunk(name, gc_round, lambda m=modified: m)

    def iter_manifests(self, staged: bool) -> Iterator[ManifestDigests]:
        for vm_id, point_id, disk, key in self._manifest_tree("staging/" if staged else "points/"):
            try:
                data = self.bucket.get(key)
            except ObjectMissing:
                continue  # committed or deleted since the listing: read where it went
            except ObjectError as exc:
                raise CorruptManifest(f"manifest {key} cannot be read: {exc}") from None
            yield ManifestDigests(vm_id, point_id, disk, digests_of(data, self.bucket.where(key)))

    def _manifest_tree(self, top: str) -> Iterator[tuple[str, str, str, str]]:
        for obj in list(self.bucket.list(top)):
            parts = obj.key[len(top) :].split("/")
            if len(parts) != 3 or not parts[2].endswith(MANIFEST_SUFFIX):
                continue
            vm_id, point_id = decode_name(parts[0]), decode_name(parts[1])
            disk = decode_name(parts[2][: -len(MANIFEST_SUFFIX)])
            if vm_id is not None and point_id is not None and disk is not None:
                yield vm_id, point_id, disk, obj.key

    def condemn_chunk(self, name: bytes, gc_round: int) -> int:
        key = self.chunk_key(name)
        info = self.bucket.head(key)
        if info is None:
            return 0
        self.bucket.copy(key, self._condemned_key(name, gc_round))
        self.bucket.delete([key])
        return info.size

    def revive_chunk(self, name: bytes, gc_round: int) -> bool:
        condemned = self._condemned_key(name, gc_round)
        if self.bucket.head(condemned) is None:
            return False
        key = self.chunk_key(name)
        if self.bucket.head(key) is None:  # a copy put again meanwhile stays
            self.bucket.copy(condemned, key)
        self.bucket.delete([condemned])
        return True

    def drop_condemned(self, name: bytes, gc_round: int) -> int:
        condemned = self._condemned_key(name, gc_round)
        info = self.bucket.head(condemned)
        if info is None:
            return 0
        self.bucket.delete([condemned])
        return info.size

    def stored_size(self, name: bytes) -> int | None:
        info = self.bucket.head(self.chunk_key(name))
        if info is not None:
            return info.size
        for key in self._condemned_copies(name):
            found = self.bucket.head(key)
            if found is not None:
                return found.size
        return None

    def gc_record(self) -> dict[str, object]:
        try:
            record = json.loads(self.bucket.get(GC_RECORD))
        except ObjectMissing:
            return {}
        except ValueError as exc:
            raise TargetError(
                f"garbage collection record {self.bucket.where(GC_RECORD)} is unreadable: {exc}"
            ) from None
        if not isinstance(record, dict):
            raise TargetError(f"garbage collection record {self.bucket.where(GC_RECORD)} is "
                              "not a JSON object")  # fmt: skip
        return record

    def save_gc_record(self, record: dict[str, object]) -> None:
        data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
        self.bucket.put(GC_RECORD, data)

    # --- durability --------------------------------------------------------------------
    def sync(self) -> None:
        """Nothing left to do: every PUT this object made was durable when it returned."""


def _open(settings: Any, create: bool) -> S3Store:
    bucket = Bucket(settings.s3, pool=settings.target.writers)
    return S3Store(
        bucket,
        create=create,
        full_compare_days=settings.target.full_compare_days,
        cipher=configured_cipher(settings),
    )


SPEC = TargetSpec(type="s3", open=_open)
