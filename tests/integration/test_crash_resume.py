"""kill -9 of a worker in the middle of a disk sync: the scan notices the expired lease,
dispatches the disk again, and the sync resumes from its checkpoint instead of starting over.
(The other crash points are in test_faults.py.)
"""

from __future__ import annotations

import filecmp
import json
import socket
import subprocess
import sys
import time

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import State, key
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk

MiB = 1024 * 1024
# 192 MiB of data read at about 25 MiB/s (the throttle): a sync of about 8 s.
LAYOUT = ImageLayout(
    size=512 * MiB, random_bytes=128 * MiB, compressible_bytes=64 * MiB, zero_bytes=0, piece=4 * MiB
)
INTERVAL = 5
LEASE = 3


def slow_fleet(fleet: LocalFleet) -> None:
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_PERIOD_INTERVAL": str(INTERVAL),
        "HAMAL_WORKER_LEASE_TIMEOUT": str(LEASE),
        # A lease must outlast three socket timeouts ([redis] socket_timeout).
        "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
        "HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY": "1",
        "HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT": "1",
        "HAMAL_LOCAL_RELEASE_CPU_TIME": "40",
    }


def wait_checkpoint(state: State, run_id: str, disk: str, at_least: int, timeout: float) -> int:
    # The checkpoint is flushed every second; there is no event for "a third done".
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields, _ = state.checkpoint(run_id, disk)
        if int(fields.get("done") or 0) >= at_least:
            return int(fields["done"])
        time.sleep(0.2)
    raise AssertionError(f"checkpoint of {disk} never reached {at_least} chunks")


def test_kill_9_resumes_from_checkpoint(fleet: LocalFleet, state: State, events) -> None:
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    slow_fleet(fleet)
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    fleet.start_beat()

    run_id = events.wait(lambda e: e["event"] == "run-started", 30, "the first run")["run_id"]
    disk = image.name
    total = int(state.checkpoint(run_id, disk)[0].get("total") or 0) or 48
    done_before = wait_checkpoint(state, run_id, disk, at_least=total // 3, timeout=60)

    # Operators see the disk task with its VM, disk and progress in `celery inspect active`.
    inspect = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "hamal_workers",
            "inspect",
            "active",
            "--json",
            "-d",
            f"local@{socket.gethostname()}",
        ],
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    active = next(iter(json.loads(inspect.stdout.splitlines()[-1]).values()))
    hamal = active[0]["hamal"]
    assert (hamal["vm"], hamal["disk"]) == ("vm01", disk) and 0 < hamal["percent"] < 100, hamal

    killed_at = time.time()
    fleet.kill("local", restart=False)
    fleet.start_worker("local-2", ["local"], concurrency=1)
    fleet.wait_worker_ready("local-2")

    finished = events.wait(lambda e: e["event"] == "run", 120, "the run to finish")
    assert finished["status"] == "committed", state.run(run_id)
    status = state.disk(run_id, disk)
    assert status.fields["attempts"] == "2"
    assert int(state.run(run_id).get("redispatches") or 0) >= 1
    # It resumed: the second attempt found at least what was flushed before the kill ...
    assert int(status.fields["chunks_resumed"]) >= done_before
    # ... and read only the rest, not the whole disk again.
    assert int(status.fields["bytes_read"]) <= (total - done_before) * 4 * MiB
    # The scan re-dispatched within two scan intervals of the kill.
    second_start = float(status.fields["started_at"])
    assert second_start - killed_at <= 2 * INTERVAL, second_start - killed_at

    store = ChunkStore(str(fleet.root / "store"))
    out = fleet.root / "restored.raw"
    restore_disk(store, vm_id_for("vm01"), run_id, disk, str(out))
    assert filecmp.cmp(image, out, shallow=False)

    # The broker's own redelivery, hours later, finds the work done and does nothing.
    from hamal_workers.celery_app import app

    late = app.send_task(
        "hamal.disk.sync",
        queue="local",
        ignore_result=False,
        kwargs={
            "run_id": run_id,
            "vm_id": vm_id_for("vm01"),
            "vm_name": "vm01",
            "disk": disk,
            "platform": "local",
        },
    )
    assert late.get(timeout=30)["status"] == "skipped"
    assert state.disk(run_id, disk).fields["attempts"] == "2"
    assert state.r.exists(key("lease", "disk", run_id, disk)) == 0
