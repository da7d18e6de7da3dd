"""What the chunk store makes durable, when, and what a crash or a full disk leaves.

fsync and fdatasync are observed by wrapping the os functions (the OS, not our code):
each call records the path its descriptor is open on, read from /proc/self/fd.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hamal_workers import fsutil
from hamal_workers.targets import chunkstore
from hamal_workers.targets.base import (
    CODEC_RAW,
    DiskManifest,
    MissingChunk,
    TargetError,
    TargetFull,
)
from hamal_workers.targets.chunkstore import CHUNK_MAGIC, ChunkStore

CS = 64 * 1024


class SyncLog:
    """Every fsync and fdatasync of this process while installed: (call, path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Path]] = []
        self._lock = threading.Lock()
        for call in ("fsync", "fdatasync"):
            monkeypatch.setattr(os, call, self._recording(call, getattr(os, call)))

    def _recording(self, call: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def record(fd: int) -> None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            with self._lock:
                self.calls.append((call, path))
            real(fd)

        return record

    def take(self) -> list[tuple[str, Path]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def sync_log(monkeypatch: pytest.MonkeyPatch) -> SyncLog:
    return SyncLog(monkeypatch)


def put(store: ChunkStore, content: bytes) -> bytes:
    name = store.chunk_name(content)
    store.put_chunk(name, content, CODEC_RAW, len(content))
    return name


def chunk_dirs(store: ChunkStore, name: bytes) -> set[Path]:
    """The directories a first chunk of its prefix adds entries to."""
    leaf = store.chunk_path(name).parent
    return {leaf, leaf.parent, leaf.parent.parent}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if fsutil.TEMPORARY_NAME.match(p.name)]


# --- put: durable before it is named --------------------------------------------------


def test_a_chunk_is_fdatasynced_before_its_name_appears(
    tmp_path: Path, sync_log: SyncLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    content = os.urandom(CS)
    name = store.chunk_name(content)
    seen_name_at_sync: list[bool] = []
    recording = os.fdatasync

    def fdatasync(fd: int) -> None:
        seen_name_at_sync.append(store.chunk_path(name).exists())
        recording(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    sync_log.take()
    store.put_chunk(name, content, CODEC_RAW, CS)
    assert seen_name_at_sync == [False]
    [(call, path)] = sync_log.take()
    # Written in the store's tmp/, where a put cut short is swept at the next scan.
    assert call == "fdatasync" and path.parent == store.root / "tmp"
    assert fsutil.TEMPORARY_NAME.match(path.name)


def test_sync_fsyncs_exactly_the_directories_this_store_changed(
    tmp_path: Path, sync_log: SyncLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sync", lambda: pytest.fail("a whole-system sync"))
    mine = ChunkStore(tmp_path / "mine", chunk_size=CS)
    other = ChunkStore(tmp_path / "other", chunk_size=CS)
    same_root = ChunkStore(tmp_path / "mine")  # another worker on the same store
    first, second = put(mine, b"first"), put(mine, b"second")
    theirs = put(other, b"theirs")
    put(same_root, b"written by another object")
    sync_log.take()

    mine.sync()
    assert {path for _, path in sync_log.take()} == chunk_dirs(mine, first) | chunk_dirs(
        mine, second
    )
    mine.sync()  # nothing written since: nothing to do
    assert sync_log.take() == []

    other.sync()
    assert {path for _, path in sync_log.take()} == chunk_dirs(other, theirs)
    assert not hasattr(chunkstore, "_syncfs")


def test_sync_covers_puts_from_every_thread(tmp_path: Path, sync_log: SyncLog) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    contents = [os.urandom(1000) for _ in range(40)]
    with ThreadPoolExecutor(10) as pool:
        names = list(pool.map(lambda c: put(store, c), contents))
    sync_log.take()
    store.sync()
    synced = {path for call, path in sync_log.take() if call == "fsync"}
    assert {store.chunk_path(n).parent for n in names} <= synced


def test_a_writeback_error_in_sync_names_the_directory_and_is_retried(
    tmp_path: Path, sync_log: SyncLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    name = put(store, b"chunk")
    recording = os.fsync
    lost = [True]

    def fsync(fd: int) -> None:
        if lost[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        recording(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TargetError, match=r"cannot make .*chunks.* durable: Input/output error"):
        store.sync()
    lost[0] = False
    sync_log.take()
    store.sync()  # the directories are still owed
    assert {path for _, path in sync_log.take()} == chunk_dirs(store, name)


def test_stage_disk_is_durable_with_its_chunks_when_it_returns(
    tmp_path: Path, sync_log: SyncLog
) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    name = put(store, b"a chunk of the disk")
    sync_log.take()
    store.stage_disk("vm1", "p1", DiskManifest("sda", CS, CS, [name]))
    staging = store.root / "staging" / "vm1" / "p1"
    calls = sync_log.take()
    manifest_at = [i for i, (c, p) in enumerate(calls) if p.name.startswith(".sda.manifest")]
    assert [calls[i][0] for i in manifest_at] == ["fdatasync"]
    # The chunk's directories first: the manifest never names a chunk a crash could lose.
    before = {p for c, p in calls[: manifest_at[0]] if c == "fsync"}
    assert chunk_dirs(store, name) <= before
    fsynced = {p for c, p in calls if c == "fsync"}
    # The manifest's directory, and the parents that gained the new directories.
    assert {staging, staging.parent, staging.parent.parent} <= fsynced


# --- crashes and write errors ---------------------------------------------------------


def test_what_a_crash_mid_put_leaves_is_never_a_chunk(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    content = os.urandom(CS)
    name = store.chunk_name(content)
    path = store.chunk_path(name)
    path.parent.mkdir(parents=True)
    # A crash while writing, and one after the fdatasync but before the rename.
    half = fsutil.temporary_name(path)
    half.write_bytes(CHUNK_MAGIC + bytes([CODEC_RAW]) + content[: CS // 3])
    whole = fsutil.temporary_name(path)
    whole.write_bytes(CHUNK_MAGIC + bytes([CODEC_RAW]) + content)
    assert not store.has_chunk(name, CS) and not store.has_chunk(name, CS, content)
    with pytest.raises(MissingChunk):
        store.get_chunk(name)
    assert store.put_chunk(name, content, CODEC_RAW, CS) == CS + 5
    assert store.get_chunk(name) == content
    os.utime(half, (0, 0))
    os.utime(whole, (0, 0))
    assert store.sweep_temporary() == 2
    assert os.listdir(path.parent) == [path.name]


def test_a_write_error_leaves_no_name_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=CS)
    content = os.urandom(CS)
    name = store.chunk_name(content)

    def lost(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", lost)
    with pytest.raises(TargetError, match=f"cannot store chunk {name.hex()}: Input/output"):
        store.put_chunk(name, content, CODEC_RAW, CS)
    monkeypatch.undo()
    assert not store.chunk_path(name).exists() and temporaries(store.root) == []
    assert store.put_chunk(name, content, CODEC_RAW, CS) == CS + 5


# --- a full target --------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB filesystem (tmpfs), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """A file that takes all the room but `leave` bytes (all of it for leave=0)."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    room = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        try:
            while room > 0:
                room -= f.write(b"\xff" * min(room, 1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.timeout(120)  # a mount that hangs must not hang the suite
def test_a_full_target_refuses_a_chunk_cleanly_and_takes_it_once_there_is_room(
    small_fs: Path,
) -> None:
    store = ChunkStore(small_fs / "store", chunk_size=CS)
    filler = fill(small_fs, leave=CS // 2)
    stored, refused = [], None
    for _ in range(8):
        content = os.urandom(CS // 4)
        try:
            stored.append((put(store, content), content))
        except TargetFull as exc:
            refused = (content, exc)
            break
    assert refused is not None, "the filesystem never filled up"
    content, exc = refused
    assert str(store.root) in str(exc) and "is full" in str(exc)
    assert temporaries(store.root) == []
    assert not store.has_chunk(store.chunk_name(content), len(content))
    assert all(store.has_chunk(n, len(c), c) for n, c in stored)
    assert 0 <= store.free_bytes() < CS

    filler.unlink()
    assert store.free_bytes() > 4 * CS
    assert store.get_chunk(put(store, content)) == content


@pytest.mark.timeout(120)  # a mount that hangs must not hang the suite
def test_a_full_target_refuses_stage_and_commit_and_shows_no_point(small_fs: Path) -> None:
    store = ChunkStore(small_fs / "store", chunk_size=CS)
    name = put(store, os.urandom(1000))
    store.stage_disk("vm1", "p1", DiskManifest("sda", 1000, CS, [name]))
    filler = fill(small_fs, leave=0)
    with pytest.raises(TargetFull, match="is full: cannot stage disk 'sdb'"):
        store.stage_disk("vm1", "p1", DiskManifest("sdb", 1000, CS, [name]))
    with pytest.raises(TargetFull, match="is full: cannot commit VM vm1 point p1"):
        store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {})
    assert store.point_ids("vm1") == [] and temporaries(store.root) == []
    assert store.staged_disks("vm1", "p1") == ["sda"]
    filler.unlink()
    assert list(store.commit_point("vm1", "web", "p1", 1.0, ["sda"], {}).disks) == ["sda"]
