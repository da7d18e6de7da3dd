"""The FusionCompute platform against the project's VRM simulator, over HTTPS and the backup
socket, with a real Redis for the fleet's call budget and socket slots: discovery, CBT
snapshots and bitmaps, reads, and every failure the issue names. Each failure must leave no
snapshot and no backup resource behind (the `fusion` fixture checks the resources)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms import open_platform
from hamal_workers.platforms.base import (
    PlatformError,
    TransientPlatformError,
    new_run_id,
    snapshot_name,
)
from hamal_workers.platforms.fusion_compute import FusionComputePlatform
from hamal_workers.state import State
from tests.integration.fusion_rig import MiB, fusion_settings, operator, operator_snapshot

pytestmark = pytest.mark.timeout(120)
BLOCK = 128 * 512  # the simulator's CBT block (sectorOfBlock 128)


def platform(sim: Any, redis_port: int, **extra: str) -> FusionComputePlatform:
    found = open_platform("fusion", fusion_settings(sim, redis_port, **extra))
    assert isinstance(found, FusionComputePlatform)
    return found


def read_all(source: Any, size: int, piece: int = 3 * MiB + 512) -> bytes:
    reader = source.open_reader()
    try:
        out = bytearray()
        for offset in range(0, size, piece):
            out += reader.read(offset, min(piece, size - offset))
        return bytes(out)
    finally:
        reader.close()


def blocks_of(extents: list[Extent]) -> set[int]:
    return {b for e in extents for b in range(e.offset // BLOCK, -(-e.end // BLOCK))}


def test_discovery_names_disks_skips_shared_ones_and_describes_the_vm(
    fusion: Any, redis_port: int
) -> None:
    vm = fusion.add_vm("web-1", [24 * MiB, 8 * MiB, 8 * MiB], shared={2}, cpus=4, memory_mb=4096,
                       nics=[{"name": "nic1", "mac": "28:6e:d4:88:c6:01", "ip": "10.0.0.5",
                              "portGroupName": "prod"}])  # fmt: skip
    fusion.add_vm("db-1", [8 * MiB])
    with platform(fusion, redis_port) as fc:
        refs = {ref.name: ref for ref in fc.discover()}
        assert set(refs) == {"web-1", "db-1"}
        ref = refs["web-1"]
        assert ref.vm_id == vm
        assert [d.name for d in ref.disks] == ["disk1", "disk2"]
        (skipped,) = ref.skipped
        assert skipped.startswith("disk3 (a shared disk")
        described = fc.describe(ref)
    assert (described["cpus"], described["memory_mib"]) == (4, 4096)
    assert described["nics"] == [
        {"name": "nic1", "mac": "28:6e:d4:88:c6:01", "network": "prod", "addresses": ["10.0.0.5"]}
    ]
    assert [d["boot"] for d in described["disks"]] == [True, False]
    only = platform(fusion, redis_port, HAMAL_FUSION_COMPUTE_VMS="db-1")
    assert [ref.name for ref in only.discover()] == ["db-1"]


def test_snapshots_bitmaps_and_reads_are_exact_and_nothing_is_left(
    fusion: Any, redis_port: int
) -> None:
    vm = fusion.add_vm("app-1", [24 * MiB + 4096, 8 * MiB])
    fusion.write(vm, 0, 0, b"\x11" * 5000)
    fusion.write(vm, 0, 9 * MiB, b"\x22" * (2 * MiB))
    fusion.write(vm, 1, 8 * MiB - 100, b"\x33" * 100)
    with platform(fusion, redis_port) as fc:
        ref = fc.vm(vm)
        first = fc.create_snapshot(ref, snapshot_name(new_run_id()))
        assert fusion.snapshot_names(vm) == [first.snapshot_id]
        assert first.consistency == "vm" and first.disks["disk1"]["size"] == 24 * MiB + 4096
        with fc.open_disk(first, "disk1") as source:
            allocated = source.allocated_extents()
            assert blocks_of(allocated) == {0} | set(range(9 * MiB // BLOCK, 11 * MiB // BLOCK))
            assert read_all(source, source.size) == fusion.snapshot_content(
                vm, first.snapshot_id, 0
            )
        assert fusion.backup_resources(live_only=True) == []

        # The guest writes after the first snapshot; the second's bitmap is exactly that.
        fusion.write(vm, 0, 20 * MiB + 10, b"\x44" * 10)
        fusion.write(vm, 0, 24 * MiB, b"\x55" * 4096)  # the last, partial block
        second = fc.create_snapshot(ref, snapshot_name(new_run_id()))
        with fc.open_disk(second, "disk1") as source:
            changed = source.changed_extents(first.token("disk1"))
            assert changed is not None
            assert blocks_of(changed) == {20 * MiB // BLOCK, 24 * MiB // BLOCK}
            assert changed[-1].end == 24 * MiB + 4096, "the last extent ends at the disk's end"
            content = read_all(source, source.size)
        assert content == fusion.content(vm, 0)
        with fc.open_disk(second, "disk2") as source:
            assert source.changed_extents(first.token("disk2")) == []

        # The base deleted, or tracking reset: the platform cannot tell, and says so.
        fc.delete_snapshot(first)
        with fc.open_disk(second, "disk1") as source:
            assert source.changed_extents(first.token("disk1")) is None
        fusion.reset_cbt(vm)
        third = fc.create_snapshot(ref, snapshot_name(new_run_id()))
        with fc.open_disk(third, "disk1") as source:
            assert source.changed_extents(second.token("disk1")) is None
        for snap in (second, third):
            fc.delete_snapshot(snap)
        fc.delete_snapshot(second)  # gone already: not an error
    assert fusion.snapshot_names(vm) == []


def test_an_expired_session_and_busy_answers_are_ridden_out(fusion: Any, redis_port: int) -> None:
    vm = fusion.add_vm("busy-1", [8 * MiB])
    with platform(fusion, redis_port) as fc:
        ref = fc.vm(vm)
        logins = fusion.logins
        fusion.expire_sessions()
        fusion.fail_next("POST", r"/snapshots$", "10000006", status=503, count=2)
        snap = fc.create_snapshot(ref, snapshot_name(new_run_id()))
        assert fusion.logins == logins + 1, "one new login after the session expired"
        posts = [c for c in fusion.calls if c.method == "POST" and c.path.endswith("/snapshots")]
        assert [c.code for c in posts[-3:]] == ["10000006", "10000006", None]
        fc.delete_snapshot(snap)
    assert fusion.snapshot_names(vm) == []


def test_a_failed_and_a_hung_snapshot_task_leave_no_snapshot(fusion: Any, redis_port: int) -> None:
    vm = fusion.add_vm("fail-1", [8 * MiB])
    with platform(fusion, redis_port, HAMAL_FUSION_COMPUTE_CREATE_SNAP_TASK_TIMEOUT="2") as fc:
        ref = fc.vm(vm)
        fusion.fail_next_task("create_snapshot", reason="datastore is full")
        with pytest.raises(PlatformError, match=r"snapshot hamal-.* failed: datastore is full"):
            fc.create_snapshot(ref, snapshot_name(new_run_id()))
        assert fusion.snapshot_names(vm) == []

        fusion.hang_next_task("create_snapshot")
        with pytest.raises(PlatformError, match=r"did not finish within 2 s"):
            fc.create_snapshot(ref, snapshot_name(new_run_id()))
        assert fusion.snapshot_names(vm) == [], "the hung snapshot is deleted"


def test_the_snapshot_limit_is_a_clear_error_and_a_running_task_is_waited_for(
    fusion: Any, redis_port: int
) -> None:
    vm = fusion.add_vm("full-1", [8 * MiB])
    session = operator(fusion)
    with platform(fusion, redis_port) as fc:
        ref = fc.vm(vm)
        # The operator's own snapshot task runs: the proxy waits for it, then snapshots.
        fusion.hang_next_task("create_snapshot")
        made = operator_snapshot(fusion, session, vm, "before-upgrade")

        def release_when_met() -> None:
            # Once the proxy has met the running task (and is waiting), the operator's
            # snapshot finishes: deleting it ends the hung creation.
            while not any(c.code == "10300112" for c in fusion.calls):
                time.sleep(0.02)
            session.delete(f"{fusion.start()}{made['uri']}")

        release = threading.Thread(target=release_when_met)
        release.start()
        snap = fc.create_snapshot(ref, snapshot_name(new_run_id()))
        release.join()
        assert any(c.code == "10300112" for c in fusion.calls), "the proxy met the running task"
        fc.delete_snapshot(snap)

        fusion.snapshot_limit = 0
        with pytest.raises(PlatformError, match="as many snapshots as FusionCompute allows"):
            fc.create_snapshot(ref, snapshot_name(new_run_id()))
    assert fusion.snapshot_names(vm) == []


def test_reads_survive_a_dropped_socket_and_an_expired_backup_resource(
    fusion: Any, redis_port: int
) -> None:
    vm = fusion.add_vm("drop-1", [20 * MiB])
    for n in range(5):
        fusion.write(vm, 0, n * 4 * MiB + 1000, bytes([n + 1]) * (3 * MiB))
    with platform(fusion, redis_port, HAMAL_FUSION_COMPUTE_TRANSPORT_MODE="lan") as fc:
        snap = fc.create_snapshot(fc.vm(vm), snapshot_name(new_run_id()))
        want = fusion.snapshot_content(vm, snap.snapshot_id, 0)
        with fc.open_disk(snap, "disk1") as source:
            fusion.drop_socket_after(5 * MiB)
            assert read_all(source, source.size) == want
            made = len(fusion.backup_resources(live_only=False))
            reader = source.open_reader()
            assert reader.read(0, 1 * MiB) == want[: 1 * MiB]
            fusion.expire_backup_resources()
            assert reader.read(1 * MiB, 19 * MiB) == want[1 * MiB :]
            reader.close()
            assert len(fusion.backup_resources(live_only=False)) == made + 1, "made again once"
        fc.delete_snapshot(snap)


def test_nine_readers_share_eight_sockets_to_one_host(fusion: Any, redis_port: int) -> None:
    vm = fusion.add_vm("wide-1", [16 * MiB, 16 * MiB])
    for disk in (0, 1):
        fusion.write(vm, disk, 0, bytes([disk + 7]) * (16 * MiB))
    fusion.reset_connection_stats()
    with platform(fusion, redis_port) as fc:
        snap = fc.create_snapshot(fc.vm(vm), snapshot_name(new_run_id()))
        wants = [fusion.snapshot_content(vm, snap.snapshot_id, d) for d in (0, 1)]
        sources = [fc.open_disk(snap, "disk1"), fc.open_disk(snap, "disk2")]
        got: dict[int, bytes] = {}
        started = threading.Barrier(9)

        def read(n: int) -> None:
            source = sources[n % 2]
            started.wait()
            got[n] = read_all(source, source.size, piece=1 * MiB)

        threads = [threading.Thread(target=read, args=(n,)) for n in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for source in sources:
            source.close()
        fc.delete_snapshot(snap)
    assert all(got[n] == wants[n % 2] for n in range(9)), "every reader read its disk exactly"
    assert fusion.max_open_connections(None) == 8, "the ninth waited for a free socket"
    assert fusion.refused_connections == 0


def test_the_fleet_shares_one_budget_of_vrm_calls(fusion: Any, redis_port: int) -> None:
    fusion.add_vm("budget-1", [8 * MiB])
    settings = fusion_settings(fusion, redis_port, HAMAL_FUSION_COMPUTE_API_CALLS_PER_MINUTE="5")
    with open_platform("fusion", settings) as fc:
        assert fc.discover()  # a login, the sites, one page of VMs: 3 of this minute's 5
        budget = fc.session.rate
        assert budget is not None
        other_worker = State(budget.r).call_rate(budget.name, 5)
        while other_worker.wait_s() == 0:  # another worker takes what is left of the minute
            pass
        calls = len(fusion.calls)
        listing = threading.Thread(target=fc.discover)
        listing.start()
        listing.join(timeout=1.5)
        assert listing.is_alive() and len(fusion.calls) == calls, "it waits for the budget"
        budget.r.delete(budget.key)  # the minute is over
        listing.join()
        assert len(fusion.calls) == calls + 2


def test_io_errors_of_the_host_are_retried_then_fail_clearly(fusion: Any, redis_port: int) -> None:
    vm = fusion.add_vm("io-1", [8 * MiB])
    fusion.write(vm, 0, 0, b"\x61" * (8 * MiB))
    with platform(fusion, redis_port) as fc:
        snap = fc.create_snapshot(fc.vm(vm), snapshot_name(new_run_id()))
        with fc.open_disk(snap, "disk1") as source:
            fusion.fail_reads(2)
            assert read_all(source, source.size) == b"\x61" * (8 * MiB), "two failures retried"
            fusion.fail_reads(100)
            reader = source.open_reader()
            with pytest.raises(TransientPlatformError, match=r"failed 4 times; last: .*8 \(I/O"):
                reader.read(0, MiB)
            reader.close()
            fusion.clear_faults()
        fc.delete_snapshot(snap)
