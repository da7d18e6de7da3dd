"""The chunk store in a bucket (targets/s3store.py) against a real S3 HTTP server: chunks,
the life of a point, commits cut short, deletion and the collector's operations."""

from __future__ import annotations

from typing import Any

import pytest
import zstandard

from hamal_workers.config import S3Section
from hamal_workers.targets.base import (
    CODEC_RAW,
    CODEC_ZSTD,
    CorruptChunk,
    DiskManifest,
    MissingChunk,
    MissingPoint,
    MissingStagedDisk,
    TargetError,
)
from hamal_workers.targets.objects import Bucket
from hamal_workers.targets.s3store import S3Store
from hamal_workers.testbeds import s3 as testbed

pytestmark = pytest.mark.timeout(120)
CS = 64 * 1024


def bucket(server: Any, **keys: object) -> Bucket:
    base: dict[str, object] = {
        "endpoint_url": server.endpoint_url, "bucket": "hamal", "prefix": "stores/one",
        "access_key": testbed.ACCESS_KEY, "secret_key": testbed.SECRET_KEY, "max_attempts": 3,
    }  # fmt: skip
    return Bucket(S3Section(**{**base, **keys}))  # type: ignore[arg-type]


@pytest.fixture
def store(s3: Any) -> S3Store:
    return S3Store(bucket(s3), chunk_size=CS, full_compare_days=1)


def put(store: S3Store, content: bytes, codec: int = CODEC_RAW) -> bytes:
    name = store.chunk_name(content)
    payload = zstandard.ZstdCompressor().compress(content) if codec == CODEC_ZSTD else content
    store.put_chunk(name, payload, codec, len(content))
    return name


def stage(store: S3Store, vm: str, point: str, disk: str = "sda", chunks: int = 2) -> None:
    entries: list[bytes | None] = [put(store, f"{vm}/{point}/{i}".encode()) for i in range(chunks)]
    store.stage_disk(vm, point, DiskManifest(disk, chunks * CS, CS, entries))


def test_a_new_store_is_made_only_in_an_empty_place(s3: Any) -> None:
    first = S3Store(bucket(s3), chunk_size=CS)
    assert S3Store(bucket(s3)).chunk_size == CS  # reopened: its own chunk size
    with pytest.raises(TargetError, match="uses chunks of 65536 bytes, not 131072"):
        S3Store(bucket(s3), chunk_size=2 * CS)
    with pytest.raises(TargetError, match="no chunk store at s3://hamal/stores/two/"):
        S3Store(bucket(s3, prefix="stores/two"), create=False)
    s3.client().put_object(Bucket="hamal", Key="photos/cat.jpg", Body=b"meow")
    with pytest.raises(TargetError, match="is not empty and has no format.json.*photos/cat"):
        S3Store(bucket(s3, prefix=""))
    assert first.chunk_size == CS


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_chunks_round_trip_and_put_is_idempotent(store: S3Store, codec: int) -> None:
    content = b"hamal " * 5000
    name = put(store, content, codec)
    assert store.get_chunk(name) == content
    assert store.has_chunk(name, len(content), content)
    assert store.put_chunk(name, content, CODEC_RAW, len(content)) == 0
    with pytest.raises(MissingChunk, match=f"chunk {'00' * 32} is missing: s3://hamal/stores"):
        store.get_chunk(bytes(32))


def test_a_damaged_object_is_found_quarantined_and_stored_again(s3: Any, store: S3Store) -> None:
    content = b"precious data " * 1000
    name = put(store, content)
    key = "stores/one/" + store.chunk_key(name)
    raw = bytearray(s3.client().get_object(Bucket="hamal", Key=key)["Body"].read())
    raw[100] ^= 0xFF  # a flipped byte, same size and metadata: only a full compare sees it
    s3.client().put_object(Bucket="hamal", Key=key, Body=bytes(raw), Metadata={"length": "14000"})
    with pytest.raises(CorruptChunk, match="holds content that hashes to"):
        store.get_chunk(name)
    assert not store.has_chunk(name, len(content), content)  # compared in full: quarantined
    assert store.put_chunk(name, content, CODEC_RAW, len(content)) > 0
    assert store.get_chunk(name) == content
    aside = [o["Key"] for o in s3.client().list_objects_v2(Bucket="hamal",
             Prefix="stores/one/quarantine/")["Contents"]]  # fmt: skip
    assert any(k.endswith(".reason") for k in aside) and len(aside) == 2
    # A foreign object under a chunk's name (no length recorded): never taken for the chunk.
    s3.client().put_object(Bucket="hamal", Key=key, Body=b"HMC1\x00short")
    assert not store.has_chunk(name, len(content))


