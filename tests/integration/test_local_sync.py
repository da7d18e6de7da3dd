"""Full and incremental syncs of several VMs through real celery workers and Redis."""

from __future__ import annotations

import filecmp
import random
import subprocess
import sys
from pathlib import Path

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory, scribble
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
SMALL = ImageLayout(
    size=64 * MiB,
    random_bytes=8 * MiB,
    compressible_bytes=8 * MiB,
    zero_bytes=4 * MiB,
    piece=1 * MiB,
)


def start(fleet: LocalFleet) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")


def scan(fleet: LocalFleet) -> None:
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")


def restore_matches(store: ChunkStore, image: Path, out: Path) -> bool:
    vm_id = vm_id_for(image.parent.name)
    point = store.points(vm_id)[-1]
    restore_disk(store, vm_id, point.point_id, image.name, str(out))
    try:
        return filecmp.cmp(image, out, shallow=False)
    finally:
        out.unlink()


def chunk_files(store_root: Path) -> set[str]:
    return {p.name for p in (store_root / "chunks").rglob("*") if p.is_file()}


def test_full_then_incremental_then_unchanged(fleet: LocalFleet, state: State, events) -> None:
    images = make_inventory(fleet.root / "inventory", vms=3, disks=2, layout=SMALL)
    start(fleet)
    store_root = fleet.root / "store"

    scan(fleet)
    runs = events.runs(3, timeout=120)
    assert {r["status"] for r in runs} == {"committed"}, runs
    store = ChunkStore(str(store_root))
    for image in images:
        assert restore_matches(store, image, fleet.root / "out.raw"), image

    # Incremental: guests wrote; only changed chunks are new, and restores still match.
    rng = random.Random(1)
    for image in images:
        scribble(image, rng, writes=3, max_len=256 * 1024)
    before = chunk_files(store_root)
    scan(fleet)
    runs = events.runs(3, timeout=120)
    assert {r["status"] for r in runs} == {"committed"}, runs
    added = chunk_files(store_root) - before
    # Each write of at most 256 KiB touches at most two 4 MiB chunks.
    assert 0 < len(added) <= 3 * 2 * len(images)
    for image in images:
        assert restore_matches(store, image, fleet.root / "out.raw"), image
        assert len(store.points(vm_id_for(image.parent.name))) == 2

    # Unchanged source: the incremental stores no new chunk at all.
    before = chunk_files(store_root)
    scan(fleet)
    runs = events.runs(3, timeout=120)
    assert {r["status"] for r in runs} == {"committed"}, runs
    assert chunk_files(store_root) == before
    for vm in {i.parent.name for i in images}:
        last = state.history(vm_id_for(vm), 1)[0]
        assert last["status"] == "committed"
        for disk in last["disks"].values():
            assert disk["bytes_stored"] == "0" and disk["chunks_new"] == "0", disk

    # Nothing left behind on the source: every snapshot copy was deleted.
    assert not list((fleet.root / "lib" / "snapshots").rglob("*.raw"))
    assert state.live_snapshots() == {}

    # The per-VM log tells an operator what happened.
    vm_log = next((fleet.root / "log").glob("vm-vm01_Agent-*.log")).read_text()
    assert "committed" in vm_log and "disk disk0.raw done" in vm_log


def test_verify_and_restore_refuse_a_corrupt_chunk(fleet: LocalFleet, events) -> None:
    images = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    start(fleet)
    scan(fleet)
    assert events.runs(1, timeout=120)[0]["status"] == "committed"
    victim = sorted(p for p in (fleet.root / "store" / "chunks").rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))

    env = fleet.env()
    verify = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "verify", "--vm", "vm01"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 1, verify
    assert victim.name in verify.stdout + verify.stderr
    out = fleet.root / "restored.raw"
    restore = subprocess.run(
        [
            sys.executable,
            "-m",
            "hamal_workers.cli",
            "restore",
            "--vm",
            "vm01",
            "--disk",
            images[0].name,
            "--point",
            "latest",
            "--to",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert restore.returncode == 1, restore
    assert "corrupt" in restore.stderr.lower() and "Traceback" not in restore.stderr
    assert not out.exists()
