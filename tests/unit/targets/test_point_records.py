"""Committed point records the store refuses, points it cannot find, and what a sweep takes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hamal_workers import fsutil
from hamal_workers.targets.base import (
    CorruptManifest,
    DiskManifest,
    MissingPoint,
    PointInfo,
    TargetError,
)
from hamal_workers.targets.chunkstore import ChunkStore

CS = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "store", chunk_size=CS)


def commit(store: ChunkStore, point: str, disks: tuple[str, ...] = ("sda",)) -> Path:
    for disk in disks:
        store.stage_disk("vm1", point, DiskManifest(disk, CS, CS, [None]))
    store.commit_point("vm1", "web", point, 1.0, list(disks), {"tokens": {"sda": "t:1"}})
    return store.root / "points" / "vm1" / point / "point.json"


GOOD = {
    "version": 1,
    "vm_id": "vm1",
    "vm_name": "web",
    "point_id": "p1",
    "created": 1.0,
    "disks": {"sda": CS},
    "meta": {},
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"version": 2}, "point format version 2 is newer than this reader (1)"),
        ({"version": 0}, "unknown point format version 0"),
        ({"version": "1"}, "unknown point format version '1'"),
        ({"version": None}, "unknown point format version None"),
        ({"vm_id": "vm2"}, "it names VM 'vm2' point 'p1', not the directory it is in"),
        ({"point_id": "p9"}, "it names VM 'vm1' point 'p9', not the directory it is in"),
        ({"created": "yesterday"}, "bad created time 'yesterday'"),
        ({"created": True}, "bad created time True"),
        ({"created": None}, "bad created time None"),
        ({"vm_name": 7}, "bad vm_name 7"),
        ({"disks": ["sda"]}, "bad disks table"),
        ({"disks": {"sda": -1}}, "bad disks table"),
        ({"disks": {"sda": "65536"}}, "bad disks table"),
        ({"meta": []}, "bad meta"),
    ],
)
def test_a_point_record_that_is_not_right_is_refused_saying_why(
    store: ChunkStore, change: dict[str, object], problem: str
) -> None:
    record = commit(store, "p1")
    assert json.loads(record.read_text()) | {"created_utc": None} == GOOD | {
        "created_utc": None,
        "meta": {"tokens": {"sda": "t:1"}},
    }
    record.write_text(json.dumps(GOOD | change))
    with pytest.raises(CorruptManifest) as refused:
        store.point("vm1", "p1")
    assert str(refused.value) == f"restore point record {record}: {problem}"
    assert [b.problem for b in store.scan_points().broken] == [str(refused.value)]


def test_a_record_that_is_not_an_object_is_refused(store: ChunkStore) -> None:
    record = commit(store, "p1")
    record.write_text("[1]")
    with pytest.raises(CorruptManifest, match=r"point.json: not a JSON object$"):
        store.point("vm1", "p1")


def test_a_record_without_meta_or_with_an_empty_disk_is_read(store: ChunkStore) -> None:
    record = commit(store, "p1")
    record.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "meta"}))
    assert store.point("vm1", "p1") == PointInfo("vm1", "web", "p1", 1.0, {"sda": CS}, {})
    record.write_text(json.dumps(GOOD | {"disks": {"sda": 0}, "created": 5}))
    info = store.point("vm1", "p1")
    assert info.disks == {"sda": 0} and info.created == 5.0 and isinstance(info.created, float)


def test_missing_points_records_and_manifests_are_told_apart(store: ChunkStore) -> None:
    with pytest.raises(MissingPoint, match=r"^VM vm1 has no restore point p1$"):
        store.point("vm1", "p1")
    with pytest.raises(MissingPoint, match=r"^VM vm1 has no readable restore point$"):
        store.point("vm1", "latest")
    with pytest.raises(MissingPoint, match=r"^VM vm1 has no restore point p1$"):
        store.manifest("vm1", "p1", "sda")
    with pytest.raises(MissingPoint, match=r"^VM vm1 has no restore point p1$"):
        store.delete_point("vm1", "p1")
    record = commit(store, "p1", ("sda", "sdb"))
    (record.parent / "sdb.manifest").unlink()
    with pytest.raises(CorruptManifest, match=r"sdb.manifest is missing, yet point.json lists"):
        store.manifest("vm1", "p1", "sdb")
    with pytest.raises(TargetError, match=r"no disk 'sdc' \(its disks: sda, sdb\)$"):
        store.manifest("vm1", "p1", "sdc")
    record.unlink()
    with pytest.raises(CorruptManifest, match=r"^restore point record .*point.json is missing$"):
        store.point("vm1", "p1")


def test_a_point_with_no_disks_says_so(store: ChunkStore) -> None:
    record = commit(store, "p1")
    record.write_text(json.dumps(GOOD | {"disks": {}}))
    with pytest.raises(TargetError, match=r"no disk 'sdb' \(its disks: none\)$"):
        store.manifest("vm1", "p1", "sdb")


def test_a_point_token_is_read_only_from_a_tokens_table() -> None:
    def info(meta: dict[str, object]) -> PointInfo:
        return PointInfo("vm1", "web", "p1", 1.0, {"sda": 0}, meta)

    assert info({"tokens": {"sda": "t:1"}}).token("sda") == "t:1"
    assert info({"tokens": {"sda": "t:1"}}).token("sdb") == ""
    assert info({"tokens": ["sda"]}).token("sda") == ""
    assert info({"tokens": {"sda": 5}}).token("sda") == ""
    assert info({}).token("sda") == ""
    digest = b"\x01" * 32
    assert list(DiskManifest("sda", 3 * CS, CS, [None, digest, None]).stored_digests()) == [digest]


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_a_scan_sweep_looks_only_where_chunks_and_manifests_are_written(
    store: ChunkStore,
) -> None:
    where = {
        "tmp": store.root / "tmp",
        "staging": store.root / "staging",
        "chunks": store.root / "chunks",
        "points": store.root / "points",
    }
    left = {}
    for place, directory in where.items():
        left[place] = fsutil.temporary_name(directory / "x")
        left[place].write_bytes(b"cut short")
        age(left[place], 7200)
    assert store.sweep_temporary(everywhere=False) == 2
    assert {p for p, path in left.items() if path.exists()} == {"chunks", "points"}
    assert store.sweep_temporary() == 2
    assert not any(path.exists() for path in left.values())


def test_a_sweep_takes_old_leftovers_and_spares_recent_ones(store: ChunkStore) -> None:
    old_dir = fsutil.temporary_name(store.root / "staging" / "vm1", "discarded")
    (old_dir / "p1").mkdir(parents=True)
    (old_dir / "p1" / "sda.manifest").write_bytes(b"x")
    age(old_dir, 7200)
    recent = fsutil.temporary_name(store.root / "tmp" / "c")
    recent.write_bytes(b"x")
    just_old = fsutil.temporary_name(store.root / "tmp" / "d")
    just_old.write_bytes(b"x")
    age(just_old, 3600.5)  # an hour is the default grace of a write in progress
    damaged = fsutil.temporary_name(store.root / "chunks" / "c", "damaged")
    damaged.write_bytes(b"x")
    age(damaged, 7200)
    assert store.sweep_temporary() == 2
    assert not old_dir.exists() and not just_old.exists()
    assert recent.exists() and damaged.exists()
    assert store.sweep_temporary(older_than_s=0, damaged_older_than_s=3600) == 2
    assert not recent.exists() and not damaged.exists()


def test_discarded_and_deleted_points_leave_nothing_behind(store: ChunkStore) -> None:
    commit(store, "p1")
    store.stage_disk("vm1", "p2", DiskManifest("sda", CS, CS, [None]))
    store.discard_point("vm1", "p2")
    store.discard_point("vm1", "p3")  # nothing staged: nothing to do
    store.delete_point("vm1", "p1")
    assert os.listdir(store.root / "staging" / "vm1") == []
    assert os.listdir(store.root / "points" / "vm1") == []
    assert store.staged_points() == [] and store.point_ids("vm1") == []


def test_a_late_stage_after_the_commit_is_not_a_staged_point(store: ChunkStore) -> None:
    commit(store, "p1")
    store.stage_disk("vm1", "p2", DiskManifest("sda", CS, CS, [None]))
    # A redelivered disk task staged p1 again after its commit, sorted before p2.
    (store.root / "staging" / "vm1" / "p1").mkdir()
    (store.root / "staging" / "vm1" / "p1" / "sda.manifest").write_bytes(b"late")
    staged = store.staged_points()
    assert [(s.vm_id, s.point_id) for s in staged] == [("vm1", "p2")]
    assert 0 <= staged[0].age_s < 1


def test_a_manifest_under_another_disks_name_is_refused(store: ChunkStore) -> None:
    record = commit(store, "p1", ("sda", "sdb"))
    (record.parent / "sdb.manifest").write_bytes((record.parent / "sda.manifest").read_bytes())
    with pytest.raises(CorruptManifest, match=r"is of disk 'sda' .* expected disk 'sdb'"):
        store.manifest("vm1", "p1", "sdb")
    assert store.manifest("vm1", "p1", "sda").disk == "sda"
