"""The store's part of garbage collection, method by method: what the collector relies on.

An object store implementing the same methods must pass the same checks (docs/GC.md,
"Written against the Target interface").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hamal_workers import fsutil
from hamal_workers.targets.base import CODEC_RAW, DiskManifest, MissingChunk, MissingPoint
from hamal_workers.targets.chunkstore import ChunkStore

CS = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "store", chunk_size=CS)


def put(store: ChunkStore, content: bytes) -> bytes:
    name = store.chunk_name(content)
    store.put_chunk(name, content, CODEC_RAW, len(content))
    return name


def commit(store: ChunkStore, vm: str, point: str, contents: list[bytes]) -> list[bytes]:
    names = [put(store, c) for c in contents]
    entries: list[bytes | None] = [*names, None]
    store.stage_disk(vm, point, DiskManifest("sda", (len(names) + 1) * CS, CS, entries))
    store.commit_point(vm, vm, point, 1.0, ["sda"], {})
    return names


def test_a_condemned_chunk_is_out_of_reach_of_writers_but_still_reads(store: ChunkStore) -> None:
    name = put(store, b"kept aside")
    assert store.condemn_chunk(name, 7) == len(b"kept aside") + 5
    assert not store.has_chunk(name, 10)
    assert store.get_chunk(name) == b"kept aside"
    assert store.stored_size(name) == 15
    assert [(c.name, c.condemned) for c in store.iter_chunks()] == [(name, 7)]
    # Stored again by a writer: two copies, one under the name.
    assert store.put_chunk(name, b"kept aside", CODEC_RAW, 10) > 0
    assert sorted(c.condemned for c in store.iter_chunks()) == [0, 7]
    assert store.condemn_chunk(store.chunk_name(b"never stored"), 7) == 0


def test_revive_puts_the_copy_back_and_keeps_a_fresh_one(store: ChunkStore) -> None:
    name = put(store, b"back again")
    store.condemn_chunk(name, 3)
    assert store.revive_chunk(name, 3)
    assert store.has_chunk(name, 10) and [c.condemned for c in store.iter_chunks()] == [0]
    assert not store.revive_chunk(name, 3)  # nothing condemned any more
    store.condemn_chunk(name, 4)
    put(store, b"back again")  # stored again meanwhile: the revive keeps it
    assert store.revive_chunk(name, 4)
    assert [c.condemned for c in store.iter_chunks()] == [0]


def test_drop_deletes_only_the_condemned_copy(store: ChunkStore) -> None:
    name = put(store, b"gone for good")
    store.condemn_chunk(name, 2)
    assert store.drop_condemned(name, 1) == 0  # another round's name: nothing there
    assert store.drop_condemned(name, 2) == 18
    assert list(store.iter_chunks()) == []
    with pytest.raises(MissingChunk):
        store.get_chunk(name)
    assert store.drop_condemned(name, 2) == 0


def test_the_listing_skips_temporary_damaged_and_foreign_files(store: ChunkStore) -> None:
    name = put(store, b"the only chunk")
    directory = store.chunk_path(name).parent
    (directory / "README").write_text("not a chunk")
    fsutil.temporary_name(store.chunk_path(name), "damaged").write_bytes(b"x")
    (directory / f".{name.hex()}.condemned.xyz").write_bytes(b"x")
    assert [c.name for c in store.iter_chunks()] == [name]


def test_the_sweep_of_temporary_files_never_takes_a_condemned_copy(store: ChunkStore) -> None:
    name = put(store, b"condemned long ago")
    store.condemn_chunk(name, 1)
    assert store.sweep_temporary(older_than_s=-1, damaged_older_than_s=-1) == 0
    assert store.get_chunk(name) == b"condemned long ago"


def test_manifests_come_from_the_files_whatever_the_record_says(store: ChunkStore) -> None:
    named = commit(store, "vm1", "p1", [b"a", b"b"])
    (store.root / "points" / "vm1" / "p1" / "point.json").write_text("damaged")
    stage_names = [put(store, b"c")]
    store.stage_disk("vm1", "p2", DiskManifest("sda", CS, CS, list(stage_names)))
    (committed,) = store.iter_manifests(staged=False)
    (staged,) = store.iter_manifests(staged=True)
    assert (committed.vm_id, committed.point_id, committed.disk) == ("vm1", "p1", "sda")
    assert bytes(committed.digests) == b"".join(named) + bytes(32)
    assert (staged.point_id, bytes(staged.digests)) == ("p2", stage_names[0])


def test_a_deleted_point_waits_for_the_collector_then_is_purged(store: ChunkStore) -> None:
    named = commit(store, "vm1", "p1", [b"a", b"b"])
    store.delete_point("vm1", "p1")
    assert store.point_ids("vm1") == [] and list(store.iter_manifests(staged=False)) == []
    (deleted,) = store.iter_deleted_manifests()
    assert (deleted.vm_id, deleted.point_id) == ("vm1", "p1")
    assert bytes(deleted.digests) == b"".join(named) + bytes(32)
    store.purge_deleted("vm1", "p1")
    assert list(store.iter_deleted_manifests()) == []
    store.purge_deleted("vm1", "p1")  # twice: nothing to do
    with pytest.raises(MissingPoint):
        store.delete_point("vm1", "p1")


def test_the_collectors_record_is_written_whole(store: ChunkStore) -> None:
    assert store.gc_record() == {}
    store.save_gc_record({"round": 3, "last": {"dropped": 1}})
    assert store.gc_record() == {"round": 3, "last": {"dropped": 1}}
    assert ChunkStore(store.root).gc_record()["round"] == 3
