"""FusionCompute VMs synced by the real fleet from the project's VRM simulator: CBT backup
snapshots, getcbt bitmaps, and data over the hosts' backup sockets.

Each restore point must restore byte for byte equal to the disk at its snapshot. Nothing
writes the disks while a sync runs, so the disk as the guest sees it once the run has ended
is the disk at its snapshot.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.state import State, key
from hamal_workers.targets.base import CHUNK_SIZE
from hamal_workers.targets.chunkstore import ChunkStore
from tests.integration.fusion_rig import MiB, digest, fusion_env, operator, operator_snapshot
from tests.integration.points import restored
from tests.integration.test_exact_resume import wait_expired

pytestmark = pytest.mark.timeout(240)


def fusion_fleet(fleet: LocalFleet, sim: Any, **extra: str) -> None:
    fleet.overrides = {**fleet.overrides, **fusion_env(sim, **extra)}


def start(fleet: LocalFleet, name: str = "fusion") -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker(name, ["fusion"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready(name)


def send_sync(vm_id: str) -> None:
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "fusion"}, queue="period")


def sync(events: Any, vm_id: str, timeout: float = 120) -> dict[str, Any]:
    """`hamal sync` of one VM, and the run event that ends it."""
    send_sync(vm_id)
    return events.wait(
        lambda e: e["event"] == "run" and e["vm_id"] == vm_id, timeout, f"a run of {vm_id}"
    )


def test_full_then_incremental_of_three_disks_reads_only_what_the_bitmap_names(
    fleet: LocalFleet, state: State, events: Any, fusion: Any
) -> None:
    vm_id = fusion.add_vm("erp-1", [40 * MiB, 24 * MiB, 16 * MiB + 4096])
    for index, size in enumerate((40 * MiB, 24 * MiB, 16 * MiB)):
        for n in range(3):
            fusion.write(vm_id, index, (n * size) // 3 + 777, bytes([index * 16 + n + 1]) * 300_000)
    disks = ["disk1", "disk2", "disk3"]
    fusion_fleet(fleet, fusion)
    start(fleet)
    expected: dict[str, dict[str, str]] = {}

    def commit_and_record() -> str:
        run = sync(events, vm_id)
        assert run["status"] == "committed", state.run(run["run_id"])
        expected[run["run_id"]] = {d: digest(fusion.content(vm_id, i)) for i, d in enumerate(disks)}
        # The newest snapshot stays as the next sync's base; every older one is gone.
        assert fusion.snapshot_names(vm_id) == [f"hamal-{run['run_id']}"]
        assert fusion.backup_resources(live_only=True) == []
        return run["run_id"]

    first = commit_and_record()
    info = ChunkStore(str(fleet.root / "store")).point(vm_id, first)
    assert sorted(info.disks) == disks
    assert info.meta["consistency"] == "vm", info.meta
    for disk in disks:
        assert state.disk(first, disk).fields["mode"] == "allocated"
        assert "|" in info.token(disk)
    # The first sync reads only what the bitmap marks: six chunks, not 80 MiB.
    assert sum(int(state.disk(first, d).fields["bytes_read"]) for d in disks) <= 9 * CHUNK_SIZE

    # The guest writes two places of the first disk and one of the third; the second rests.
    fusion.write(vm_id, 0, 5 * MiB + 100, b"\x5a" * 70_000)
    fusion.write(vm_id, 0, 36 * MiB, b"\xa5" * 4096)
    fusion.write(vm_id, 2, 16 * MiB, b"\x01" * 512)  # in the last, partial chunk
    second = commit_and_record()
    read = {d: state.disk(second, d).fields for d in disks}
    for disk in disks:
        assert read[disk]["mode"] == "changed", read[disk]
    assert int(read["disk1"]["bytes_read"]) == 2 * CHUNK_SIZE, read["disk1"]
    assert int(read["disk2"]["bytes_read"]) == 0, read["disk2"]
    assert int(read["disk3"]["bytes_read"]) == 4096, read["disk3"]

    third = commit_and_record()  # nothing changed
    assert sum(int(state.disk(third, d).fields["bytes_read"]) for d in disks) == 0

    for point, want in expected.items():
        for disk, digest_of_disk in want.items():
            assert digest(restored(fleet, vm_id, point, disk)) == digest_of_disk, (point, disk)
    fleet.stop_all()
    assert fusion.logins > 0 and fusion.logouts == fusion.logins, "every session logged out"


def test_a_broken_chain_falls_back_to_a_full_read_and_stays_exact(
    fleet: LocalFleet, state: State, events: Any, fusion: Any
) -> None:
    vm_id = fusion.add_vm("chain-1", [24 * MiB])
    fusion.write(vm_id, 0, 0, b"\x10" * (9 * MiB))
    fusion_fleet(fleet, fusion)
    start(fleet)
    first = sync(events, vm_id)
    assert first["status"] == "committed", state.run(first["run_id"])

    fusion.reset_cbt(vm_id)  # every ChgID so far is void
    fusion.write(vm_id, 0, 7 * MiB, b"\x77" * 9000)
    second = sync(events, vm_id)
    assert second["status"] == "committed", state.run(second["run_id"])
    fields = state.disk(second["run_id"], "disk1").fields
    assert fields["mode"] == "allocated", fields
    assert "cannot tell what changed" in fields.get("notes", ""), fields
    assert int(fields["chunks_new"]) == 1, "hash-compare: only the written chunk is new"
    assert restored(fleet, vm_id, second["run_id"], "disk1") == fusion.content(vm_id, 0)


def test_a_failed_snapshot_task_gives_a_clear_status_and_leaves_nothing(
    fleet: LocalFleet, state: State, events: Any, fusion: Any
) -> None:
    vm_id = fusion.add_vm("fail-2", [8 * MiB])
    fusion_fleet(fleet, fusion)
    start(fleet)
    fusion.fail_next_task("create_snapshot", reason="the datastore is full")
    send_sync(vm_id)
    refused = events.wait(
        lambda e: e["event"] == "vm-sync" and e["vm_id"] == vm_id and e["status"] == "failed",
        60,
        "the failed sync",
    )
    assert "failed: the datastore is full" in refused["error"], refused
    assert fusion.snapshot_names(vm_id) == []


def test_kill_9_of_the_fusion_worker_resumes_from_its_checkpoint(
    fleet: LocalFleet, state: State, events: Any, fusion: Any
) -> None:
    vm_id = fusion.add_vm("batch-1", [96 * MiB])
    for n in range(24):
        fusion.write(vm_id, 0, n * 4 * MiB, bytes([n + 1]) * (4 * MiB - 512 * n))
    want = digest(fusion.content(vm_id, 0))
    marker = fleet.root / "fired"
    fusion_fleet(
        fleet, fusion,
        HAMAL_WORKER_LEASE_TIMEOUT="3",
        HAMAL_REDIS_SOCKET_TIMEOUT="0.5",
        HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY="1",
        HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT="1",
        HAMAL_FAULTS=f"mid-disk@{marker}",
    )  # fmt: skip
    start(fleet, "fusion-faulty")
    send_sync(vm_id)
    run_id = events.wait(lambda e: e["event"] == "run-started", 60, "the run")["run_id"]
    events.wait(lambda e: e["event"] == "disk-started", 60, "the disk task")
    wait_expired(state.r, key("lease", "disk", run_id, "disk1"))
    assert marker.exists(), "the disk task was not killed at its first checkpoint"
    fields, entries = state.checkpoint(run_id, "disk1")
    assert fields.get("mode") and entries, "it died before its first checkpoint"
    done_before = len(entries)

    fleet.stop("fusion-faulty")
    fleet.start_worker("fusion-2", ["fusion"], concurrency=1)
    fleet.wait_worker_ready("fusion-2")
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")
    finished = events.wait(lambda e: e["event"] == "run" and e["run_id"] == run_id, 150, "the run")
    assert finished["status"] == "committed", state.run(run_id)
    status = state.disk(run_id, "disk1").fields
    assert status["attempts"] == "2", status
    assert int(status["chunks_resumed"]) >= done_before, status
    assert int(status["bytes_read"]) <= (24 - done_before) * CHUNK_SIZE, status
    assert digest(restored(fleet, vm_id, run_id, "disk1")) == want
    assert fusion.snapshot_names(vm_id) == [f"hamal-{run_id}"]


def redis_values(client: Any) -> dict[str, bytes]:
    """Every value Redis holds, as bytes per key (for a search)."""
    found: dict[str, bytes] = {}
    for name in client.scan_iter(count=1000):
        kind = client.type(name).decode()
        if kind == "string":
            found[name.decode()] = client.get(name) or b""
        elif kind == "hash":
            found[name.decode()] = b"\n".join(k + b"=" + v for k, v in client.hgetall(name).items())
        elif kind == "list":
            found[name.decode()] = b"\n".join(client.lrange(name, 0, -1))
        elif kind in ("set", "zset"):
            members = client.smembers(name) if kind == "set" else client.zrange(name, 0, -1)
            found[name.decode()] = b"\n".join(members)
    return found


def test_the_vrm_password_reaches_no_log_redis_value_message_or_error(
    fleet: LocalFleet, state: State, events: Any, tmp_path: Any
) -> None:
    from hamal_workers.simulators.fusion_compute import FusionComputeSimulator

    canary = "c4nary-vrm-pw/9"
    with FusionComputeSimulator(tmp_path / "canary", password=canary) as sim:
        vm_id = sim.add_vm("secret-1", [8 * MiB])
        sim.write(vm_id, 0, 0, b"\x42" * MiB)
        fusion_fleet(fleet, sim)
        start(fleet)
        run = sync(events, vm_id)
        assert run["status"] == "committed", state.run(run["run_id"])
        # A disk worker with a wrong password: the refusal names the user and the keys to
        # check, never a password.
        fleet.stop("fusion")
        fusion_fleet(fleet, sim, HAMAL_FUSION_COMPUTE_PASSWORD=canary + "-old")
        fleet.start_worker("fusion-old", ["fusion"], concurrency=1)
        fleet.wait_worker_ready("fusion-old")
        failed = sync(events, vm_id)
        assert failed["status"] == "failed", failed
        error = state.run(failed["run_id"])["error"]
        assert "refused the login of 'hamal': check [fusion_compute] user" in error, error
        values = redis_values(state.r)
        fleet.stop_all()
        texts = {f"redis {k}": v for k, v in values.items()}
        texts |= {
            str(p): p.read_bytes()
            for folder in ("log", "lib", "proc")
            for p in (fleet.root / folder).rglob("*")
            if p.is_file()
        }
        assert any("fusion" in name for name in texts), sorted(texts)[:20]
        key = hashlib.sha256(canary.encode()).hexdigest()
        leaked = [
            name for name, data in texts.items() if canary.encode() in data or key.encode() in data
        ]
        assert leaked == []


def test_the_sweep_removes_a_dead_runs_snapshot_and_resource_and_nothing_else(
    fleet: LocalFleet, state: State, events: Any, fusion: Any
) -> None:
    from hamal_workers.config import load
    from hamal_workers.platforms import open_platform
    from hamal_workers.platforms.base import new_run_id, snapshot_name

    vm_id = fusion.add_vm("left-1", [8 * MiB])
    fusion.write(vm_id, 0, 0, b"\x09" * MiB)
    session = operator(fusion)
    for name in ("nightly", "hamal-manual"):  # the operator's; the second only named like ours
        made = operator_snapshot(fusion, session, vm_id, name)
        while session.get(f"{fusion.start()}{made['taskUri']}").json()["status"] != "success":
            pass
    fusion_fleet(fleet, fusion)
    fleet.apply_env()
    settings = load(fleet.env()["HAMAL_CONF"], fleet.env())
    # A worker that died mid-disk: its snapshot and its backup resource stay behind, and
    # no run in Redis owns them.
    with open_platform("fusion", settings) as platform:
        dead = platform.create_snapshot(platform.vm(vm_id), snapshot_name(new_run_id()))
        source = platform.open_disk(dead, "disk1")
        source.open_reader().read(0, 4096)  # the resource is made; nothing closes it
    assert len(fusion.backup_resources(live_only=True)) == 1
    start(fleet)
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")
    swept = events.wait(lambda e: e["event"] == "scan", 60, "a scan")
    assert swept["swept"] == 1, swept
    live = fusion.backup_resources(live_only=True)
    assert all(r["snapshot"] != dead.details["snapshot_urn"] for r in live), (
        "the dead run's backup resource is released with its snapshot"
    )
    run = events.wait(lambda e: e["event"] == "run", 120, "the scan's sync of the VM")
    assert run["status"] == "committed", state.run(run["run_id"])
    names = fusion.snapshot_names(vm_id)
    assert dead.snapshot_id not in names
    assert {"nightly", "hamal-manual", f"hamal-{run['run_id']}"} == set(names), names
