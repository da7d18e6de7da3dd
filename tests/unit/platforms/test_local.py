"""The local platform: discovery, consistent snapshots under concurrent writes, extents."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms.local import ChangeJournal, LocalPlatform, vm_id_for
from hamal_workers.simulators.local_vms import (
    ImageLayout,
    discard,
    make_image,
    scribble,
    write_at,
    writing,
)

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


def test_snapshot_has_the_allocated_extents_costs_no_copy_and_is_deleted(tmp_path: Path) -> None:
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
    taken = sum(p.stat().st_blocks * 512 for p in (tmp_path / "lib").rglob("*") if p.is_file())
    assert taken < 64 * 1024  # a snapshot records, it does not copy
    assert [s.snapshot_id for s in platform.leftover_snapshots()] == [snap.snapshot_id]
    platform.delete_snapshot(snap)
    assert platform.leftover_snapshots() == []
    assert not list((tmp_path / "lib").rglob("*.raw"))
    write_at(disk, 0, b"after")  # no snapshot left to preserve for: nothing is kept
    assert not [p for p in (tmp_path / "lib").rglob("*") if p.is_file()]


def test_a_snapshot_keeps_what_it_saw_while_the_guest_writes_fills_and_discards(
    tmp_path: Path,
) -> None:
    inv = tmp_path / "inv"
    disk = inv / "vm" / "d.raw"
    make_image(
        disk,
        ImageLayout(size=32 * MiB, random_bytes=12 * MiB, compressible_bytes=4 * MiB, piece=MiB),
        seed=4,
    )
    frozen = disk.read_bytes()
    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    snap = platform.create_snapshot(vm, "hamal-20261125T000000Z-000001")
    rng = random.Random(8)
    scribble(disk, rng, writes=40, max_len=3 * MiB)  # overwrites, and writes into holes
    discard(disk, 5 * MiB + 4096, 2 * MiB)
    write_at(disk, 32 * MiB - 100, b"z" * 100)  # the very end
    later = platform.create_snapshot(vm, "hamal-20261125T000000Z-000002")
    middle = disk.read_bytes()
    scribble(disk, rng, writes=20, max_len=3 * MiB)  # now two snapshots keep their blocks
    for taken, expected in ((snap, frozen), (later, middle)):
        with platform.open_disk(taken, "d.raw") as source:
            reader = source.open_reader()
            got = bytearray()
            for offset in range(0, len(expected), 3 * MiB + 123):  # unaligned reads
                got += reader.read(offset, min(3 * MiB + 123, len(expected) - offset))
            reader.close()
        assert bytes(got) == expected
    platform.delete_snapshot(snap)
    platform.delete_snapshot(later)


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
        # Both disks under their shared flocks at once, as one guest write spanning them.
        g = 0
        while not stop.is_set():
            g = g % 250 + 1
            with writing(disks[0]) as first, writing(disks[1]) as second:
                for guest_disk in (first, second):
                    for off in range(0, size, MiB):  # several writes: a torn copy is likely
                        guest_disk.write(off, bytes([g]) * MiB)
            generations["last"] = g

    platform = LocalPlatform(str(inv), str(tmp_path / "lib"))
    (vm,) = platform.discover()
    writer = threading.Thread(target=guest)
    writer.start()
    seen = set()
    try:
        for n in range(15):
            snap = platform.create_snapshot(vm, f"hamal-20261125T000000Z-{n:06d}")
            contents = []
            for d in disks:
                with platform.open_disk(snap, d.name) as source:
                    reader = source.open_reader()
                    contents.append(reader.read(0, size))
                    reader.close()
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
