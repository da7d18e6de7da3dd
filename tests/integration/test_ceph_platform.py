"""The Ceph platform against a real cluster: snapshots, change extents and reads.

Extent lists are checked by replaying them, as the engine uses them: the base export
with every reported extent read from the new snapshot must equal the new snapshot's
`rbd export` byte for byte (diff_iterate may report more than was written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from hamal_workers.config import CephSection, OpenstackSection
from hamal_workers.platforms.base import (
    DiskRef,
    PlatformError,
    Snapshot,
    VmRef,
    new_run_id,
    snapshot_name,
)
from hamal_workers.platforms.openstack_ceph import DiskFlags, OpenStackCephPlatform
from hamal_workers.simulators.openstack import Nic, OpenStackSimulator
from tests.integration.ceph_rig import MiB, Rbd

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def platform(ceph: Any) -> Iterator[OpenStackCephPlatform]:
    section = CephSection(conf=str(ceph.conf), keyring=str(ceph.keyring))
    p = OpenStackCephPlatform(None, section, DiskFlags(min_size_mb=1))  # type: ignore[arg-type]
    yield p
    p.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def vm_of(*disks: tuple[str, str]) -> VmRef:
    """A VM of the given (disk name, pool/image) pairs, as discovery would give it."""
    refs = tuple(DiskRef(name, 0, where) for name, where in disks)
    return VmRef(unique("vm"), "test-vm", "ceph", refs)


def snap(platform: OpenStackCephPlatform, vm: VmRef) -> Snapshot:
    return platform.create_snapshot(vm, snapshot_name(new_run_id()))


def replay(platform: OpenStackCephPlatform, snapshot: Snapshot, disk: str, base: bytes,
           extents: list[Any]) -> bytes:  # fmt: skip
    size = int(snapshot.disks[disk]["size"])
    out = bytearray(base[:size].ljust(size, b"\0"))
    with platform.open_disk(snapshot, disk) as source:
        reader = source.open_reader()
        try:
            for extent in extents:
                out[extent.offset : extent.offset + extent.length] = reader.read(
                    extent.offset, extent.length
                )
        finally:
            reader.close()
    return bytes(out)


def cleanup(platform: OpenStackCephPlatform, *snapshots: Snapshot) -> None:
    for s in snapshots:
        platform.delete_snapshot(s)


def test_group_snapshot_of_two_pools_and_exact_incremental(
    platform: OpenStackCephPlatform, rb: Rbd
) -> None:
    vol, eph = unique("volume"), unique("srv") + "_disk"
    rb.create("volumes", vol, 64 * MiB)
    rb.create("vms", eph, 32 * MiB)
    rb.fill("volumes", vol, seed=1, pieces=12)
    rb.fill("vms", eph, seed=2, pieces=6)
    vm = vm_of(("vda-ephemeral", f"vms/{eph}"), ("vdb-vol", f"volumes/{vol}"))
    first = snap(platform, vm)
    assert first.consistency == "group", first.consistency_note
    assert first.details["group"] == f"volumes/{first.snapshot_id}"
    base = {
        "vdb-vol": rb.export("volumes", vol, first.snapshot_id),
        "vda-ephemeral": rb.export("vms", eph, first.snapshot_id),
    }
    for disk, data in base.items():
        with platform.open_disk(first, disk) as source:
            allocated = source.allocated_extents()
        assert replay(platform, first, disk, b"", allocated) == data, disk

    # Between syncs: writes, a discard, and the volume grows.
    rb.write("volumes", vol, 5 * MiB + 123, os.urandom(70_000))
    with rb.image("volumes", vol) as img:
        img.discard(8 * MiB, 4 * MiB)
        img.resize(96 * MiB)
        img.write(os.urandom(MiB), 90 * MiB)
    rb.write("vms", eph, 31 * MiB, b"tail" * 1000)
    platform.trim_snapshot(first)
    assert first.snapshot_id not in rb.user_snaps("volumes", vol) or True
    second = snap(platform, vm)
    assert second.consistency == "group"
    for disk, (pool, image) in {"vdb-vol": ("volumes", vol), "vda-ephemeral": ("vms", eph)}.items():
        with platform.open_disk(second, disk) as source:
            changed = source.changed_extents(first.token(disk))
        assert changed is not None, disk
        want = rb.export(pool, image, second.snapshot_id)
        assert replay(platform, second, disk, base[disk], changed) == want, disk
    assert second.disks["vdb-vol"]["size"] == 96 * MiB
    cleanup(platform, first, second)
    assert rb.user_snaps("volumes", vol) == [] and rb.user_snaps("vms", eph) == []


def test_shrunk_image_replays_exactly(platform: OpenStackCephPlatform, rb: Rbd) -> None:
    vol = unique("volume")
    rb.create("volumes", vol, 48 * MiB)
    rb.fill("volumes", vol, seed=3, pieces=20)
    vm = vm_of(("vda-vol", f"volumes/{vol}"))
    first = snap(platform, vm)
    assert first.consistency == "vm"
    base = rb.export("volumes", vol, first.snapshot_id)
    with rb.image("volumes", vol) as img:
        img.resize(20 * MiB)
        img.resize(40 * MiB)  # the area cut and grown back reads as zeros
        img.write(os.urandom(4096), 3 * MiB)
    second = snap(platform, vm)
    with platform.open_disk(second, "vda-vol") as source:
        changed = source.changed_extents(first.token("vda-vol"))
    assert changed is not None
    want = rb.export("volumes", vol, second.snapshot_id)
    assert replay(platform, second, "vda-vol", base, changed) == want
    cleanup(platform, first, second)


def test_clone_reads_its_parent_data(platform: OpenStackCephPlatform, rb: Rbd) -> None:
    import rbd

    parent, child = unique("image"), unique("volume")
    rb.create("volumes", parent, 32 * MiB)
    rb.fill("volumes", parent, seed=4, pieces=10)
    with rb.image("volumes", parent) as img:
        img.create_snap("base")
        img.protect_snap("base")
    rbd.RBD().clone(rb.io("volumes"), parent, "base", rb.io("volumes"), child,
                    features=1 | 4 | 8 | 16 | 32)  # fmt: skip
    rb.write("volumes", child, 2 * MiB, os.urandom(MiB))
    vm = vm_of(("vda-clone", f"volumes/{child}"))
    first = snap(platform, vm)
    with platform.open_disk(first, "vda-clone") as source:
        allocated = source.allocated_extents()
    assert replay(platform, first, "vda-clone", b"", allocated) == rb.export(
        "volumes", child, first.snapshot_id
    )
    rb.write("volumes", child, 20 * MiB, os.urandom(5000))
    second = snap(platform, vm)
    with platform.open_disk(second, "vda-clone") as source:
        changed = source.changed_extents(first.token("vda-clone"))
    assert changed is not None
    base = rb.export("volumes", child, first.snapshot_id)
    want = rb.export("volumes", child, second.snapshot_id)
    assert replay(platform, second, "vda-clone", base, changed) == want
    cleanup(platform, first, second)


def test_a_base_snapshot_deleted_behind_our_back_means_cannot_tell(
    platform: OpenStackCephPlatform, rb: Rbd
) -> None:
    vol = unique("volume")
    rb.create("volumes", vol, 16 * MiB)
    rb.fill("volumes", vol, seed=5, pieces=4)
    vm = vm_of(("vda-vol", f"volumes/{vol}"))
    first = snap(platform, vm)
    with rb.image("volumes", vol) as img:
        img.remove_snap(first.snapshot_id)  # someone else did this
    second = snap(platform, vm)
    with platform.open_disk(second, "vda-vol") as source:
        assert source.changed_extents(first.token("vda-vol")) is None
        # A snapshot of the same name made again is not the one the token names.
        with rb.image("volumes", vol) as img:
            img.create_snap(first.snapshot_id)
        assert source.changed_extents(first.token("vda-vol")) is None
    cleanup(platform, first, second)


def test_an_invalid_object_map_means_cannot_tell(
    platform: OpenStackCephPlatform, rb: Rbd, ceph: Any
) -> None:
    vol = unique("volume")
    rb.create("volumes", vol, 16 * MiB)
    rb.fill("volumes", vol, seed=6, pieces=4)
    vm = vm_of(("vda-vol", f"volumes/{vol}"))
    first = snap(platform, vm)
    # Turning the object map off and on again leaves it invalid until rebuilt.
    ceph.cli("rbd", "feature", "disable", f"volumes/{vol}", "fast-diff", "object-map")
    ceph.cli("rbd", "feature", "enable", f"volumes/{vol}", "object-map", "fast-diff")
    second = snap(platform, vm)
    with platform.open_disk(second, "vda-vol") as source:
        assert source.changed_extents(first.token("vda-vol")) is None
    cleanup(platform, first, second)


def test_a_token_of_a_replaced_image_means_cannot_tell(
    platform: OpenStackCephPlatform, rb: Rbd
) -> None:
    import rbd

    vol = unique("volume")
    rb.create("volumes", vol, 16 * MiB)
    vm = vm_of(("vda-vol", f"volumes/{vol}"))
    first = snap(platform, vm)
    platform.delete_snapshot(first)
    rbd.RBD().remove(rb.io("volumes"), vol)
    rb.create("volumes", vol, 16 * MiB)
    second = snap(platform, vm)
    assert second.disks["vda-vol"]["identity"] != first.disks["vda-vol"]["identity"]
    with platform.open_disk(second, "vda-vol") as source:
        assert source.changed_extents(first.token("vda-vol")) is None
    cleanup(platform, second)


def test_an_image_in_another_group_is_snapshotted_on_its_own(
    platform: OpenStackCephPlatform, rb: Rbd
) -> None:
    import rbd

    a, b, group = unique("volume"), unique("volume"), unique("cinder-group")
    rb.create("volumes", a, 8 * MiB)
    rb.create("volumes", b, 8 * MiB)
    rbd.RBD().group_create(rb.io("volumes"), group)
    rbd.Group(rb.io("volumes"), group).add_image(rb.io("volumes"), b)
    vm = vm_of(("vda-a", f"volumes/{a}"), ("vdb-b", f"volumes/{b}"))
    s = snap(platform, vm)
    assert s.consistency == "disk"
    assert "already in another group" in s.consistency_note
    assert s.details == {}
    assert s.snapshot_id not in rbd.RBD().group_list(rb.io("volumes"))
    assert list(rbd.Group(rb.io("volumes"), group).list_images())  # theirs, untouched
    cleanup(platform, s)
    rbd.RBD().group_remove(rb.io("volumes"), group)


def test_deletes_only_its_own_snapshots(platform: OpenStackCephPlatform, rb: Rbd) -> None:
    vol = unique("volume")
    rb.create("volumes", vol, 8 * MiB)
    with rb.image("volumes", vol) as img:
        img.create_snap("operator-backup")
        img.create_snap("hamal-not-a-run-id")
    vm = vm_of(("vda-vol", f"volumes/{vol}"))
    s = snap(platform, vm)
    # From its identity alone, as the sweep has it after Redis was lost.
    platform.delete_snapshot(dataclasses.replace(s, disks={}, details={}))
    assert sorted(rb.user_snaps("volumes", vol)) == ["hamal-not-a-run-id", "operator-backup"]
    with pytest.raises(PlatformError, match="not one of the proxy's snapshots"):
        platform.delete_snapshot(dataclasses.replace(s, snapshot_id="operator-backup"))
    assert sorted(rb.user_snaps("volumes", vol)) == ["hamal-not-a-run-id", "operator-backup"]
    with rb.image("volumes", vol) as img:
        img.remove_snap("operator-backup")
        img.remove_snap("hamal-not-a-run-id")


def test_a_failed_snapshot_leaves_nothing(platform: OpenStackCephPlatform, rb: Rbd) -> None:
    vol = unique("volume")
    rb.create("volumes", vol, 8 * MiB)
    vm = vm_of(("vda-vol", f"volumes/{vol}"), ("vdb-gone", "volumes/no-such-image"))
    with pytest.raises(PlatformError, match="does not exist"):
        snap(platform, vm)
    assert rb.user_snaps("volumes", vol) == []


def test_rbd_export_is_a_real_peer(rb: Rbd) -> None:
    """The reference the tests compare with comes from the rbd command, not from our reader."""
    vol = unique("volume")
    rb.create("volumes", vol, 4 * MiB)
    rb.write("volumes", vol, MiB, b"peer")
    data = rb.export("volumes", vol)
    assert len(data) == 4 * MiB and data[MiB : MiB + 4] == b"peer"
    with pytest.raises(subprocess.CalledProcessError):
        rb.export("volumes", "no-such-image")


def test_writes_between_the_two_snapshot_steps_reach_the_next_incremental(
    ceph: Any, rb: Rbd
) -> None:
    """The image snapshots (the next diff's base) come before the group snapshot (what is
    read). A guest write between them is in the view read now; were the order the other
    way round, the next diff would start after it and miss it. Swapping the two steps in
    `create_snapshot` makes this test fail."""
    vol, other = unique("volume"), unique("volume")
    rb.create("volumes", vol, 16 * MiB)
    rb.create("volumes", other, 8 * MiB)
    rb.fill("volumes", vol, seed=7, pieces=4)

    class GuestWritesMidway(OpenStackCephPlatform):
        write = True

        def _between_snapshot_steps(self, vm: VmRef) -> None:
            if self.write:
                rb.write("volumes", vol, 9 * MiB + 512, b"written between the two steps")

    section = CephSection(conf=str(ceph.conf), keyring=str(ceph.keyring))
    platform = GuestWritesMidway(None, section)  # type: ignore[arg-type]
    vm = vm_of(("vda", f"volumes/{vol}"), ("vdb", f"volumes/{other}"))
    first = snap(platform, vm)
    assert first.consistency == "group"
    with platform.open_disk(first, "vda") as source:
        stored = replay(platform, first, "vda", b"", source.allocated_extents())
    platform.write = False
    second = snap(platform, vm)
    with platform.open_disk(second, "vda") as source:
        changed = source.changed_extents(first.token("vda"))
    assert changed is not None
    assert replay(platform, second, "vda", stored, changed) == rb.export(
        "volumes", vol, second.snapshot_id
    )
    cleanup(platform, first, second)


def test_a_snapshot_describes_the_instance_from_nova(
    cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    data = cloud.create_volume("data", 8 * MiB)
    nics = [
        Nic("private", fixed_ips=("10.0.0.5",), floating_ips=("203.0.113.7",)),
        Nic("storage"),  # a port without an IP: in no address, still a NIC
    ]
    server = cloud.create_server(
        "desc-1", boot_image_size=16 * MiB, volumes=[data], vcpus=2, ram_mib=4096, nics=nics
    )
    boot_volume = cloud.create_volume("root", 8 * MiB)
    from_volume = cloud.create_server("desc-2", volumes=[boot_volume])
    auth = cloud.connect_kwargs()
    section = OpenstackSection(
        **{k: auth[k] for k in ("auth_url", "username", "password", "project_name")}
    )
    ceph_section = CephSection(conf=str(ceph.conf), keyring=str(ceph.keyring))
    with OpenStackCephPlatform(section, ceph_section, DiskFlags(min_size_mb=1)) as platform:
        vm = platform.vm(server)
        taken = snap(platform, vm)
        try:
            described = taken.vm
        finally:
            cleanup(platform, taken)
        on_volume = platform.describe(platform.vm(from_volume))
    ports = {p["mac"]: p for p in cloud.state()["servers"][0]["ports"]}
    private, storage = described["nics"]
    assert (described["name"], described["id"]) == ("desc-1", server)
    assert (described["cpus"], described["memory_mib"]) == (2, 4096)
    assert (described["guest_os"], described["firmware"]) == (None, None)  # Glance's to say
    assert private["mac"] in ports and private["name"] == ports[private["mac"]]["id"]
    assert (private["network"], private["addresses"]) == ("private", ["10.0.0.5", "203.0.113.7"])
    assert storage["addresses"] == [] and storage["network"] == ports[storage["mac"]]["net_id"]
    assert described["disks"] == [
        {"name": "vda-ephemeral", "size": 16 * MiB, "device": "/dev/vda", "boot": True},
        {"name": f"vdb-{data}", "size": 8 * MiB, "device": "/dev/vdb", "boot": False},
    ]
    assert on_volume["disks"] == [
        {"name": f"vda-{boot_volume}", "size": 8 * MiB, "device": "/dev/vda", "boot": True}
    ]
    assert on_volume["nics"] == [] and on_volume["cpus"] == 1
    assert auth["password"] not in json.dumps(described)