def test_a_point_appears_only_when_committed_and_only_with_its_disks(store: S3Store) -> None:
    stage(store, "vm/1", "p1", "sda")
    stage(store, "vm/1", "p1", "sdb")
    assert store.point_ids("vm/1") == [] and store.staged_disks("vm/1", "p1") == ["sda", "sdb"]
    assert [(p.vm_id, p.point_id) for p in store.staged_points()] == [("vm/1", "p1")]
    with pytest.raises(MissingStagedDisk, match="disk 'sdc' is not staged"):
        store.commit_point("vm/1", "web", "p1", 1.0, ["sda", "sdc"], {})
    info = store.commit_point("vm/1", "web", "p1", 1.0, ["sda"], {"tokens": {"sda": "t"}})
    assert info.disks == {"sda": 2 * CS}
    assert store.commit_point("vm/1", "web", "p1", 1.0, ["sda"], {}) == info  # idempotent
    assert store.point_ids("vm/1") == ["p1"] and store.staged_points() == []
    assert store.point("vm/1", "latest").token("sda") == "t"
    assert store.manifest("vm/1", "p1", "sda").chunk_count == 2
    with pytest.raises(TargetError, match=r"has no disk 'sdb' \(its disks: sda\)"):
        store.manifest("vm/1", "p1", "sdb")
    with pytest.raises(MissingPoint):
        store.point("vm/1", "p9")


def test_a_commit_cut_short_before_its_record_is_no_point(s3: Any, store: S3Store) -> None:
    stage(store, "vm1", "p1")
    staged = "stores/one/staging/vm1/p1/sda.manifest"
    # What a crash after the copy and before point.json leaves behind.
    s3.client().copy_object(Bucket="hamal", Key="stores/one/points/vm1/p1/sda.manifest",
                            CopySource={"Bucket": "hamal", "Key": staged})  # fmt: skip
    assert store.point_ids("vm1") == [] and store.scan_points().points == []
    # Its manifests still keep their chunks from the collector.
    assert [m.point_id for m in store.iter_manifests(staged=False)] == ["p1"]
    store.commit_point("vm1", "vm1", "p1", 2.0, ["sda"], {})  # the retry completes it
    assert store.point_ids("vm1") == ["p1"]


def test_delete_keeps_chunks_and_tells_the_collector_whose_they_were(store: S3Store) -> None:
    stage(store, "vm1", "p1")
    store.commit_point("vm1", "vm1", "p1", 1.0, ["sda"], {})
    name = store.manifest("vm1", "p1", "sda").entries[0]
    assert name is not None
    store.delete_point("vm1", "p1")
    assert store.point_ids("vm1") == [] and list(store.iter_manifests(staged=False)) == []
    assert store.get_chunk(name) == b"vm1/p1/0"
    (deleted,) = store.iter_deleted_manifests()
    assert (deleted.vm_id, deleted.point_id, deleted.disk) == ("vm1", "p1", "sda")
    store.purge_deleted("vm1", "p1")
    assert list(store.iter_deleted_manifests()) == []
    with pytest.raises(MissingPoint):
        store.delete_point("vm1", "p1")


