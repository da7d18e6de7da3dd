"""The filesystem chunk store: chunks, the life of a point, names, format versions, crashes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import time
from pathlib import Path

import blake3
import pytest
import zstandard

from hamal_workers.targets import chunkstore
from hamal_workers.targets.base import (
    CHUNK_SIZE,
    CODEC_RAW,
    CODEC_ZSTD,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    MissingChunk,
    MissingPoint,
    TargetError,
)
from hamal_workers.targets.chunkstore import (
    CHUNK_MAGIC,
    ChunkStore,
    decode_name,
    encode_name,
)

CS = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "store", chunk_size=CS)


def put(store: ChunkStore, content: bytes, codec: int = CODEC_RAW) -> bytes:
    digest = blake3.blake3(content).digest()
    payload = zstandard.ZstdCompressor().compress(content) if codec == CODEC_ZSTD else content
    store.put_chunk(digest, payload, codec)
    return digest


def stage(store: ChunkStore, vm: str, point: str, disk: str = "sda", chunks: int = 2) -> None:
    entries: list[bytes | None] = [put(store, f"{vm}/{point}/{i}".encode()) for i in range(chunks)]
    store.stage_disk(vm, point, DiskManifest(disk, chunks * CS, CS, entries))


# --- format.json ----------------------------------------------------------------------


def test_a_new_store_records_its_format(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "new")
    fmt = json.loads((tmp_path / "new" / "format.json").read_text())
    assert fmt["format"] == "hamal-chunkstore" and fmt["version"] == 1
    assert fmt["chunk_size"] == CHUNK_SIZE == store.chunk_size and fmt["hash"] == "blake3"


def test_reopening_keeps_the_stores_chunk_size(tmp_path: Path) -> None:
    ChunkStore(tmp_path / "s", chunk_size=CS)
    assert ChunkStore(tmp_path / "s").chunk_size == CS
    with pytest.raises(TargetError, match=f"uses chunks of {CS} bytes"):
        ChunkStore(tmp_path / "s", chunk_size=CHUNK_SIZE)


def test_a_newer_store_version_is_refused(tmp_path: Path) -> None:
    ChunkStore(tmp_path / "s", chunk_size=CS)
    path = tmp_path / "s" / "format.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 2}))
    with pytest.raises(TargetError, match="format version 2 is newer than this reader"):
        ChunkStore(tmp_path / "s")


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "format.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(TargetError, match="not a hamal chunk store"):
        ChunkStore(tmp_path / "s")


def test_a_directory_with_other_data_is_not_made_a_store(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("x")
    with pytest.raises(TargetError, match="not empty"):
        ChunkStore(tmp_path / "s")
    assert not (tmp_path / "s" / "format.json").exists()


def test_create_false_refuses_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no chunk store"):
        ChunkStore(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("size", [1000, 3 * 65536, 2**27])
def test_unusable_chunk_sizes_are_refused(tmp_path: Path, size: int) -> None:
    with pytest.raises(TargetError, match="power of two"):
        ChunkStore(tmp_path / "s", chunk_size=size)


# --- chunks ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_put_get_round_trip(store: ChunkStore, codec: int) -> None:
    content = os.urandom(CS // 2) + bytes(CS // 2)
    digest = put(store, content, codec)
    assert store.has_chunk(digest)
    assert store.get_chunk(digest) == content
    raw = store.chunk_path(digest).read_bytes()
    assert raw[:4] == CHUNK_MAGIC and raw[4] == codec
    assert store.chunk_path(digest).parent.parent.name == digest.hex()[:2]


def test_put_returns_bytes_written(store: ChunkStore) -> None:
    content = b"hello"
    digest = blake3.blake3(content).digest()
    assert store.put_chunk(digest, content, CODEC_RAW) == len(content) + 5


def test_put_is_idempotent(store: ChunkStore) -> None:
    content = os.urandom(1000)
    digest = put(store, content)
    path = store.chunk_path(digest)
    before = path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino
    compressed = zstandard.ZstdCompressor().compress(content)
    assert store.put_chunk(digest, compressed, CODEC_ZSTD) == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_missing_chunk_names_chunk_and_path(store: ChunkStore) -> None:
    digest = blake3.blake3(b"never stored").digest()
    with pytest.raises(MissingChunk) as err:
        store.get_chunk(digest)
    assert digest.hex() in str(err.value) and str(store.chunk_path(digest)) in str(err.value)
    assert not store.has_chunk(digest)


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_a_flipped_byte_is_detected(store: ChunkStore, codec: int) -> None:
    digest = put(store, os.urandom(CS), codec)
    path = store.chunk_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptChunk) as err:
        store.get_chunk(digest)
    assert digest.hex() in str(err.value) and str(path) in str(err.value)
    assert "corrupt" in str(err.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:3],  # truncated inside the header
        lambda b: b"XXXX" + b[4:],  # bad magic
        lambda b: b[:4] + bytes([7]) + b[5:],  # unknown codec
        lambda b: b[:4] + bytes([CODEC_ZSTD]) + b[5:],  # raw bytes labelled zstd
        lambda b: b + os.urandom(70 * 1024),  # bigger than any chunk
    ],
)
def test_damaged_chunk_files_are_refused(store: ChunkStore, damage) -> None:  # type: ignore[no-untyped-def]
    digest = put(store, os.urandom(CS))
    path = store.chunk_path(digest)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptChunk, match=digest.hex()):
        store.get_chunk(digest)


def test_a_zstd_frame_claiming_more_than_a_chunk_is_refused(store: ChunkStore) -> None:
    content = bytes(2 * CS)  # compresses to almost nothing, declares 2 chunks of output
    digest = blake3.blake3(content).digest()
    store.put_chunk(digest, zstandard.ZstdCompressor().compress(content), CODEC_ZSTD)
    with pytest.raises(CorruptChunk, match="cannot be decompressed"):
        store.get_chunk(digest)


def test_a_leftover_temporary_file_is_never_a_chunk(store: ChunkStore) -> None:
    content = os.urandom(4096)
    digest = blake3.blake3(content).digest()
    path = store.chunk_path(digest)
    path.parent.mkdir(parents=True)
    # What a crash between write and rename leaves: a complete-looking file, wrong name.
    leftover = path.parent / f".{path.name}.tmp.0123456789abcdef"
    leftover.write_bytes(CHUNK_MAGIC + bytes([CODEC_RAW]) + content)
    assert not store.has_chunk(digest)
    with pytest.raises(MissingChunk):
        store.get_chunk(digest)
    assert store.put_chunk(digest, content, CODEC_RAW) > 0
    assert store.get_chunk(digest) == content


def test_sweep_removes_only_old_temporary_files(store: ChunkStore) -> None:
    digest = put(store, b"real chunk")
    chunk_dir = store.chunk_path(digest).parent
    old = chunk_dir / f".{digest.hex()}.tmp.0000000000000001"
    young = chunk_dir / f".{digest.hex()}.tmp.0000000000000002"
    lookalike = chunk_dir / ".snapshot"  # not ours: never removed
    for path in (old, young, lookalike):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(lookalike, (time.time() - 7200, time.time() - 7200))
    assert store.sweep_temporary(older_than_s=3600) == 1
    assert not old.exists() and young.exists() and lookalike.exists()
    assert store.get_chunk(digest) == b"real chunk"


def test_bad_digest_and_codec_are_programming_errors(store: ChunkStore) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        store.put_chunk(b"short", b"x", CODEC_RAW)
    with pytest.raises(ValueError, match="codec"):
        store.put_chunk(blake3.blake3(b"x").digest(), b"x", 9)


# --- points ---------------------------------------------------------------------------


def test_a_staged_point_is_invisible_until_committed(store: ChunkStore) -> None:
    stage(store, "vm1", "p1", "sda")
    stage(store, "vm1", "p1", "sdb")
    assert store.staged_disks("vm1", "p1") == ["sda", "sdb"]
    assert store.points() == []
    with pytest.raises(MissingPoint):
        store.manifest("vm1", "p1", "sda")
    info = store.commit_point("vm1", "web", "p1", 1000.0, {"snapshot": "s1"})
    assert info.disks == {"sda": 2 * CS, "sdb": 2 * CS} and info.vm_name == "web"
    assert store.points() == [info]
    assert store.staged_disks("vm1", "p1") == []
    assert store.manifest("vm1", "p1", "sdb").disk == "sdb"


def test_commit_is_idempotent(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    first = store.commit_point("vm1", "web", "p1", 1000.0, {"a": 1})
    record = (store.root / "points" / "vm1" / "p1" / "point.json").read_bytes()
    again = store.commit_point("vm1", "web", "p1", 2000.0, {"a": 2})
    assert again == first
    assert (store.root / "points" / "vm1" / "p1" / "point.json").read_bytes() == record
    assert store.points() == [first]


def test_commit_with_nothing_staged_is_an_error(store: ChunkStore) -> None:
    with pytest.raises(TargetError, match="no disk is staged"):
        store.commit_point("vm1", "web", "p1", 1.0, {})
    assert store.points() == []


def test_a_crash_before_the_rename_leaves_no_point(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(store, "vm1", "p1")

    def power_cut(src: object, dst: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "rename", power_cut)
    with pytest.raises(TargetError, match="simulated crash"):
        store.commit_point("vm1", "web", "p1", 1.0, {})
    monkeypatch.undo()
    # point.json now sits in staging: still not a point.
    assert store.points() == []
    assert store.commit_point("vm1", "web", "p1", 1.0, {}).point_id == "p1"
    assert [p.point_id for p in store.points()] == ["p1"]


def test_commit_makes_everything_durable_before_the_point_appears(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(store, "vm1", "p1")
    visible_at_sync: list[bool] = []
    monkeypatch.setattr(store, "sync", lambda: visible_at_sync.append(bool(store.points())))
    store.commit_point("vm1", "web", "p1", 1.0, {})
    assert visible_at_sync == [False]


def test_sync_reports_a_writeback_error(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.sync()  # the real syncfs
    monkeypatch.setattr(chunkstore, "_syncfs_fn", lambda fd: -1)
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EIO)
    with pytest.raises(TargetError, match="syncfs on .* failed"):
        store.sync()
    synced: list[bool] = []
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.ENOSYS)
    monkeypatch.setattr(os, "sync", lambda: synced.append(True))
    store.sync()  # an old kernel: falls back to sync(2)
    assert synced == [True]


def test_points_are_oldest_first_and_filtered_by_vm(store: ChunkStore) -> None:
    for vm, point, created in [("b", "p2", 30.0), ("a", "p9", 10.0), ("a", "p1", 20.0)]:
        stage(store, vm, point)
        store.commit_point(vm, vm.upper(), point, created, {})
    stage(store, "a", "p0")
    store.commit_point("a", "A", "p0", 20.0, {})  # same time as p1: id breaks the tie
    assert [p.point_id for p in store.points()] == ["p9", "p0", "p1", "p2"]
    assert [p.point_id for p in store.points("a")] == ["p9", "p0", "p1"]
    assert store.points("nobody") == []
    assert store.point("a", "latest").point_id == "p1"


def test_discard_forgets_a_staged_point(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.discard_point("vm1", "p1")
    store.discard_point("vm1", "p1")  # twice is fine
    assert store.staged_disks("vm1", "p1") == []
    with pytest.raises(TargetError, match="no disk is staged"):
        store.commit_point("vm1", "web", "p1", 1.0, {})


def test_delete_point_keeps_chunks(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "web", "p1", 1.0, {})
    digests = list(store.manifest("vm1", "p1", "sda").stored_digests())
    store.delete_point("vm1", "p1")
    assert store.points() == []
    assert not any(store.root.joinpath("points", "vm1").iterdir())
    assert all(store.has_chunk(d) for d in digests)
    with pytest.raises(MissingPoint):
        store.delete_point("vm1", "p1")


def test_restaging_a_committed_point(store: ChunkStore) -> None:
    entries: list[bytes | None] = [put(store, b"x"), None]
    manifest = DiskManifest("sda", 2 * CS, CS, entries)
    store.stage_disk("vm1", "p1", manifest)
    store.commit_point("vm1", "web", "p1", 1.0, {})
    store.stage_disk("vm1", "p1", manifest)  # a redelivered disk task: harmless
    assert store.staged_disks("vm1", "p1") == []
    with pytest.raises(TargetError, match="already committed"):
        store.stage_disk("vm1", "p1", DiskManifest("sda", 2 * CS, CS, [None, None]))


def test_stage_refuses_a_manifest_of_another_chunk_size(store: ChunkStore) -> None:
    with pytest.raises(TargetError, match="chunks of"):
        store.stage_disk("vm1", "p1", DiskManifest("sda", 2 * CS, 2 * CS, [None]))


def test_unknown_disk_lists_the_disks(store: ChunkStore) -> None:
    stage(store, "vm1", "p1", "sda")
    store.commit_point("vm1", "web", "p1", 1.0, {})
    with pytest.raises(TargetError, match=r"no disk 'sdz' \(its disks: sda\)"):
        store.manifest("vm1", "p1", "sdz")


def test_a_broken_point_record_is_never_hidden(store: ChunkStore) -> None:
    for point, created in [("p1", 1.0), ("p2", 2.0)]:
        stage(store, "vm1", point)
        store.commit_point("vm1", "web", point, created, {})
    record = store.root / "points" / "vm1" / "p2" / "point.json"
    record.write_text('{"version": 1, "vm_id": "vm1"')  # cut short
    # The engine's view: a broken newest point must stop an incremental, not be skipped.
    with pytest.raises(CorruptManifest, match=str(record)):
        store.points("vm1")
    scan = store.scan_points("vm1")
    assert [p.point_id for p in scan.points] == ["p1"]
    assert [(b.vm_id, b.point_id) for b in scan.broken] == [("vm1", "p2")]
    assert str(record) in scan.broken[0].problem


def test_a_newer_point_record_is_refused(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "web", "p1", 1.0, {})
    record = store.root / "points" / "vm1" / "p1" / "point.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "version": 2}))
    assert "point format version 2 is newer" in store.scan_points().broken[0].problem


def test_a_corrupt_committed_manifest_names_its_file(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "web", "p1", 1.0, {})
    path = store.root / "points" / "vm1" / "p1" / "sda.manifest"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptManifest, match=str(path)):
        store.manifest("vm1", "p1", "sda")


# --- names ----------------------------------------------------------------------------

HOSTILE = ["../../etc", "a/b", "..", ".", ".hidden", "a%2Fb", "vm 1:é/ü", "x\x00y", "-", "%"]


@pytest.mark.parametrize("name", HOSTILE + ["plain-Name_1.2"])
def test_names_encode_safely_and_reversibly(name: str) -> None:
    encoded = encode_name(name)
    assert "/" not in encoded and "\x00" not in encoded and not encoded.startswith(".")
    assert encoded not in (".", "..")
    assert decode_name(encoded) == name


def test_distinct_names_never_share_a_file_name() -> None:
    assert len({encode_name(n) for n in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("encoded", ["a%2fb", "%41", "%2", "%zz", ".x", "é", ""])
def test_non_canonical_file_names_are_not_names(encoded: str) -> None:
    assert decode_name(encoded) is None


def test_names_too_long_or_empty_are_refused() -> None:
    with pytest.raises(TargetError):
        encode_name("")
    with pytest.raises(TargetError, match="too long"):
        encode_name("/" * 100)


def test_hostile_names_stay_inside_the_store(store: ChunkStore, tmp_path: Path) -> None:
    vm, point, disk = "../../escaped", "../p/..", "../../../../disk"
    stage(store, vm, point, disk)
    info = store.commit_point(vm, "../name", point, 1.0, {})
    root = store.root.resolve()
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(root), path
    assert store.points() == [info]
    assert info.vm_id == vm and info.point_id == point and list(info.disks) == [disk]
    assert store.manifest(vm, point, disk).disk == disk
