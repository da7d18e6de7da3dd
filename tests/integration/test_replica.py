"""The fleet keeping raw replicas (`[target] type = replica`) of local VMs: written in place,
restored byte for byte, and a replica whose disk flag names another disk left untouched."""

from __future__ import annotations

import filecmp
import hashlib
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hamal_workers.config import load
from hamal_workers.gc import collect
from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_image, make_inventory, scribble
from hamal_workers.state import State
from hamal_workers.targets import open_target
from hamal_workers.targets.restore import restore_disk
from tests.integration.test_local_sync import scan, start

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
TINY = ImageLayout(
    size=12 * MiB, random_bytes=3 * MiB, compressible_bytes=2 * MiB, zero_bytes=1 * MiB, piece=MiB
)
DISK = "disk0.raw"


def hamal(fleet: LocalFleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", *args],
        env=fleet.env(),
        capture_output=True,
        text=True,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replicas_are_updated_in_place_restore_exactly_and_keep_their_flag(
    fleet: LocalFleet, state: State, events: Any
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=2, disks=1, layout=TINY,
                            track_changes=True)  # fmt: skip
    disks = fleet.root / "disks"
    disks.mkdir()
    vm01_replica = disks / "vm01.raw"
    vm01_replica.touch()  # a replica given in [replica] devices must exist
    # vm03 does not exist yet; the operator will point its disk at vm01's, through a link.
    (disks / "by-id").symlink_to(vm01_replica)
    directory = fleet.root / "replica"
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_TARGET_TYPE": "replica",
        "HAMAL_REPLICA_DIRECTORY": str(directory),
        "HAMAL_REPLICA_DEVICES": f"vm01:{DISK}={vm01_replica}, vm03:{DISK}={disks / 'by-id'}",
    }
    start(fleet)
    scan(fleet)
    assert {r["status"] for r in events.runs(2, timeout=120)} == {"committed"}
    env = fleet.env()
    target = open_target(load(env["HAMAL_CONF"], env), create=False)
    replicas = {
        images[0]: vm01_replica,
        images[1]: Path(target.replica_path(vm_id_for("vm02"), "vm02", DISK)),
    }
    assert replicas[images[1]].parent.parent == directory / "images"
    for image, replica in replicas.items():
        assert filecmp.cmp(image, replica, shallow=False), image

    # The guests write; the next sync reads only what changed and writes it in place.
    rng = random.Random(5)
    for image in images:
        scribble(image, rng, writes=3, max_len=256 * 1024)
    scan(fleet)
    assert {r["status"] for r in events.runs(2, timeout=120)} == {"committed"}
    for image, replica in replicas.items():
        assert filecmp.cmp(image, replica, shallow=False), image
        last = state.history(vm_id_for(image.parent.name), 1)[0]
        assert last["disks"][DISK]["mode"] == "changed", last

    out = fleet.root / "restored.raw"
    restored = hamal(fleet, "restore", "--vm", "vm01", "--disk", DISK, "--to", str(out))
    assert restored.returncode == 0, restored
    assert filecmp.cmp(images[0], out, shallow=False)
    vm02 = target.points(vm_id_for("vm02"))[-1]
    restore_disk(target, vm02.vm_id, vm02.point_id, DISK, fleet.root / "vm02.raw")
    assert filecmp.cmp(images[1], fleet.root / "vm02.raw", shallow=False)

    # The first point's generation was overwritten in place: listed, verified as not held,
    # and refused by restore with what the replica holds instead.
    first, second = target.points(vm_id_for("vm01"))
    refused = hamal(fleet, "restore", "--vm", "vm01", "--disk", DISK, "--point",
                    first.point_id, "--to", str(fleet.root / "old.raw"))  # fmt: skip
    assert refused.returncode == 1, refused
    assert f"replica {vm01_replica} holds generation 2 only" in refused.stderr, refused
    assert "Traceback" not in refused.stderr and not (fleet.root / "old.raw").exists()
    verify = hamal(fleet, "verify", "--vm", "vm01")
    assert verify.returncode == 0, verify
    assert f"OK VM vm01 ({first.vm_id}) point {second.point_id}" in verify.stdout
    assert f"NOT HELD VM vm01 ({first.vm_id}) point {first.point_id}" in verify.stdout

    # vm03 appears, configured onto vm01's replica: refused, and not a byte of it changes.
    make_image(fleet.root / "inventory" / "vm03" / DISK, TINY, seed=303)
    before = sha256(vm01_replica)
    from hamal_workers.celery_app import app

    vm03 = vm_id_for("vm03")
    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm03, "platform": "local"}, queue="period")
    run = events.wait(lambda e: e["event"] == "run" and e["vm_id"] == vm03, 120, "vm03's run")
    assert run["status"] == "failed", run
    expected = f"replica {vm01_replica} belongs to VM vm01 ({first.vm_id}) disk {DISK}, not VM vm03"
    assert expected in state.history(vm03, 1)[0]["error"]
    assert sha256(vm01_replica) == before
    assert filecmp.cmp(images[0], vm01_replica, shallow=False)
    assert target.points(vm03) == []

    # Retention drops the older point's record; there are no chunks to collect.
    target.delete_point(first.vm_id, first.point_id)
    report = collect(target, state, young_s=0.0)
    assert not report.refused and (report.chunks_seen, report.condemned) == (0, 0)
    assert [p.point_id for p in target.points(first.vm_id)] == [second.point_id]
    assert filecmp.cmp(images[0], vm01_replica, shallow=False)