def test_condemn_revive_and_drop(store: S3Store) -> None:
    name = put(store, b"maybe garbage")
    size = store.stored_size(name)
    assert size and store.condemn_chunk(name, 7) == size
    assert not store.has_chunk(name, 13)
    assert store.get_chunk(name) == b"maybe garbage"  # still readable while condemned
    assert [(c.name, c.condemned) for c in store.iter_chunks()] == [(name, 7)]
    assert store.revive_chunk(name, 7) and store.has_chunk(name, 13)
    assert store.condemn_chunk(name, 8) == size
    assert store.drop_condemned(name, 8) == size and store.stored_size(name) is None
    assert store.drop_condemned(name, 8) == 0 and not store.revive_chunk(name, 8)
    store.save_gc_record({"round": 8})
    assert store.gc_record() == {"round": 8}


def test_retention_and_collection_on_a_bucket_free_exactly_the_expired_chunks(
    s3: Any, tmp_path: Any, st: Any
) -> None:
    import random

    from hamal_workers.gc import collect
    from hamal_workers.prune import delete_expired, plan_retention
    from hamal_workers.retention import RetentionPolicy
    from tests.integration.gc_rig import CHUNK, Rig

    store = S3Store(bucket(s3), chunk_size=CHUNK)
    rig = Rig(tmp_path, st, store=store)
    rng = random.Random(5)
    vm = rig.vms["vm0"]
    for _ in range(3):
        rig.sync(vm)
        rig.write(vm, rng, writes=4)
    rig.sync(rig.vms["vm1"])
    before, _ = rig.stored()
    policy = RetentionPolicy(keep_last=1, keep_hourly=0, keep_daily=0, keep_weekly=0)
    (plan,) = plan_retention(store.scan_points(vm.vm_id), policy, {}, vm.vm_id)
    gone = delete_expired(store, plan)
    assert len(gone) == 2
    for point_id in gone:
        del rig.content[(vm.vm_id, point_id)]
    freed = before - rig.referenced()
    assert freed, "the writes changed no chunk"

    first = collect(store, st, young_s=0)  # condemns
    second = collect(store, st, young_s=0)  # drops
    assert not first.refused and not second.refused
    assert first.condemned == len(freed) and second.dropped == len(freed)
    names, condemned = rig.stored()
    assert condemned == 0 and names == rig.referenced()
    keys = {o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(
        Bucket="hamal", Prefix="stores/one/chunks/") for o in page.get("Contents", [])}  # fmt: skip
    assert not {k for k in keys if any(n.hex() in k for n in freed)}, "freed chunks remain"
    assert rig.assert_every_point_restores() == 2


def test_an_encrypted_bucket_store_round_trips_and_names_a_tampered_chunk(s3: Any) -> None:
    from hamal_workers.targets.encryption import ChunkCipher

    key, other = ChunkCipher(bytes(range(32))), ChunkCipher(bytes(32))
    sealed = S3Store(bucket(s3, prefix="sealed"), chunk_size=CS, cipher=key, full_compare_days=1)
    plain = b"plain words that must not reach the bucket " * 1000
    names = [put(sealed, plain[:CS], CODEC_ZSTD), put(sealed, bytes(range(256)) * 200)]
    assert sealed.get_chunk(names[0]) == plain[:CS]
    stored = sealed.bucket.get(sealed.chunk_key(names[0]))
    assert b"plain words" not in stored
    assert sealed.has_chunk(names[1], 256 * 200, bytes(range(256)) * 200)
    with pytest.raises(TargetError, match="is encrypted"):
        S3Store(bucket(s3, prefix="sealed"), create=False)
    with pytest.raises(TargetError, match="is not this store's key"):
        S3Store(bucket(s3, prefix="sealed"), create=False, cipher=other)

    # One bit of a stored chunk: the read names it and says why; has_chunk sets it aside.
    body = bytearray(stored)
    body[len(body) // 2] ^= 0x04
    sealed.bucket.put(sealed.chunk_key(names[0]), bytes(body), {"length": str(CS)})
    with pytest.raises(CorruptChunk, match=f"chunk {names[0].hex()} .*fails authentication"):
        sealed.get_chunk(names[0])
    assert not sealed.has_chunk(names[0], CS, plain[:CS])
    assert put(sealed, plain[:CS], CODEC_ZSTD) == names[0]
    assert sealed.get_chunk(names[0]) == plain[:CS]
