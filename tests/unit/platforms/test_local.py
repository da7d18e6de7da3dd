"""The local platform: discovery, consistent snapshots under concurrent writes, extents."""

from __future__ import annotations

import fcntl
import os
import random
import threading
from pathlib import Path

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms.local import ChangeJournal, LocalPlatform, vm_id_for
from hamal_workers.simulators.local_vms import scribble, write_at

MiB = 1024 * 1024


def test_discovery_finds_vms_and_their_raw_and_img_disks(tmp_path: Path) -> None:
    inv = tmp_path / "inv"
    (inv / "web").mkdir(parents=True)
    (inv / "web" / "a.raw").write_bytes(b"x" * 10)
    (inv / "web" / "b.img").write_bytes(b"")
    (inv / "web" / "notes.txt").write_text("not a disk")
    (inv / "empty").mkdir()
    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    assert vm.name == "web" and vm.vm_id == vm_id_for("web")
    assert [d.name for d in vm.disks] == ["a.raw", "b.img"]
    assert vm.disks[0].size == 10


def test_snapshot_is_sparse_has_allocated_extents_and_is_deleted(tmp_path: Path) -> None:
    inv = tmp_path / "inv"
    (inv / "vm").mkdir(parents=True)
    disk = inv / "vm" / "d.raw"
    with disk.open("wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(8 * MiB)
        fh.write(b"\x01" * MiB)
    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    snap = platform.create_snapshot(vm, "hamal-20261125T000000Z-abcdef")
    with platform.open_disk(snap, "d.raw") as source:
        assert source.allocated_extents() == [Extent(8 * MiB, MiB)]
        assert source.token == "" and source.changed_extents("x:1") is None  # no tracking
        reader = source.open_reader()
        assert reader.read(8 * MiB, 4) == b"\x01" * 4
        reader.close()
    copy = Path(snap.disks["d.raw"]["path"])
    assert copy.stat().st_blocks * 512 < 4 * MiB  # the holes stayed holes
    assert [s.snapshot_id for s in platform.leftover_snapshots()] == [snap.snapshot_id]
    platform.delete_snapshot(snap)
    assert platform.leftover_snapshots() == []
    assert not copy.exists()
    assert not list((tmp_path / "lib").rglob("*.raw"))


def test_snapshot_is_one_instant_for_every_disk_while_guests_write(tmp_path: Path) -> None:
    """A writer fills both disks with generation g under shared flocks; every snapshot
    must show one generation on both disks, never a torn mix."""
    inv = tmp_path / "inv"
    (inv / "vm").mkdir(parents=True)
    size = 4 * MiB
    disks = [inv / "vm" / "d0.raw", inv / "vm" / "d1.raw"]
    for d in disks:
        d.write_bytes(bytes(size))
    stop = threading.Event()
    generations = {"last": 0}

    def guest() -> None:
        fds = [os.open(d, os.O_RDWR) for d in disks]
        try:
            g = 0
            while not stop.is_set():
                g = g % 250 + 1
                for fd in fds:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                for fd in fds:
                    for off in range(0, size, MiB):  # several writes: a torn copy is likely
                        os.pwrite(fd, bytes([g]) * MiB, off)
                for fd in fds:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                generations["last"] = g
        finally:
            for fd in fds:
                os.close(fd)

    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    writer = threading.Thread(target=guest)
    writer.start()
    seen = set()
    try:
        for n in range(15):
            snap = platform.create_snapshot(vm, f"s{n}")
            contents = [Path(snap.disks[d.name]["path"]).read_bytes() for d in disks]
            first = contents[0][0]
            for data in contents:
                assert data == bytes([first]) * size, f"snapshot {n} is torn"
            seen.add(first)
            platform.delete_snapshot(snap)
    finally:
        stop.set()
        writer.join()
    assert len(seen) > 1, "the guest never wrote between snapshots: the test proved nothing"


def test_change_journal_reports_exactly_what_was_written_between_snapshots(
    tmp_path: Path,
) -> None:
    inv = tmp_path / "inv"
    (inv / "vm").mkdir(parents=True)
    disk = inv / "vm" / "d.raw"
    with disk.open("wb") as fh:
        fh.truncate(64 * MiB)
    ChangeJournal(disk).reset()
    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    assert [d.name for d in vm.disks] == ["d.raw"]  # the journal is not a disk
    base = platform.create_snapshot(vm, "hamal-20261125T000000Z-000001")
    write_at(disk, 5 * MiB, b"a" * 100)
    write_at(disk, 40 * MiB, b"b" * MiB)
    now = platform.create_snapshot(vm, "hamal-20261125T000000Z-000002")
    with platform.open_disk(now, "d.raw") as source:
        assert source.changed_extents(base.token("d.raw")) == [
            Extent(5 * MiB, 100),
            Extent(40 * MiB, MiB),
        ]
        assert source.changed_extents(now.token("d.raw")) == []
        assert source.changed_extents("") is None
    # A reset (CBT turned off and on) makes every older token unknown: "cannot tell".
    ChangeJournal(disk).reset()
    after_reset = ChangeJournal(disk).token()
    scribble(disk, random.Random(1), writes=2)
    later = platform.create_snapshot(vm, "hamal-20261125T000000Z-000003")
    with platform.open_disk(later, "d.raw") as source:
        assert source.changed_extents(base.token("d.raw")) is None
        assert len(source.changed_extents(after_reset) or []) == 2
