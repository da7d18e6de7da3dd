"""The filesystem chunk store: chunks, the life of a point, names, format versions, crashes."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hamal_workers.targets.base import (
    CHUNK_SIZE,
    CODEC_RAW,
    CODEC_ZSTD,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    MissingChunk,
    MissingPoint,
    MissingStagedDisk,
    PointScan,
    TargetError,
)
from hamal_workers.targets.chunkstore import (
    CHUNK_MAGIC,
    FULL_COMPARE_DAYS,
    ChunkStore,
    compared_in_full,
    decode_name,
    encode_name,
)

CS = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    # Every has_chunk with content compares in full; the daily rotation is tested alone.
    return ChunkStore(tmp_path / "store", chunk_size=CS, full_compare_days=1)


def put(store: ChunkStore, content: bytes, codec: int = CODEC_RAW) -> bytes:
    digest = store.chunk_name(content)
    payload = zstandard.ZstdCompressor().compress(content) if codec == CODEC_ZSTD else content
    store.put_chunk(digest, payload, codec, len(content))
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
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 3}))
    with pytest.raises(TargetError, match=r"format version 3 is newer than this reader \(2\)"):
        ChunkStore(tmp_path / "s")
    # Version 2 is an encrypted store: one that does not say how is refused, not guessed.
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 2}))
    with pytest.raises(TargetError, match="a version 2 store must say how it is encrypted"):
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


def _open_store(root: str) -> int:
    return ChunkStore(root).chunk_size


def test_workers_creating_the_store_at_once_all_open_it(tmp_path: Path) -> None:
    # Every disk task of a first sync opens the store: the first creates it, and the
    # others, which found no format.json a moment before, adopt it instead of taking
    # the first one's entries for foreign ones.
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        for n in range(25):
            root = str(tmp_path / f"s{n}")
            assert pool.map(_open_store, [root] * 8) == [CHUNK_SIZE] * 8


def test_a_store_created_between_the_look_and_the_create_is_adopted(tmp_path: Path) -> None:
    # The race above, made certain: the other opener created the store (format.json and
    # its directories) after this one found no format.json and went on to create it.
    first = ChunkStore(tmp_path / "s", chunk_size=CHUNK_SIZE // 2)
    before = (tmp_path / "s" / "format.json").read_bytes()
    first._create(CHUNK_SIZE)
    assert (tmp_path / "s" / "format.json").read_bytes() == before
    assert ChunkStore(tmp_path / "s").chunk_size == CHUNK_SIZE // 2


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
    assert digest == blake3.blake3(content).digest()
    assert store.has_chunk(digest, len(content))
    assert store.has_chunk(digest, len(content), content)
    assert store.get_chunk(digest) == content
    raw = store.chunk_path(digest).read_bytes()
    assert raw[:4] == CHUNK_MAGIC and raw[4] == codec
    assert store.chunk_path(digest).parent.parent.name == digest.hex()[:2]


def test_put_returns_bytes_written(store: ChunkStore) -> None:
    content = b"hello"
    digest = blake3.blake3(content).digest()
    assert store.put_chunk(digest, content, CODEC_RAW, len(content)) == len(content) + 5


def test_put_is_idempotent(store: ChunkStore) -> None:
    content = os.urandom(1000)
    digest = put(store, content)
    path = store.chunk_path(digest)
    before = path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino
    compressed = zstandard.ZstdCompressor().compress(content)
    assert store.put_chunk(digest, compressed, CODEC_ZSTD, len(content)) == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_missing_chunk_names_chunk_and_path(store: ChunkStore) -> None:
    digest = blake3.blake3(b"never stored").digest()
    with pytest.raises(MissingChunk) as err:
        store.get_chunk(digest)
    assert digest.hex() in str(err.value) and str(store.chunk_path(digest)) in str(err.value)
    assert not store.has_chunk(digest, 12)


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
    payload = zstandard.ZstdCompressor().compress(content)
    with pytest.raises(ValueError, match="at most"):
        store.put_chunk(digest, payload, CODEC_ZSTD, len(content))
    path = store.chunk_path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(CHUNK_MAGIC + bytes([CODEC_ZSTD]) + payload)
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
    assert not store.has_chunk(digest, len(content))
    assert not store.has_chunk(digest, len(content), content)
    with pytest.raises(MissingChunk):
        store.get_chunk(digest)
    assert store.put_chunk(digest, content, CODEC_RAW, len(content)) > 0
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
        store.put_chunk(b"short", b"x", CODEC_RAW, 1)
    with pytest.raises(ValueError, match="codec"):
        store.put_chunk(blake3.blake3(b"x").digest(), b"x", 9, 1)
    with pytest.raises(ValueError, match="raw payload of 1 bytes for 2"):
        store.put_chunk(blake3.blake3(b"x").digest(), b"x", CODEC_RAW, 2)
    with pytest.raises(ValueError, match="declaring 1 bytes for 2"):
        store.put_chunk(blake3.blake3(b"x").digest(), zstd(b"x"), CODEC_ZSTD, 2)


# --- damaged chunks: found before dedup reuses them ----------------------------------


def zstd(content: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(content)


def payload_of(content: bytes, codec: int) -> bytes:
    return zstd(content) if codec == CODEC_ZSTD else content


def damaged_copies(store: ChunkStore, digest: bytes) -> list[Path]:
    path = store.chunk_path(digest)
    return sorted(path.parent.glob(f".{path.name}.damaged.*"))


def zero_a_block(data: bytes) -> bytes:
    # What a lost write leaves on many filesystems: a run of zeros inside the file.
    middle = len(data) // 2
    return data[:middle] + bytes(4096) + data[middle + 4096 :]


def flip_a_bit(data: bytes) -> bytes:
    return data[:-7] + bytes([data[-7] ^ 0x10]) + data[-6:]


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "zeroed": lambda b: bytes(len(b)),
    "zeroed-block": zero_a_block,
    "bit-flip": flip_a_bit,
    "extended": lambda b: b + b"\0" * 100,
    "zeroed-header": lambda b: bytes(5) + b[5:],
}


def half_random(size: int = CS) -> bytes:
    # Compresses to about half: zstd keeps it, and a damaged block hits real data.
    return os.urandom(size // 2) + b"hamal " * (size // 12) + bytes(size // 2 - 6 * (size // 12))


def store_damaged(store: ChunkStore, codec: int, damage: str) -> tuple[bytes, bytes, bytes]:
    """Put a chunk, then damage its file: (content, name, the damaged file's bytes)."""
    content = half_random()
    digest = put(store, content, codec)
    path = store.chunk_path(digest)
    damaged = DAMAGE[damage](path.read_bytes())
    path.write_bytes(damaged)
    return content, digest, damaged


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_dedup_finds_a_damaged_chunk_quarantines_it_and_stores_it_again(
    store: ChunkStore, codec: int, damage: str
) -> None:
    content, digest, damaged = store_damaged(store, codec, damage)
    path = store.chunk_path(digest)
    assert not store.has_chunk(digest, len(content), content)
    assert not path.exists()
    [copy] = damaged_copies(store, digest)
    assert copy.read_bytes() == damaged  # kept aside, as found
    with pytest.raises(MissingChunk):
        store.get_chunk(digest)

    assert store.put_chunk(digest, payload_of(content, codec), codec, len(content)) > 0
    assert store.get_chunk(digest) == content
    assert store.has_chunk(digest, len(content), content)
    assert damaged_copies(store, digest) == [copy]


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
@pytest.mark.parametrize("damage", ["truncated", "zeroed", "zeroed-header", "extended"])
def test_without_content_the_header_and_the_length_are_still_checked(
    store: ChunkStore, codec: int, damage: str
) -> None:
    content, digest, _ = store_damaged(store, codec, damage)
    path = store.chunk_path(digest)
    assert not store.has_chunk(digest, len(content))
    assert not path.exists() and len(damaged_copies(store, digest)) == 1
    # put_chunk makes the same checks before it believes an existing file.
    assert store.put_chunk(digest, payload_of(content, codec), codec, len(content)) > 0
    assert store.get_chunk(digest) == content


def test_a_chunk_of_another_length_is_not_the_one_asked_for(store: ChunkStore) -> None:
    content = os.urandom(1000)
    digest = put(store, content, CODEC_ZSTD)
    assert store.has_chunk(digest, 1000)
    path = store.chunk_path(digest)
    # A frame that declares another size under this name: a chunk from a broken writer.
    path.write_bytes(CHUNK_MAGIC + bytes([CODEC_ZSTD]) + zstd(content + b"!"))
    assert not store.has_chunk(digest, 1000)
    assert damaged_copies(store, digest)


def test_without_content_a_flipped_bit_inside_is_not_seen(store: ChunkStore) -> None:
    # The limit of the cheap check, and why dedup passes the content it holds.
    content = os.urandom(CS)
    digest = put(store, content)
    path = store.chunk_path(digest)
    path.write_bytes(flip_a_bit(path.read_bytes()))
    assert store.has_chunk(digest, CS)
    assert not store.has_chunk(digest, CS, content)


def test_each_name_is_compared_in_full_on_one_day_in_every_seven() -> None:
    names = [os.urandom(32) for _ in range(700)]
    for name in names:
        days = [d for d in range(20_000, 20_014) if compared_in_full(name, d, 7)]
        assert len(days) == 2 and days[1] - days[0] == 7
    due_on_one_day = sum(compared_in_full(n, 20_000, 7) for n in names)
    assert 50 < due_on_one_day < 150  # about a seventh
    assert all(compared_in_full(n, 20_000, 1) for n in names)


def content_due(today: int, due: bool) -> bytes:
    """Random chunk content whose name's turn for a full compare is (not) today."""
    while True:
        content = os.urandom(CS)
        if compared_in_full(blake3.blake3(content).digest(), today, FULL_COMPARE_DAYS) == due:
            return content


def test_by_default_a_chunk_is_compared_in_full_on_its_day(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    assert store.full_compare_days == FULL_COMPARE_DAYS
    today = int(time.time() // 86400)
    due, not_due = content_due(today, True), content_due(today, False)
    names = [put(store, due), put(store, not_due)]
    for name in names:
        path = store.chunk_path(name)
        path.write_bytes(flip_a_bit(path.read_bytes()))
    found = [store.has_chunk(names[0], CS, due), store.has_chunk(names[1], CS, not_due)]
    if int(time.time() // 86400) != today:
        pytest.skip("the day changed during the test")
    assert found == [False, True]  # today only the first one's turn
    assert not store.chunk_path(names[0]).exists()


def test_quarantine_keeps_the_copy_aside_for_the_damaged_grace(store: ChunkStore) -> None:
    digest = put(store, b"an old chunk")
    month_ago = time.time() - 30 * 86400
    os.utime(store.chunk_path(digest), (month_ago, month_ago))
    assert store.quarantine_chunk(digest, "found damaged by a test")
    assert not store.quarantine_chunk(digest, "again")  # nothing left to move
    [copy] = damaged_copies(store, digest)
    try:
        assert os.getxattr(copy, "user.hamal.damaged") == b"found damaged by a test"
    except OSError as exc:
        assert exc.errno in (errno.ENOTSUP, errno.ENODATA)
    # The grace counts from the quarantine, not from when the chunk was written.
    assert store.sweep_temporary(older_than_s=0) == 0 and copy.exists()
    assert store.sweep_temporary(older_than_s=0, damaged_older_than_s=0) == 1
    assert not copy.exists()


def test_many_threads_putting_one_chunk_leave_one_good_file(store: ChunkStore) -> None:
    content = half_random()
    digest = store.chunk_name(content)
    payload = zstd(content)
    with ThreadPoolExecutor(10) as pool:
        written = list(
            pool.map(lambda _: store.put_chunk(digest, payload, CODEC_ZSTD, CS), range(10))
        )
    assert written.count(0) <= 9 and all(w in (0, len(payload) + 5) for w in written)
    assert os.listdir(store.chunk_path(digest).parent) == [digest.hex()]
    assert store.get_chunk(digest) == content


def half_zeros(head: bytes) -> bytes:
    return head + bytes(len(head))


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.binary(min_size=1, max_size=CS)
    | st.binary(min_size=1, max_size=CS // 2).map(half_zeros),
    codec=st.sampled_from([CODEC_RAW, CODEC_ZSTD]),
    where=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    mask=st.integers(min_value=1, max_value=255),
)
def test_a_changed_byte_is_found_unless_the_chunk_still_decodes_to_its_content(
    store: ChunkStore, content: bytes, codec: int, where: float, mask: int
) -> None:
    digest = store.chunk_name(content)
    payload = payload_of(content, codec)
    store.put_chunk(digest, payload, codec, len(content))
    assert store.has_chunk(digest, len(content), content)
    assert store.get_chunk(digest) == content
    path = store.chunk_path(digest)
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= mask
    path.write_bytes(data)
    if store.has_chunk(digest, len(content), content):
        # Only a bit no decoder reads (zstd's unused header bit) may change unnoticed.
        assert store.get_chunk(digest) == content
    else:
        assert store.put_chunk(digest, payload, codec, len(content)) == len(payload) + 5
    assert store.has_chunk(digest, len(content), content)
    assert store.get_chunk(digest) == content


# --- points ---------------------------------------------------------------------------


def test_a_staged_point_is_invisible_until_committed(store: ChunkStore) -> None:
    stage(store, "vm1", "p1", "sda")
    stage(store, "vm1", "p1", "sdb")
    assert store.staged_disks("vm1", "p1") == ["sda", "sdb"]
    assert store.points() == [] and store.point_ids("vm1") == []
    with pytest.raises(MissingPoint):
        store.manifest("vm1", "p1", "sda")
    meta = {"snapshot": "s1", "tokens": {"sda": "52 t/1", "sdb": "52 t/2"}}
    info = store.commit_point("vm1", "web", "p1", 1000.0, ["sda", "sdb"], meta)
    assert info.disks == {"sda": 2 * CS, "sdb": 2 * CS} and info.vm_name == "web"
    assert store.points() == [info] and store.point("vm1", "p1") == info
    assert info.token("sdb") == "52 t/2" and info.token("sdz") == ""
    assert store.staged_disks("vm1", "p1") == []
    assert store.manifest("vm1", "p1", "sdb").disk == "sdb"


def test_commit_is_idempotent(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    first = store.commit_point("vm1", "web", "p1", 1000.0, ["sda"], {"a": 1})
    record = (store.root / "points" / "vm1" / "p1" / "point.json").read_bytes()
    again = store.commit_point("vm1", "web", "p1", 2000.0, ["sda"], {"a": 2})
    assert again == first
    assert (store.root / "points" / "vm1" / "p1" / "point.json").read_bytes() == record
    assert store.points() == [first]


def test_commit_with_nothing_staged_names_every_disk(store: ChunkStore) -> None:
    with pytest.raises(MissingStagedDisk, match="'sda' is not staged") as err:
        store.commit_point("vm1", "web", "p1", 1.0, ["sda", "sdb"], {})
    assert err.value.disks == ("sda", "sdb")
    assert store.points() == []
    with pytest.raises(TargetError, match="no disks given"):
        store.commit_point("vm1", "web", "p1", 1.0, [], {})


def damage_manifest(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def test_commit_refuses_missing_and_damaged_disks_and_names_exactly_those(
    store: ChunkStore,
) -> None:
    for disk in ("sda", "sdb", "sdc"):
        stage(store, "vm1", "p1", disk)
    staging = store.root / "staging" / "vm1" / "p1"
    damage_manifest(staging / "sdb.manifest")
    with pytest.raises(MissingStagedDisk) as err:
        store.commit_point("vm1", "web", "p1", 1.0, ["sda", "sdb", "sdc", "sdd"], {})
    assert err.value.disks == ("sdb", "sdd")
    message = str(err.value)
    assert "'sdb'" in message and str(staging / "sdb.manifest") in message
    assert "'sdd' is not staged" in message and "'sda'" not in message
    # Nothing visible, and nothing lost: the run can stage again and commit.
    assert store.point_ids("vm1") == [] and store.scan_points() == PointScan([], [])
    assert store.staged_disks("vm1", "p1") == ["sda", "sdb", "sdc"]
    stage(store, "vm1", "p1", "sdb")
    stage(store, "vm1", "p1", "sdd")
    info = store.commit_point("vm1", "web", "p1", 1.0, ["sda", "sdb", "sdc", "sdd"], {})
    assert sorted(info.disks) == ["sda", "sdb", "sdc", "sdd"]


def test_commit_refuses_a_manifest_staged_under_another_disks_name(store: ChunkStore) -> None:
    stage(store, "vm1", "p1", "sda")
    staging = store.root / "staging" / "vm1" / "p1"
    (staging / "sda.manifest").rename(staging / "sdb.manifest")
    with pytest.raises(MissingStagedDisk, match="of disk 'sda'") as err:
        store.commit_point("vm1", "web", "p1", 1.0, ["sdb"], {})
    assert err.value.disks == ("sdb",)


def test_commit_leaves_out_disks_it_was_not_given(store: ChunkStore) -> None:
    for disk in ("sda", "old-disk"):
        stage(store, "vm1", "p1", disk)
    info = store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    assert list(info.disks) == ["sda"]
    committed = store.root / "points" / "vm1" / "p1"
    assert sorted(p.name for p in committed.iterdir()) == ["point.json", "sda.manifest"]
    with pytest.raises(TargetError, match="no disk 'old-disk'"):
        store.manifest("vm1", "p1", "old-disk")


def test_a_crash_before_the_rename_leaves_no_point(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(store, "vm1", "p1")
    real_rename = os.rename

    def power_cut_at_the_directory_rename(src: str, dst: str) -> None:
        if Path(src).is_dir():
            raise OSError(errno.EIO, "simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", power_cut_at_the_directory_rename)
    with pytest.raises(TargetError, match="simulated crash"):
        store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    monkeypatch.undo()
    # point.json now sits in staging: still not a point.
    assert (store.root / "staging" / "vm1" / "p1" / "point.json").exists()
    assert store.points() == [] and store.point_ids("vm1") == []
    assert store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {}).point_id == "p1"
    assert [p.point_id for p in store.points()] == ["p1"]


def test_commit_makes_everything_durable_before_the_point_appears(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(store, "vm1", "p1")
    visible_at_sync: list[bool] = []
    monkeypatch.setattr(store, "sync", lambda: visible_at_sync.append(bool(store.points())))
    store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    assert visible_at_sync == [False]


def test_points_are_oldest_first_and_filtered_by_vm(store: ChunkStore) -> None:
    for vm, point, created in [("b", "p2", 30.0), ("a", "p9", 10.0), ("a", "p1", 20.0)]:
        stage(store, vm, point)
        store.commit_point(vm, vm.upper(), point, created, ["sda"], {})
    stage(store, "a", "p0")
    store.commit_point("a", "A", "p0", 20.0, ["sda"], {})  # same time as p1: id breaks the tie
    assert [p.point_id for p in store.points()] == ["p9", "p0", "p1", "p2"]
    assert [p.point_id for p in store.points("a")] == ["p9", "p0", "p1"]
    assert store.points("nobody") == []


POINT_IDS = ["20261125T180344Z-1a2b3c", "20261125T190000Z-000001", "20261126T000000Z-ffffff"]


def test_point_ids_are_oldest_first_from_the_listing(store: ChunkStore) -> None:
    for point_id in (POINT_IDS[2], POINT_IDS[0], POINT_IDS[1]):
        stage(store, "vm1", point_id)
        store.commit_point("vm1", "web", point_id, 1.0, ["sda"], {})
    stage(store, "vm1", "20991231T000000Z-staged")  # staged only: not a point
    stage(store, "vm2", POINT_IDS[0])
    store.commit_point("vm2", "db", POINT_IDS[0], 1.0, ["sda"], {})
    store.delete_point("vm2", POINT_IDS[0])
    vm_dir = store.root / "points" / "vm1"
    (vm_dir / f".{POINT_IDS[0]}.deleted.0123456789abcdef").mkdir()  # a delete in progress
    (vm_dir / "%zz").mkdir()  # not an encoded name: not ours
    assert store.point_ids("vm1") == POINT_IDS
    assert store.point_ids("vm2") == [] and store.point_ids("nobody") == []


def test_latest_is_the_newest_readable_point(store: ChunkStore) -> None:
    for point_id in POINT_IDS:
        stage(store, "vm1", point_id)
        store.commit_point("vm1", "web", point_id, 1.0, ["sda"], {})
    assert store.point("vm1", "latest").point_id == POINT_IDS[2]
    (store.root / "points" / "vm1" / POINT_IDS[2] / "point.json").write_text("{")
    assert store.point("vm1", "latest").point_id == POINT_IDS[1]
    with pytest.raises(CorruptManifest, match="point.json"):
        store.point("vm1", POINT_IDS[2])
    with pytest.raises(MissingPoint):
        store.point("vm1", "20000101T000000Z-000000")
    with pytest.raises(MissingPoint):
        store.point("nobody", "latest")


def test_staged_points_lists_uncommitted_points_with_their_age(store: ChunkStore) -> None:
    stage(store, "vm1", "old")
    stage(store, "vm1", "new", "sda")
    stage(store, "vm2", "done")
    store.commit_point("vm2", "db", "done", 1.0, ["sda"], {})
    old = store.root / "staging" / "vm1" / "old"
    hour_ago = time.time() - 3600
    for path in (old, *old.iterdir()):
        os.utime(path, (hour_ago, hour_ago))
    found = {(p.vm_id, p.point_id): p.age_s for p in store.staged_points()}
    assert sorted(found) == [("vm1", "new"), ("vm1", "old")]
    assert 3590 < found[("vm1", "old")] < 3700 and found[("vm1", "new")] < 60
    store.discard_point("vm1", "old")
    assert [p.point_id for p in store.staged_points()] == ["new"]


def test_discard_forgets_a_staged_point(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.discard_point("vm1", "p1")
    store.discard_point("vm1", "p1")  # twice is fine
    assert store.staged_disks("vm1", "p1") == []
    with pytest.raises(MissingStagedDisk):
        store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})


def test_delete_point_keeps_chunks(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    digests = list(store.manifest("vm1", "p1", "sda").stored_digests())
    store.delete_point("vm1", "p1")
    assert store.points() == [] and store.point_ids("vm1") == []
    assert not any(store.root.joinpath("points", "vm1").iterdir())
    assert all(store.get_chunk(d) for d in digests)
    with pytest.raises(MissingPoint):
        store.delete_point("vm1", "p1")


def test_restaging_a_committed_point(store: ChunkStore) -> None:
    entries: list[bytes | None] = [put(store, b"x"), None]
    manifest = DiskManifest("sda", 2 * CS, CS, entries)
    store.stage_disk("vm1", "p1", manifest)
    store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    store.stage_disk("vm1", "p1", manifest)  # a redelivered disk task: harmless
    assert store.staged_disks("vm1", "p1") == []
    assert store.staged_points() == []
    with pytest.raises(TargetError, match="already committed"):
        store.stage_disk("vm1", "p1", DiskManifest("sda", 2 * CS, CS, [None, None]))


def test_stage_refuses_a_manifest_of_another_chunk_size(store: ChunkStore) -> None:
    with pytest.raises(TargetError, match="chunks of"):
        store.stage_disk("vm1", "p1", DiskManifest("sda", 2 * CS, 2 * CS, [None]))


def test_unknown_disk_lists_the_disks(store: ChunkStore) -> None:
    stage(store, "vm1", "p1", "sda")
    store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    with pytest.raises(TargetError, match=r"no disk 'sdz' \(its disks: sda\)"):
        store.manifest("vm1", "p1", "sdz")


def test_a_broken_point_record_is_never_hidden(store: ChunkStore) -> None:
    for point, created in [("p1", 1.0), ("p2", 2.0)]:
        stage(store, "vm1", point)
        store.commit_point("vm1", "web", point, created, ["sda"], {})
    record = store.root / "points" / "vm1" / "p2" / "point.json"
    record.write_text('{"version": 1, "vm_id": "vm1"')  # cut short
    scan = store.scan_points("vm1")
    assert [p.point_id for p in scan.points] == ["p1"]
    assert [(b.vm_id, b.point_id) for b in scan.broken] == [("vm1", "p2")]
    assert str(record) in scan.broken[0].problem
    # The readable ones are still listed, and the id listing still shows the broken one.
    assert [p.point_id for p in store.points("vm1")] == ["p1"]
    assert store.point_ids("vm1") == ["p1", "p2"]


def test_a_newer_point_record_is_refused(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    record = store.root / "points" / "vm1" / "p1" / "point.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "version": 2}))
    assert "point format version 2 is newer" in store.scan_points().broken[0].problem


def test_a_corrupt_committed_manifest_names_its_file(store: ChunkStore) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    path = store.root / "points" / "vm1" / "p1" / "sda.manifest"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptManifest, match=str(path)):
        store.manifest("vm1", "p1", "sda")


def test_free_bytes_is_the_room_left_on_the_stores_filesystem(store: ChunkStore) -> None:
    st = os.statvfs(store.root)
    assert abs(store.free_bytes() - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024


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
    info = store.commit_point(vm, "../name", point, 1.0, [disk], {})
    root = store.root.resolve()
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(root), path
    assert store.points() == [info]
    assert info.vm_id == vm and info.point_id == point and list(info.disks) == [disk]
    assert store.manifest(vm, point, disk).disk == disk
