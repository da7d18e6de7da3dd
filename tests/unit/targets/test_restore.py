"""Restore to a sparse image and verify a point, through the API and the `hamal` command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import blake3
import pytest
import zstandard

from hamal_workers.cli import points_cmd
from hamal_workers.targets.base import (
    CHUNK_SIZE,
    CODEC_RAW,
    CODEC_ZSTD,
    CorruptChunk,
    CorruptManifest,
    DiskManifest,
    MissingChunk,
    MissingPoint,
)
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import (
    MAX_IN_FLIGHT,
    MAX_REPAIR_READS,
    ChunkUse,
    find_damaged_chunks,
    repair_chunks,
    restore_disk,
    verify_point,
)

CS = 64 * 1024
REPO = Path(__file__).resolve().parents[3]
ZSTD = zstandard.ZstdCompressor(level=3)


def is_zero(piece: bytes) -> bool:
    return piece.count(0) == len(piece)


def chunk_disk(
    store: ChunkStore, name: str, data: bytes, *, pad_last: bool = False
) -> DiskManifest:
    """What the engine does: cut the disk, hash each piece, compress what compresses."""
    cs = store.chunk_size
    entries: list[bytes | None] = []
    for offset in range(0, len(data), cs):
        piece = data[offset : offset + cs]
        if is_zero(piece):
            entries.append(None)
            continue
        if pad_last and len(piece) < cs:
            piece += bytes(cs - len(piece))
        digest = store.chunk_name(piece)
        packed = ZSTD.compress(piece)
        if len(packed) < len(piece):
            store.put_chunk(digest, packed, CODEC_ZSTD, len(piece))
        else:
            store.put_chunk(digest, piece, CODEC_RAW, len(piece))
        entries.append(digest)
    return DiskManifest(name, len(data), cs, entries)


def mixed_content(cs: int, tail: int) -> bytes:
    """15 entries: random, zero, compressible, half-zero, a repeat and a short last chunk.

    Stored: 0 random, 7 compressible, 8 half-zero, 12 random, 13 = 0 again, 14 the tail.
    """
    first = os.urandom(cs)
    return b"".join(
        [
            first,
            bytes(cs * 6),
            (b"hamal compressible " * cs)[:cs],
            os.urandom(cs // 4) + bytes(cs - cs // 4),
            bytes(cs * 3),
            os.urandom(cs),
            first,
            os.urandom(tail),
        ]
    )


def commit(
    store: ChunkStore,
    disks: dict[str, bytes],
    vm: str = "vm-1",
    point: str = "p1",
    name: str = "web",
    created: float = 1_700_000_000.0,
) -> None:
    for disk, data in disks.items():
        store.stage_disk(vm, point, chunk_disk(store, disk, data))
    store.commit_point(vm, name, point, created, list(disks), {})


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "store", chunk_size=CS)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "store")


# --- restore --------------------------------------------------------------------------


def test_restore_is_byte_identical_and_sparse(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")  # the real chunk size
    assert store.chunk_size == CHUNK_SIZE
    data = mixed_content(CHUNK_SIZE, tail=12345)
    commit(store, {"sda": data})
    out = tmp_path / "sda.img"
    result = restore_disk(store, "vm-1", "p1", "sda", out)
    assert out.read_bytes() == data
    assert os.stat(out).st_blocks * 512 < len(data) // 2  # the zero chunks are holes
    assert (result.chunks, result.zero_chunks) == (6, 9)
    assert result.bytes_written == 5 * CHUNK_SIZE + 12345
    assert leftovers(tmp_path) == ["sda.img"]


def test_last_chunk_shorter_than_a_chunk(store: ChunkStore, tmp_path: Path) -> None:
    data = os.urandom(3 * CS + 100)
    commit(store, {"sda": data})
    out = tmp_path / "out.img"
    restore_disk(store, "vm-1", "p1", "sda", out)
    assert out.stat().st_size == len(data) and out.read_bytes() == data


def test_a_disk_ending_in_zeros_keeps_its_size(store: ChunkStore, tmp_path: Path) -> None:
    data = os.urandom(CS) + bytes(3 * CS + 5)
    commit(store, {"sda": data})
    out = tmp_path / "out.img"
    assert restore_disk(store, "vm-1", "p1", "sda", out).zero_chunks == 4
    assert out.stat().st_size == len(data) and out.read_bytes() == data


def test_a_padded_last_chunk_is_cut_to_the_disk_size(store: ChunkStore, tmp_path: Path) -> None:
    data = os.urandom(2 * CS + 100)
    store.stage_disk("vm-1", "p1", chunk_disk(store, "sda", data, pad_last=True))
    store.commit_point("vm-1", "web", "p1", 1.0, ["sda"], {})
    out = tmp_path / "out.img"
    restore_disk(store, "vm-1", "p1", "sda", out)
    assert out.read_bytes() == data
    assert verify_point(store, "vm-1", "p1") == []


def test_a_chunk_too_short_for_its_place_is_refused(store: ChunkStore, tmp_path: Path) -> None:
    short = os.urandom(100)
    digest = blake3.blake3(short).digest()
    store.put_chunk(digest, short, CODEC_RAW, len(short))
    # Entry 0 covers a full chunk, but the chunk only holds 100 bytes.
    store.stage_disk("vm-1", "p1", DiskManifest("sda", 2 * CS, CS, [digest, None]))
    store.commit_point("vm-1", "web", "p1", 1.0, ["sda"], {})
    with pytest.raises(CorruptChunk, match=f"holds 100 bytes, the disk needs {CS}"):
        restore_disk(store, "vm-1", "p1", "sda", tmp_path / "out.img")
    assert leftovers(tmp_path) == []
    [problem] = verify_point(store, "vm-1", "p1")
    assert "chunk 0" in problem and digest.hex() in problem


def test_an_empty_disk_restores_to_an_empty_file(store: ChunkStore, tmp_path: Path) -> None:
    store.stage_disk("vm-1", "p1", DiskManifest("empty", 0, CS, []))
    store.commit_point("vm-1", "web", "p1", 1.0, ["empty"], {})
    result = restore_disk(store, "vm-1", "p1", "empty", tmp_path / "e.img")
    assert (tmp_path / "e.img").stat().st_size == 0 and result.chunks == 0


def test_progress_reaches_the_total_and_work_in_flight_is_bounded(
    store: ChunkStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(40 * CS) + bytes(5 * CS) + os.urandom(7)
    commit(store, {"sda": data})
    started = 0
    lock = threading.Lock()
    real_get = store.get_chunk

    def counting_get(digest: bytes) -> bytes:
        nonlocal started
        with lock:
            started += 1
        return real_get(digest)

    monkeypatch.setattr(store, "get_chunk", counting_get)
    calls: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        with lock:
            calls.append((done, total, started))

    restore_disk(store, "vm-1", "p1", "sda", tmp_path / "out.img", progress, workers=4)
    assert calls[-1][:2] == (len(data), len(data))
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    # After k chunks are written, at most MAX_IN_FLIGHT more have been fetched.
    for written, (_, _, fetched) in enumerate(calls[:40], start=1):
        assert fetched <= written + MAX_IN_FLIGHT
    assert (tmp_path / "out.img").read_bytes() == data


def test_an_existing_file_is_only_replaced_when_asked(store: ChunkStore, tmp_path: Path) -> None:
    data = os.urandom(CS + 1)
    commit(store, {"sda": data})
    out = tmp_path / "out.img"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists"):
        restore_disk(store, "vm-1", "p1", "sda", out)
    assert out.read_bytes() == b"keep me"
    restore_disk(store, "vm-1", "p1", "sda", out, overwrite=True)
    assert out.read_bytes() == data
    (tmp_path / "adir").mkdir()
    with pytest.raises(FileExistsError, match="not a regular file"):
        restore_disk(store, "vm-1", "p1", "sda", tmp_path / "adir", overwrite=True)


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_restore_never_writes_through_what_is_planted_beside_it(
    store: ChunkStore, tmp_path: Path, planted: str
) -> None:
    data = os.urandom(2 * CS + 3)
    commit(store, {"sda": data})
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    victim.chmod(0o644)
    out = tmp_path / "y.raw"
    # The name the partial image used to have, predictable to anyone.
    partial = tmp_path / "y.raw.partial"
    if planted == "symlink":
        partial.symlink_to(victim)
    else:
        partial.write_bytes(b"planted")
    old = os.umask(0)
    try:
        restore_disk(store, "vm-1", "p1", "sda", out)
    finally:
        os.umask(old)
    assert out.read_bytes() == data and not out.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert victim.read_bytes() == b"someone else's file"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    if planted == "symlink":
        assert partial.is_symlink() and partial.resolve() == victim
    else:
        assert partial.read_bytes() == b"planted"
    assert leftovers(tmp_path) == sorted(["victim", "y.raw", "y.raw.partial"])


def test_a_replaced_image_is_0600_whatever_it_was(store: ChunkStore, tmp_path: Path) -> None:
    commit(store, {"sda": os.urandom(CS)})
    out = tmp_path / "out.img"
    out.write_bytes(b"old image")
    out.chmod(0o644)
    restore_disk(store, "vm-1", "p1", "sda", out, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_corrupt_chunk_is_found_by_verify_and_refused_by_restore(
    store: ChunkStore, tmp_path: Path
) -> None:
    data = mixed_content(CS, tail=10)
    commit(store, {"sda": data, "sdb": os.urandom(CS)})
    manifest = store.manifest("vm-1", "p1", "sda")
    index = 7  # the compressible chunk
    digest = manifest.entries[index]
    assert digest is not None
    flip_a_byte(store.chunk_path(digest))

    [problem] = verify_point(store, "vm-1", "p1")
    for part in ("VM vm-1", "point p1", "disk sda", f"chunk {index}", digest.hex(), "corrupt"):
        assert part in problem

    out = tmp_path / "out.img"
    with pytest.raises(CorruptChunk) as err:
        restore_disk(store, "vm-1", "p1", "sda", out)
    message = str(err.value)
    for part in ("VM vm-1", "point p1", "disk sda", f"chunk {index}", f"offset {index * CS}"):
        assert part in message
    assert digest.hex() in message and str(store.chunk_path(digest)) in message
    assert leftovers(tmp_path) == []  # neither out.img nor out.img.partial


def test_a_corrupt_shared_chunk_is_reported_once(store: ChunkStore) -> None:
    commit(store, {"sda": mixed_content(CS, tail=10)})
    digest = store.manifest("vm-1", "p1", "sda").entries[0]
    assert digest is not None
    flip_a_byte(store.chunk_path(digest))
    [problem] = verify_point(store, "vm-1", "p1")  # entries 0 and 13 share it
    assert "chunk 0 " in problem and "1 other entries use it too" in problem


def test_a_missing_chunk_is_found_and_refused(store: ChunkStore, tmp_path: Path) -> None:
    data = os.urandom(3 * CS)
    commit(store, {"sda": data})
    digest = store.manifest("vm-1", "p1", "sda").entries[2]
    assert digest is not None
    store.chunk_path(digest).unlink()
    [problem] = verify_point(store, "vm-1", "p1")
    assert "chunk 2" in problem and "missing" in problem
    with pytest.raises(MissingChunk, match="chunk 2 at offset"):
        restore_disk(store, "vm-1", "p1", "sda", tmp_path / "out.img")
    assert leftovers(tmp_path) == []


def test_a_truncated_manifest_is_found_and_refused(store: ChunkStore, tmp_path: Path) -> None:
    commit(store, {"sda": os.urandom(2 * CS), "sdb": os.urandom(CS)})
    path = store.root / "points" / "vm-1" / "p1" / "sda.manifest"
    path.write_bytes(path.read_bytes()[:-10])
    [problem] = verify_point(store, "vm-1", "p1")
    assert "disk sda" in problem and str(path) in problem
    with pytest.raises(CorruptManifest, match=str(path)):
        restore_disk(store, "vm-1", "p1", "sda", tmp_path / "out.img")
    assert leftovers(tmp_path) == []
    restore_disk(store, "vm-1", "p1", "sdb", tmp_path / "sdb.img")  # the other disk is fine


def test_verify_reads_each_distinct_chunk_once(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    same = os.urandom(CS)
    commit(store, {"sda": same * 3 + os.urandom(CS), "sdb": same + bytes(CS)})
    reads: list[bytes] = []
    real_get = store.get_chunk
    monkeypatch.setattr(store, "get_chunk", lambda d: reads.append(d) or real_get(d))
    assert verify_point(store, "vm-1", "p1") == []
    assert len(reads) == len(set(reads)) == 2


def test_verify_reports_a_broken_point_record(store: ChunkStore) -> None:
    commit(store, {"sda": os.urandom(CS)})
    record = store.root / "points" / "vm-1" / "p1" / "point.json"
    record.write_text("{")
    [problem] = verify_point(store, "vm-1", "p1")
    assert str(record) in problem and "VM vm-1 point p1" in problem
    with pytest.raises(MissingPoint):
        verify_point(store, "vm-1", "nope")


# --- damaged chunks across points, and repair ----------------------------------------


def three_points_sharing_a_chunk(store: ChunkStore) -> tuple[bytes, bytes]:
    """vm-a p1, vm-a p2 (two disks) and vm-b p1 share one chunk: (its name, sdb's chunk)."""
    shared = os.urandom(CS)
    commit(store, {"sda": shared + os.urandom(CS)}, vm="vm-a", point="p1", created=1.0)
    sda, sdb = shared + shared + os.urandom(CS), os.urandom(CS)
    commit(store, {"sda": sda, "sdb": sdb}, vm="vm-a", point="p2", created=2.0)
    commit(store, {"vda": os.urandom(CS) + shared}, vm="vm-b", point="p1", name="db", created=3.0)
    return store.chunk_name(shared), store.chunk_name(sdb)


def test_each_damaged_chunk_is_named_once_with_every_entry_that_uses_it(
    store: ChunkStore,
) -> None:
    shared, lost = three_points_sharing_a_chunk(store)
    flip_a_byte(store.chunk_path(shared))
    store.chunk_path(lost).unlink()

    check = find_damaged_chunks(store)
    assert check.chunks == 5 and check.broken == []
    by_name = {d.name: d for d in check.damaged}
    assert set(by_name) == {shared, lost}
    assert by_name[shared].uses == [
        ChunkUse("vm-a", "p1", "sda", 0),
        ChunkUse("vm-a", "p2", "sda", 0),
        ChunkUse("vm-a", "p2", "sda", 1),
        ChunkUse("vm-b", "p1", "vda", 1),
    ]
    assert "corrupt" in by_name[shared].problem and "missing" in by_name[lost].problem
    assert by_name[lost].uses == [ChunkUse("vm-a", "p2", "sdb", 0)]
    assert check.bad_points() == {("vm-a", "p1"), ("vm-a", "p2"), ("vm-b", "p1")}

    [only_b] = find_damaged_chunks(store, "vm-b").damaged
    assert only_b.uses == [ChunkUse("vm-b", "p1", "vda", 1)]
    [only_p1] = find_damaged_chunks(store, "vm-a", "p1").damaged
    assert only_p1.name == shared and len(only_p1.uses) == 1


def test_a_clean_store_has_nothing_damaged(store: ChunkStore) -> None:
    three_points_sharing_a_chunk(store)
    check = find_damaged_chunks(store)
    assert (check.damaged, check.broken, check.bad_points()) == ([], [], set())
    assert [p.point_id for p in check.points] == ["p1", "p2", "p1"]


def test_repair_stores_again_only_what_the_source_still_holds(store: ChunkStore) -> None:
    same, changed, gone = os.urandom(CS), os.urandom(CS), (b"text " * CS)[:CS]
    commit(store, {"sda": same + changed + gone})
    names = [store.chunk_name(c) for c in (same, changed, gone)]
    # The source as it is now: chunk 1 was written to since, chunk 2 cannot be read.
    source = {0: same, 1: os.urandom(CS), 2: None}
    flip_a_byte(store.chunk_path(names[0]))
    store.chunk_path(names[1]).unlink()
    flip_a_byte(store.chunk_path(names[2]))
    damaged = find_damaged_chunks(store).damaged

    result = repair_chunks(store, damaged, lambda vm, disk, index: source[index])
    assert result.repaired == [names[0]]
    assert {name for name, _ in result.unrepaired} == set(names[1:])
    assert all("no longer holds it" in why for _, why in result.unrepaired)
    assert store.get_chunk(names[0]) == same
    path = store.chunk_path(names[0])
    assert len(list(path.parent.glob(f".{path.name}.damaged.*"))) == 1
    assert {d.name for d in find_damaged_chunks(store).damaged} == set(names[1:])

    # Repaired meanwhile (a sync stored it again): nothing is moved aside a second time.
    assert repair_chunks(store, damaged[:1], lambda *_: same).repaired == [names[0]]
    assert len(list(path.parent.glob(f".{path.name}.damaged.*"))) == 1


def test_repair_reads_a_bounded_number_of_places(store: ChunkStore) -> None:
    piece = os.urandom(CS)
    commit(store, {"sda": piece * 20})
    store.chunk_path(store.chunk_name(piece)).unlink()
    [damaged] = find_damaged_chunks(store).damaged
    asked: list[int] = []
    result = repair_chunks(store, [damaged], lambda vm, disk, index: asked.append(index))
    assert len(asked) == MAX_REPAIR_READS and asked[0] == 19  # newest places first
    [(_, why)] = result.unrepaired
    assert f"read {MAX_REPAIR_READS} of 20 places" in why


# --- the command: functions -----------------------------------------------------------


def test_restore_command_resolves_names_and_latest(
    store: ChunkStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = os.urandom(CS), os.urandom(CS)
    commit(store, {"sda": old}, point="p1", created=1.0)
    commit(store, {"sda": new}, point="p2", created=2.0)
    assert points_cmd.restore(store, "web", "sda", "latest", str(tmp_path / "a.img")) == 0
    assert (tmp_path / "a.img").read_bytes() == new
    assert points_cmd.restore(store, "vm-1", "sda", "p1", str(tmp_path / "b.img")) == 0
    assert (tmp_path / "b.img").read_bytes() == old
    assert "restored VM web (vm-1) point p1 disk sda" in capsys.readouterr().out


def test_an_ambiguous_vm_name_lists_the_ids(store: ChunkStore) -> None:
    commit(store, {"sda": os.urandom(CS)}, vm="id-1", name="web")
    commit(store, {"sda": os.urandom(CS)}, vm="id-2", name="web")
    with pytest.raises(points_cmd.CommandError, match="ambiguous: ids id-1, id-2"):
        points_cmd.restore(store, "web", "sda", "latest", "/nonexistent/x")


def test_an_unknown_disk_lists_the_disks(store: ChunkStore, tmp_path: Path) -> None:
    commit(store, {"sda": os.urandom(CS), "sdb": os.urandom(CS)})
    with pytest.raises(points_cmd.CommandError, match="no disk 'sdz'; its disks: sda, sdb"):
        points_cmd.restore(store, "web", "sdz", "latest", str(tmp_path / "x"))


def test_points_lists_good_points_and_reports_broken_ones(
    store: ChunkStore, capsys: pytest.CaptureFixture[str]
) -> None:
    commit(store, {"sda": os.urandom(CS)}, point="good-point")
    commit(store, {"sda": os.urandom(CS)}, point="bad-point", created=2.0)
    (store.root / "points" / "vm-1" / "bad-point" / "point.json").write_text("[")
    assert points_cmd.list_points(store.scan_points(), "web") == 1
    out, err = capsys.readouterr()
    assert "good-point" in out and "2023-11-14T22:13:20Z" in out and "64.0 KiB" in out
    assert "BROKEN VM vm-1 point bad-point" in err


def test_verify_prints_each_damaged_chunk_once_with_its_users(
    store: ChunkStore, capsys: pytest.CaptureFixture[str]
) -> None:
    shared, lost = three_points_sharing_a_chunk(store)
    flip_a_byte(store.chunk_path(shared))
    store.chunk_path(lost).unlink()
    assert points_cmd.verify(store, None, None) == 1
    out, err = capsys.readouterr()
    assert out.count(f"DAMAGED chunk {shared.hex()}:") == 1
    assert out.count(f"DAMAGED chunk {lost.hex()}:") == 1
    assert "  used by VM web (vm-a) point p1 disk sda chunk 0\n" in out
    assert "  used by VM web (vm-a) point p2 disk sda chunks 0, 1\n" in out
    assert "  used by VM db (vm-b) point p1 disk vda chunk 1\n" in out
    assert "FAILED VM db (vm-b) point p1" in out
    assert "3 of 3 restore points have problems (2 damaged of 5 distinct chunks)" in err
    assert points_cmd.verify(store, "db", None) == 1
    assert "vm-a" not in capsys.readouterr().out


def test_verify_shortens_a_long_list_of_indexes(
    store: ChunkStore, capsys: pytest.CaptureFixture[str]
) -> None:
    piece = os.urandom(CS)
    commit(store, {"sda": piece * 30})
    flip_a_byte(store.chunk_path(store.chunk_name(piece)))
    assert points_cmd.verify(store, "web", "latest") == 1
    out = capsys.readouterr().out
    assert "chunks 0, 1, 2," in out and ", 19 and 10 more\n" in out


# --- the command: a real process with a real hamal.conf -------------------------------


def hamal(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "hamal.conf"
    conf.write_text(f"[target]\ntype = local\npath = {tmp_path / 'store'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAMAL_")}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from hamal_workers.cli import main; sys.exit(main())"]
        + [args[0], "--config", str(conf), *args[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hamal_restore_verify_and_points(store: ChunkStore, tmp_path: Path) -> None:
    data = mixed_content(CS, tail=77)
    commit(store, {"sda": data})
    out = tmp_path / "restored.img"
    done = hamal(tmp_path, "restore", "--vm", "web", "--disk", "sda", "--to", str(out))
    assert done.returncode == 0, done
    assert out.read_bytes() == data and "restored VM web (vm-1) point p1" in done.stdout
    verify = hamal(tmp_path, "verify", "--vm", "web")
    assert verify.returncode == 0, verify
    assert "OK VM web (vm-1) point p1" in verify.stdout
    listing = hamal(tmp_path, "points")
    assert listing.returncode == 0 and "p1" in listing.stdout, listing


def test_hamal_refuses_a_corrupt_chunk_in_one_line(store: ChunkStore, tmp_path: Path) -> None:
    commit(store, {"sda": os.urandom(3 * CS)})
    digest = store.manifest("vm-1", "p1", "sda").entries[1]
    assert digest is not None
    flip_a_byte(store.chunk_path(digest))
    verify = hamal(tmp_path, "verify", "--vm", "vm-1", "--point", "p1")
    assert verify.returncode == 1, verify
    assert digest.hex() in verify.stdout and "chunk 1" in verify.stdout
    out = tmp_path / "restored.img"
    args = ["restore", "--vm", "web", "--disk", "sda", "--point", "latest", "--to", str(out)]
    restore = hamal(tmp_path, *args)
    assert restore.returncode == 1, restore
    assert "corrupt" in restore.stderr and "Traceback" not in restore.stderr
    assert len(restore.stderr.strip().splitlines()) == 1
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_hamal_restore_of_an_unknown_disk_or_point(store: ChunkStore, tmp_path: Path) -> None:
    commit(store, {"sda": os.urandom(CS)})
    out = str(tmp_path / "x.img")
    disk = hamal(tmp_path, "restore", "--vm", "web", "--disk", "vdz", "--to", out)
    assert disk.returncode == 1 and "its disks: sda" in disk.stderr, disk
    point = hamal(tmp_path, "restore", "--vm", "web", "--disk", "sda", "--point", "p9", "--to", out)
    assert point.returncode == 1 and "no restore point p9" in point.stderr, point
    assert "Traceback" not in disk.stderr + point.stderr
