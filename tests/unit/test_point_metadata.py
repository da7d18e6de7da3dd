"""A restore point's metadata record (hamal_workers/point_metadata.py)."""

from __future__ import annotations

from pathlib import Path

from hamal_workers.platforms.base import Snapshot
from hamal_workers.point_metadata import (
    build_record,
    drop_local,
    load_local,
    local_path,
    save_local,
)


def snapshot(vm: dict[str, object]) -> Snapshot:
    return Snapshot.from_json(
        {
            "snapshot_id": "hamal-20261126T000000.000000Z-abcdef",
            "vm_id": "vm/1",
            "platform": "vmware",
            "created": 1_800_000_000.0,
            "disks": {
                "2001": {"size": 10, "token": "52 1/9"},
                "2000": {"size": 20, "token": "52 1/8"},
            },
            "consistency": "vm",
            "vm": vm,
        }
    )


def test_disks_follow_the_vms_order_and_carry_their_chain() -> None:
    vm = {"name": "db", "cpus": 4, "disks": [{"name": "2001"}, {"name": "2000"}]}
    outcome = {
        "2000": {"size": "20", "mode": "changed", "base_point": "p0"},
        "2001": {"size": "10", "mode": "allocated", "base_point": ""},
        "2002": {"size": "5", "mode": "allocated"},  # not in the description: after, by name
    }
    record = build_record("p1", "db", snapshot(vm), outcome, ["2003: independent"])
    assert [d["name"] for d in record["disks"]] == ["2001", "2000", "2002"]
    assert record["disks"][1] == {
        "name": "2000", "size": 20, "change_id": "52 1/8", "mode": "changed", "base_point": "p0"
    }  # fmt: skip
    assert record["disks"][0]["base_point"] is None
    assert record["vm"] == vm and record["skipped"] == ["2003: independent"]
    assert record["snapshot"] == {
        "id": "hamal-20261126T000000.000000Z-abcdef", "consistency": "vm", "consistency_note": ""
    }  # fmt: skip
    assert record["created_utc"].startswith("2027-01-15T")


def test_local_copies_are_saved_read_and_dropped(tmp_path: Path) -> None:
    record = build_record("p1", "db", snapshot({}), {"2000": {"size": "20"}}, [])
    save_local(str(tmp_path), record)
    # A VM id with a slash stays one directory: names are encoded as in the store.
    assert local_path(str(tmp_path), "vm/1", "p1").parent.parent == tmp_path / "metadata"
    assert load_local(str(tmp_path), "vm/1", "p1") == record
    assert load_local(str(tmp_path), "vm/1", "p2") is None
    drop_local(str(tmp_path), "vm/1", ["p1", "p2"])
    assert load_local(str(tmp_path), "vm/1", "p1") is None
