"""The local platform: discovery, consistent snapshots under concurrent writes, extents."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from pathlib import Path

import pytest

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms.base import Snapshot
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


# --------------------------------------------------------------------------- vm.json


def _vm_with_disks(tmp_path: Path, *names: str) -> tuple[LocalPlatform, Path]:
    vm_dir = tmp_path / "inv" / "web"
    vm_dir.mkdir(parents=True)
    for n, name in enumerate(names):
        (vm_dir / name).write_bytes(b"\0" * (n + 1) * 4096)
    return LocalPlatform(str(tmp_path / "inv"), str(tmp_path / "lib")), vm_dir


def test_vm_json_describes_the_vm_in_its_snapshots(tmp_path: Path) -> None:
    platform, vm_dir = _vm_with_disks(tmp_path, "b-data.img", "a-root.raw")
    (vm_dir / "vm.json").write_text(
        json.dumps(
            {
                "cpus": 4,
                "memory_mib": 8192,
                "guest_os": "debian12",
                "firmware": "efi",
                "nics": [
                    {"name": "eth0", "mac": "52:54:00:12:34:56", "network": "lan",
                     "addresses": ["192.0.2.10", "2001:db8::10"]},
                    {"name": "eth1"},
                ],
                # Listed data first: the description keeps the platform's order.
                "disks": {"b-data.img": {"device": "/dev/vdb"},
                          "a-root.raw": {"device": "/dev/vda", "boot": True}},
            }
        )
    )  # fmt: skip
    (vm,) = platform.discover()
    assert [d.name for d in vm.disks] == ["a-root.raw", "b-data.img"]  # vm.json is no disk
    snap = platform.create_snapshot(vm, "hamal-20261125T000000Z-000001")
    try:
        assert snap.vm == {
            "name": "web",
            "id": vm_id_for("web"),
            "cpus": 4,
            "memory_mib": 8192,
            "guest_os": "debian12",
            "firmware": "efi",
            "nics": [
                {"name": "eth0", "mac": "52:54:00:12:34:56", "network": "lan",
                 "addresses": ["192.0.2.10", "2001:db8::10"]},
                {"name": "eth1", "mac": None, "network": None, "addresses": []},
            ],
            "disks": [
                {"name": "a-root.raw", "size": 8192, "device": "/dev/vda", "boot": True},
                {"name": "b-data.img", "size": 4096, "device": "/dev/vdb", "boot": False},
            ],
        }  # fmt: skip
        assert platform.describe(vm) == snap.vm
        # The description travels with the snapshot's record.
        assert Snapshot.from_json(json.loads(json.dumps(snap.to_json()))).vm == snap.vm
    finally:
        platform.delete_snapshot(snap)


def test_without_vm_json_the_description_is_name_id_and_disks(tmp_path: Path) -> None:
    platform, _ = _vm_with_disks(tmp_path, "d0.raw", "d1.raw")
    (vm,) = platform.discover()
    snap = platform.create_snapshot(vm, "hamal-20261125T000000Z-000001")
    try:
        assert snap.vm == {
            "name": "web", "id": vm.vm_id, "cpus": None, "memory_mib": None,
            "guest_os": None, "firmware": None, "nics": [],
            "disks": [
                {"name": "d0.raw", "size": 4096, "device": None, "boot": False},
                {"name": "d1.raw", "size": 8192, "device": None, "boot": False},
            ],
        }  # fmt: skip
    finally:
        platform.delete_snapshot(snap)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "not a JSON object"),
        ('{"cpu": 2}', "unknown key cpu"),
        ('{"cpus": "2"}', "cpus must be a positive integer"),
        ('{"memory_mib": 0}', "memory_mib must be a positive integer"),
        ('{"cpus": true}', "cpus must be a positive integer"),
        ('{"firmware": 1}', "firmware must be a non-empty string"),
        ('{"nics": {"name": "eth0"}}', "nics must be a list"),
        ('{"nics": [{"mac": "52:54:00:12:34:56"}]}', r"nics\[0\].name must be"),
        ('{"nics": [{"name": "e", "mac": "52-54-00"}]}', "is not a MAC address"),
        ('{"nics": [{"name": "e", "addresses": ["10.0.0.300"]}]}', "is not an IP address"),
        ('{"nics": [{"name": "e", "ip": "10.0.0.1"}]}', r"unknown key nics\[0\].ip"),
        ('{"disks": {"other.raw": {"boot": true}}}', "the VM has no such disk"),
        ('{"disks": {"d0.raw": {"boot": "yes"}}}', "boot must be true or false"),
    ],
)
def test_a_malformed_vm_json_is_ignored_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, why: str
) -> None:
    platform, vm_dir = _vm_with_disks(tmp_path, "d0.raw")
    (vm_dir / "vm.json").write_text(content)
    (vm,) = platform.discover()
    with caplog.at_level(logging.WARNING, logger="hamal.local"):
        snap = platform.create_snapshot(vm, "hamal-20261125T000000Z-000001")
    try:
        # The backup goes on; the description says "unknown", not half of the file.
        assert (snap.vm["cpus"], snap.vm["nics"]) == (None, [])
        assert snap.vm["disks"] == [{"name": "d0.raw", "size": 4096, "device": None,
                                     "boot": False}]  # fmt: skip
        (record,) = [r for r in caplog.records if r.name == "hamal.local"]
        assert str(vm_dir / "vm.json") in record.getMessage()
        assert re.search(why, record.getMessage()), record.getMessage()
    finally:
        platform.delete_snapshot(snap)
