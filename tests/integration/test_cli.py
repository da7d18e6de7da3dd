"""The `hamal` command and the processes' info file against a running fleet."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from hamal_workers.localfleet import LocalFleet, free_port
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory

MiB = 1024 * 1024
SMALL = ImageLayout(
    size=32 * MiB, random_bytes=4 * MiB, compressible_bytes=4 * MiB, zero_bytes=0, piece=1 * MiB
)


def hamal(
    fleet: LocalFleet, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", *args],
        env=env or fleet.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sync_wait_status_points_and_info_file(fleet: LocalFleet) -> None:
    make_inventory(fleet.root / "inventory", vms=1, disks=2, layout=SMALL)
    described = {
        "cpus": 2, "memory_mib": 4096, "firmware": "efi",
        "nics": [{"name": "eth0", "mac": "52:54:00:12:34:56", "network": "lan"}],
        "disks": {"disk1.raw": {"device": "/dev/vda", "boot": True}},
    }  # fmt: skip
    (fleet.root / "inventory" / "vm01" / "vm.json").write_text(json.dumps(described))
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_SYNC_SAVE_LOCAL_SNAPSHOT_METADATA": "true",
        "HAMAL_SYNC_UPLOAD_METADATA_TO_OSS": "true",
    }
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")

    info = json.loads((fleet.root / "lib" / "hamal_info").read_text())
    queues = sorted(tuple(p["queues"]) for p in info["processes"].values() if p["role"] == "worker")
    assert queues == [("local",), ("period",)], info
    assert info["version"] and info["addresses"]

    synced = hamal(fleet, "sync", "--vm", "vm01", "--wait", "--timeout", "60")
    assert synced.returncode == 0, synced.stderr
    assert "committed" in synced.stdout

    # The point's metadata: under hamal_lib_dir and beside the point in the store, alike.
    (saved,) = (fleet.root / "lib" / "metadata").rglob("*.json")
    record = json.loads(saved.read_text())
    assert record["point_id"] in synced.stdout
    # In the VM's order: the boot disk first.
    assert [d["name"] for d in record["disks"]] == ["disk1.raw", "disk0.raw"]
    assert {d["mode"] for d in record["disks"]} == {"allocated"}  # a first, full read
    assert record["vm_name"] == "vm01" and record["snapshot"]["id"].startswith("hamal-")
    vm = record["vm"]
    assert (vm["cpus"], vm["memory_mib"], vm["firmware"]) == (2, 4096, "efi")
    assert [(n["name"], n["mac"]) for n in vm["nics"]] == [("eth0", "52:54:00:12:34:56")]
    assert [(d["name"], d["device"], d["boot"]) for d in vm["disks"]] == [
        ("disk1.raw", "/dev/vda", True), ("disk0.raw", None, False)
    ]  # fmt: skip
    (point_dir,) = (fleet.root / "store" / "points").glob("*/*")
    assert json.loads((point_dir / "metadata.json").read_text()) == record
    listed = hamal(fleet, "points", "--vm", "vm01", "--json")
    assert listed.returncode == 0, listed.stderr
    (shown,) = json.loads(listed.stdout)["points"]
    assert shown["metadata"] == record
    saved.unlink()  # the store's copy alone still answers
    (shown,) = json.loads(hamal(fleet, "points", "--vm", "vm01", "--json").stdout)["points"]
    assert shown["metadata"] == record

    status = hamal(fleet, "status")
    assert status.returncode == 0, status.stderr
    assert "vm01" in status.stdout and "committed" in status.stdout

    points = hamal(fleet, "points", "--vm", "vm01")
    assert points.returncode == 0, points.stderr
    assert "vm01" in points.stdout

    verify = hamal(fleet, "verify", "--vm", "vm01")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    unknown = hamal(fleet, "sync", "--vm", "nope")
    assert unknown.returncode == 1
    assert "no VM named 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_worker_with_a_bad_config_says_what_is_wrong(fleet: LocalFleet) -> None:
    env = {**fleet.env(), "HAMAL_PERIOD_INTERVAL": "soon", "HAMAL_MASS_AUTH_KEY": "s3cret-key"}
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "hamal_workers", "worker", "-Q", "local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2
    assert "HAMAL_PERIOD_INTERVAL: [period] interval = 'soon': expected" in worker.stderr
    assert "Traceback" not in worker.stderr and "s3cret-key" not in worker.stderr

    check = hamal(fleet, "config", "check", env=env)
    assert check.returncode == 2 and "[period] interval" in check.stderr


@pytest.mark.timeout(120)
def test_commands_that_need_redis_say_in_one_line_that_it_is_unreachable(
    fleet: LocalFleet,
) -> None:
    fleet.redis_port = free_port()  # nothing listens there
    fleet.redis_password = "pw-CANARY"
    make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    unreachable = (
        f"cannot reach Redis at redis://:***@127.0.0.1:{fleet.redis_port}/0: connection refused"
    )
    for command in (["status"], ["sync", "--vm", "vm01"], ["sync", "--vm", "vm01", "--wait"]):
        done = hamal(fleet, *command)
        assert done.returncode == 1, done
        assert done.stderr == f"hamal {command[0]}: {unreachable}\n", done.stderr
        assert "CANARY" not in done.stdout + done.stderr


@pytest.mark.timeout(120)
def test_sync_without_a_worker_on_queue_period_says_so_and_sends_nothing(
    fleet: LocalFleet, redis_port: int
) -> None:
    make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    fleet.start_worker("local", ["local"], concurrency=1)  # a worker, but not for vm.sync
    fleet.wait_worker_ready("local")
    started = time.monotonic()
    done = hamal(fleet, "sync", "--vm", "vm01", "--wait")
    print(f"hamal sync without a period worker returned in {time.monotonic() - started:.2f} s")
    assert done.returncode == 1
    assert done.stderr == (
        "hamal sync: no worker consumes queue period: start one "
        "(celery -A hamal_workers worker -Q period); nothing was sent\n"
    )
    assert redis.Redis(port=redis_port).llen("period") == 0


@pytest.mark.timeout(120)
def test_sync_wait_that_times_out_says_it_waited_and_that_the_sync_goes_on(
    fleet: LocalFleet,
) -> None:
    make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    fleet.start_worker("period", ["period"], concurrency=1)  # no worker runs the disk tasks
    fleet.wait_worker_ready("period")
    done = hamal(fleet, "sync", "--vm", "vm01", "--wait", "--timeout", "1")
    assert done.returncode == 1, done.stderr
    assert "sync of vm01" in done.stdout
    assert done.stderr.splitlines() == [
        "waiting for vm01's sync to commit, at most 1 s (Ctrl-C stops waiting; the sync goes on)",
        "hamal sync: vm01: still not committed after 1 s; the sync goes on: see hamal status",
    ]
