"""What every platform shares: the snapshot record and the VM description it carries."""

from __future__ import annotations

import json
from typing import Any

from hamal_workers.platforms.base import (
    DiskRef,
    DiskSource,
    Platform,
    Snapshot,
    VmRef,
    describe_vm,
)

VM = VmRef(
    "vm-1",
    "web",
    "test",
    (DiskRef("2001", 10, "a"), DiskRef("2000", 20, "b"), DiskRef("2002", 30, "c")),
)


def round_trip(snapshot: Snapshot) -> Snapshot:
    return Snapshot.from_json(json.loads(json.dumps(snapshot.to_json())))


def test_a_snapshot_with_its_vm_description_round_trips_through_json() -> None:
    snap = Snapshot(
        "hamal-20261125T000000Z-abcdef", "vm-1", "test", 1.5,
        {"2000": {"size": 20, "token": "t"}}, "vm", "", {"group": "g"},
        vm=describe_vm(VM, {"cpus": 2, "nics": [{"name": "eth0", "mac": "00:11:22:33:44:55"}]}),
    )  # fmt: skip
    again = round_trip(snap)
    assert again == snap
    assert again.vm["cpus"] == 2 and again.vm["nics"][0]["mac"] == "00:11:22:33:44:55"


def test_a_record_of_an_older_version_without_vm_still_loads() -> None:
    old = {
        "snapshot_id": "hamal-20261125T000000Z-abcdef", "vm_id": "vm-1", "platform": "test",
        "created": 1.5, "disks": {}, "consistency": "", "consistency_note": "", "details": {},
    }  # fmt: skip
    snap = Snapshot.from_json(old)
    assert snap.vm == {}
    assert round_trip(snap) == snap
    # A bare identity (the sweep's) has no description either.
    assert Snapshot("hamal-x", "vm-1", "test", 0.0).to_json()["vm"] == {}


def test_the_description_has_the_points_disks_in_the_vms_order_with_snapshot_sizes() -> None:
    facts = {
        "disks": [
            {"name": "2000", "device": "scsi0:0", "boot": True},
            {"name": "2002", "device": "scsi0:1"},
            {"name": "9999", "device": "scsi0:2"},  # not a disk of the point: not described
        ]
    }
    described = describe_vm(VM, facts, {"2000": {"size": 25}})
    assert described["disks"] == [
        {"name": "2000", "size": 25, "device": "scsi0:0", "boot": True},
        {"name": "2002", "size": 30, "device": "scsi0:1", "boot": False},
        {"name": "2001", "size": 10, "device": None, "boot": False},  # unordered ones last
    ]


def test_what_the_platform_does_not_say_is_null_never_a_guess() -> None:
    facts: dict[str, Any] = {
        "cpus": 0, "memory_mib": True, "guest_os": "", "firmware": None,
        "nics": [{"name": "n", "mac": "", "addresses": ["10.0.0.1", "", None]}, "junk"],
        "disks": [{"name": "2000", "boot": "yes"}],
    }  # fmt: skip
    described = describe_vm(VM, facts)
    assert (described["name"], described["id"]) == ("web", "vm-1")
    assert [described[k] for k in ("cpus", "memory_mib", "guest_os", "firmware")] == [None] * 4
    assert described["nics"] == [
        {"name": "n", "mac": None, "network": None, "addresses": ["10.0.0.1"]}
    ]
    assert not any(disk["boot"] for disk in described["disks"])
    assert set(described) == {
        "name", "id", "cpus", "memory_mib", "guest_os", "firmware", "nics", "disks",
    }  # fmt: skip


class _Bare(Platform):
    name = "bare"

    def discover(self) -> list[VmRef]:
        return [VM]

    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        raise NotImplementedError

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        raise NotImplementedError

    def leftover_snapshots(self) -> list[Snapshot]:
        return []

    def open_disk(self, snapshot: Snapshot, disk: str) -> DiskSource:
        raise NotImplementedError


def test_a_platform_that_knows_nothing_more_describes_name_id_and_disks() -> None:
    described = _Bare().describe(VM)
    assert (described["name"], described["id"], described["cpus"]) == ("web", "vm-1", None)
    assert [d["name"] for d in described["disks"]] == ["2001", "2000", "2002"]
    # Facts the inventory gave ride on the ref, outside its identity.
    with_facts = VmRef(VM.vm_id, VM.name, VM.platform, VM.disks, facts={"cpus": 8})
    assert with_facts == VM and hash(with_facts) == hash(VM)
    assert _Bare().describe(with_facts)["cpus"] == 8
