"""The store misbehaving under a running fleet: full, damaged chunks, a damaged manifest.

Real faults: a small tmpfs the test mounts as the store (root can mount here; where it
cannot, the test says so and is skipped), and chunk and manifest files damaged on disk.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
LAYOUT = ImageLayout(
    size=64 * MiB, random_bytes=40 * MiB, compressible_bytes=8 * MiB, zero_bytes=0, piece=4 * MiB
)
QUICK = {
    "HAMAL_PERIOD_INTERVAL": "5",
    "HAMAL_WORKER_LEASE_TIMEOUT": "3",
    "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
}


def start(fleet: LocalFleet, beat: bool = True) -> None:
    fleet.overrides = {**fleet.overrides, **QUICK}
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    if beat:
        fleet.start_beat()


def committed(events, vm_id: str, timeout: float = 120) -> str:
    event = events.wait(
        lambda e: e["event"] == "run" and e["vm_id"] == vm_id and e["status"] == "committed",
        timeout,
        "a committed point",
    )
    return str(event["run_id"])


def sync_now(events, vm_id: str) -> str:
    """Start a sync of the VM as `hamal sync` does and return its committed point."""
    # Imported here: the app reads its config when the fleet fixture has set it.
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"})
    return committed(events, vm_id)


def restores(store_root: Path, image: Path, point: str, out: Path) -> bool:
    store = ChunkStore(store_root, create=False)
    restore_disk(store, vm_id_for(image.parent.name), point, image.name, out)
    try:
        return filecmp.cmp(image, out, shallow=False)
    finally:
        out.unlink()


@pytest.fixture
def small_store(fleet: LocalFleet) -> Iterator[Path]:
    store = fleet.root / "store"
    store.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(store)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full store here: {mount.stderr.strip()}")
    try:
        yield store
    finally:
        fleet.stop_all()
        subprocess.run(["umount", "-l", str(store)], check=False)


def test_a_full_store_is_a_state_not_a_loop(
    fleet: LocalFleet, state: State, events, small_store: Path
) -> None:
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    vm_id = vm_id_for("vm01")
    start(fleet)
    failed = events.wait(lambda e: e["event"] == "run", 120, "the first run to end")
    assert failed["status"] == "failed"
    run = state.run(failed["run_id"])
    assert "target full" in run["error"], run
    # No partial chunk: every file in the store is whole (no temporary names left).
    assert not [p for p in small_store.rglob(".*") if p.is_file()]
    # It backs off: the next scans send nothing for it, and say so.
    for _ in range(2):
        scan = events.wait(lambda e: e["event"] == "scan", 30, "a scan")
        assert scan["backing_off"] == 1 and scan["requests"] == 0, scan
    vm_log = next((fleet.root / "log").glob("vm-vm01_Agent-*.log")).read_text()
    assert "target full" in vm_log
    status = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "status"],
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "target full" in status.stdout, status.stdout
    # Room again: it recovers by itself.
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_store)], check=True)
    point = committed(events, vm_id)
    assert restores(small_store, image, point, fleet.root / "out.raw")


def damage_a_chunk(store: ChunkStore, vm_id: str, point: str, disk: str, how: str) -> bytes:
    name = next(n for n in store.manifest(vm_id, point, disk).entries if n is not None)
    path = store.chunk_path(name)
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "zero":
        data = bytearray(len(data))
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("damage", ["truncate", "zero", "bitflip"])
def test_the_next_sync_of_damaged_data_stores_it_again(
    fleet: LocalFleet, state: State, events, damage: str
) -> None:
    """The sync alone: header and length catch truncation and zeros; the full comparison
    (every reused chunk, with full_compare_days = 1) catches a flipped bit."""
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    vm_id = vm_id_for("vm01")
    fleet.overrides = {**fleet.overrides, "HAMAL_TARGET_FULL_COMPARE_DAYS": "1"}
    start(fleet, beat=False)
    first = sync_now(events, vm_id)
    store = ChunkStore(fleet.root / "store", create=False)
    damage_a_chunk(store, vm_id, first, image.name, damage)
    second = sync_now(events, vm_id)
    assert restores(fleet.root / "store", image, second, fleet.root / "out.raw")
    assert state.disk(second, image.name).fields["chunks_new"] == "1"  # the damaged one


def test_verify_names_a_damaged_chunk_and_the_next_sync_stores_it_again(
    fleet: LocalFleet, state: State, events
) -> None:
    """With the default rotation a flipped bit may wait for its day; verify finds it now."""
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    vm_id = vm_id_for("vm01")
    start(fleet, beat=False)
    first = sync_now(events, vm_id)
    store = ChunkStore(fleet.root / "store", create=False)
    name = damage_a_chunk(store, vm_id, first, image.name, "bitflip")
    verify = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "verify", "--vm", "vm01"],
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 1 and name.hex() in verify.stdout, verify.stdout
    assert first in verify.stdout and "moved aside" in verify.stdout  # the point using it
    second = sync_now(events, vm_id)
    assert restores(fleet.root / "store", image, second, fleet.root / "out.raw")


def test_a_damaged_newest_manifest_does_not_block_the_vm(
    fleet: LocalFleet, state: State, events
) -> None:
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    vm_id = vm_id_for("vm01")
    start(fleet, beat=False)
    sync_now(events, vm_id)
    newest = sync_now(events, vm_id)
    manifest = next((fleet.root / "store" / "points").rglob(f"{newest}/disk0.raw.manifest"))
    os.truncate(manifest, manifest.stat().st_size // 2)
    third = sync_now(events, vm_id)
    disk = state.disk(third, image.name).fields
    assert newest in disk["notes"] and "cannot be a base" in disk["notes"], disk
    vm_log = next((fleet.root / "log").glob("vm-vm01_Agent-*.log")).read_text()
    assert "cannot be a base" in vm_log
    assert restores(fleet.root / "store", image, third, fleet.root / "out.raw")


def test_verify_repair_stores_a_damaged_chunk_again_from_the_source(
    fleet: LocalFleet, state: State, events
) -> None:
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    vm_id = vm_id_for("vm01")
    start(fleet, beat=False)
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"})
    point = committed(events, vm_id)
    store = ChunkStore(fleet.root / "store", create=False)
    names = [n for n in store.manifest(vm_id, point, image.name).entries if n is not None]
    damaged = store.chunk_path(names[1])
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0x40
    damaged.write_bytes(bytes(data))

    def hamal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hamal_workers.cli", *args],
            env=fleet.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    repair = hamal("verify", "--vm", "vm01", "--repair")
    assert repair.returncode == 1, repair  # it found damage, and says what it did about it
    assert f"REPAIRED chunk {names[1].hex()}" in repair.stdout, repair.stdout
    # The point restores whole again, without a new sync, and nothing is left on the source.
    assert restores(fleet.root / "store", image, point, fleet.root / "out.raw")
    assert not list((fleet.root / "lib" / "snapshots").rglob("hamal-*"))
    again = hamal("verify", "--vm", "vm01")
    assert again.returncode == 0, again.stdout
