"""Retention after every commit on a running fleet; `hamal prune` and `hamal gc` by hand."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hamal_workers.localfleet import LocalFleet, free_port
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory, scribble
from hamal_workers.state import State, Writes
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk
from tests.integration.conftest import Events
from tests.integration.gc_rig import DISK, Rig

pytestmark = pytest.mark.timeout(300)
MiB = 1024 * 1024
SMALL = ImageLayout(size=16 * MiB, random_bytes=6 * MiB, compressible_bytes=2 * MiB, piece=MiB)


def hamal(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", *args],
        env={**env, "COLUMNS": "250"},  # tables on one line each
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_each_commit_expires_older_points_and_gc_frees_their_chunks(
    fleet: LocalFleet, events: Events
) -> None:
    (image, *_) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    fleet.overrides = {**fleet.overrides, "HAMAL_RETENTION_KEEP_LAST": "2"}
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    env = fleet.env()
    rng = random.Random(11)
    runs = []
    for n in range(4):
        if n:
            scribble(image, rng, writes=6, max_len=2 * MiB)
        synced = hamal(env, "sync", "--vm", "vm01", "--wait", "--timeout", "120")
        assert synced.returncode == 0, synced.stderr
        runs.append(events.wait(lambda e: e["event"] == "run", 60, f"run {n + 1}"))
    assert [len(r["retention"]["deleted"]) for r in runs] == [0, 0, 1, 1]
    assert all(r["retention"]["kept"] == min(2, n + 1) for n, r in enumerate(runs))
    store = ChunkStore(fleet.root / "store", create=False)
    vm_id = vm_id_for("vm01")
    assert store.point_ids(vm_id) == [r["run_id"] for r in runs[2:]]
    log = next((fleet.root / "log").glob("*vm01*_Agent-*.log")).read_text()
    assert f"deleted 1 restore points ({runs[0]['run_id']})" in log

    status = hamal(env, "status")
    assert "retention: 1 deleted, 2 kept" in status.stdout, status.stdout
    points = hamal(env, "points", "--vm", "vm01")
    assert points.returncode == 0 and "newest" in points.stdout and "last" in points.stdout

    # The deleted points' chunks: older than the collector's grace for new writes.
    for path in (fleet.root / "store" / "chunks").glob("*/*/*"):
        os.utime(path, (1.0, 1.0))
    first, second = hamal(env, "gc"), hamal(env, "gc")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "condemned 0" not in first.stdout, first.stdout
    assert "freed 0.0 MiB (0 chunks)" not in second.stdout, second.stdout
    status = hamal(env, "status").stdout
    assert "garbage collection (" in status.lower() and "frees" in status, status
    log = next((fleet.root / "log").glob("*vm01*_Agent-*.log")).read_text()
    assert "of chunks only its deleted restore points used are condemned" in log
    out = fleet.root / "latest.raw"
    restore_disk(store, vm_id, store.point(vm_id, "latest").point_id, "disk0.raw", out)
    assert out.read_bytes() == image.read_bytes()


def cli_env(rig: Rig, st: State, **overrides: str) -> dict[str, str]:
    port = st.r.connection_pool.connection_kwargs["port"]
    return {
        **os.environ,
        "HAMAL_TARGET_PATH": str(rig.store.root),
        "HAMAL_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "HAMAL_RETENTION_KEEP_LAST": "1",
        "HAMAL_RETENTION_KEEP_DAILY": "0",
        "HAMAL_RETENTION_KEEP_WEEKLY": "0",
        **overrides,
    }


def make_points(tmp_path: Path, st: State, count: int) -> tuple[Rig, list[str]]:
    rig = Rig(tmp_path, st, vms=1)
    vm = rig.vms["vm0"]
    rng = random.Random(21)
    ids = []
    for _ in range(count):
        ids.append(rig.sync(vm))
        rig.write(vm, rng, writes=4)
    rig.age_chunks(3600)
    return rig, ids


def test_prune_dry_run_deletes_nothing_and_says_what_gc_then_frees(
    tmp_path: Path, st: State
) -> None:
    rig, ids = make_points(tmp_path, st, 3)
    env = cli_env(rig, st)
    dry = hamal(env, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(f"delete {pid}" in dry.stdout for pid in ids[:2]) and ids[2] not in dry.stdout
    assert "nothing deleted" in dry.stdout
    assert rig.store.point_ids(rig.vms["vm0"].vm_id) == ids
    promised = int(json.loads(hamal(env, "prune", "--dry-run", "--json").stdout)["bytes"])
    pruned = hamal(env, "prune")
    assert pruned.returncode == 0 and "deleted 2 restore points" in pruned.stdout
    assert rig.store.point_ids(rig.vms["vm0"].vm_id) == ids[2:]
    freed = 0
    for _ in range(2):
        report = json.loads(hamal(env, "gc", "--json").stdout)
        freed += report["bytes_freed"]
    assert freed == promised > 0
    del rig.content[(rig.vms["vm0"].vm_id, ids[0])], rig.content[(rig.vms["vm0"].vm_id, ids[1])]
    assert rig.assert_every_point_restores() == 1


def test_prune_of_an_unknown_vm_is_a_clear_error(tmp_path: Path, st: State) -> None:
    rig, _ = make_points(tmp_path, st, 1)
    unknown = hamal(cli_env(rig, st), "prune", "--vm", "no-such-vm", "--dry-run")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("hamal prune: no restore point of a VM named or with id")
    assert "Traceback" not in unknown.stderr


def test_prune_keeps_the_base_of_a_running_sync(tmp_path: Path, st: State) -> None:
    rig, ids = make_points(tmp_path, st, 3)
    vm = rig.vms["vm0"]
    writes = Writes()
    st.start_run(writes, vm.vm_id, "run-now", {"vm_id": vm.vm_id, "point_id": "run-now"})
    st.plan_disks(writes, "run-now", [DISK])
    st.apply(writes)
    st.start_checkpoint("run-now", DISK, {"base_point": ids[0], "gc_ack": "0"})
    env = cli_env(rig, st)
    points = hamal(env, "points")
    assert "base of running sync run-now" in points.stdout, points.stdout
    assert hamal(env, "prune").returncode == 0
    assert rig.store.point_ids(vm.vm_id) == [ids[0], ids[2]]
    out = tmp_path / "base.raw"
    restore_disk(rig.store, vm.vm_id, ids[0], DISK, out)
    assert out.read_bytes() == rig.content[(vm.vm_id, ids[0])]


def test_points_lists_without_redis_and_says_what_it_cannot_show(tmp_path: Path, st: State) -> None:
    rig, ids = make_points(tmp_path, st, 2)
    env = cli_env(rig, st, HAMAL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    points = hamal(env, "points")
    assert points.returncode == 0, points.stderr
    assert all(pid in points.stdout for pid in ids) and "newest" in points.stdout
    assert "bases of running syncs not shown: cannot reach Redis" in points.stderr
