"""A worker stopped as `docker-compose down` stops it (SIGTERM to its main process, remapped
to SIGQUIT as the compose file sets) in the middle of a disk sync: Celery's soft shutdown
cancels the task, its message goes back to the queue at once, and another worker resumes
the disk from its checkpoint -- no beat, no scan, no waiting for a lease to expire."""

from __future__ import annotations

import filecmp
import signal
import subprocess

import redis

from hamal_workers.localfleet import LocalFleet
from hamal_workers.metrics import queue_keys
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import make_inventory
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk
from tests.integration.test_crash_resume import LAYOUT, slow_fleet, wait_checkpoint


def test_a_stopped_worker_hands_its_disk_back_and_another_resumes_it(
    fleet: LocalFleet, state: State, events
) -> None:
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    slow_fleet(fleet)
    fleet.overrides = {**fleet.overrides, "REMAP_SIGTERM": "SIGQUIT"}
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    from hamal_workers.celery_app import app

    vm_id = vm_id_for("vm01")
    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"})
    run_id = events.wait(lambda e: e["event"] == "run-started", 30, "the run")["run_id"]
    disk = image.name
    total = int(state.checkpoint(run_id, disk)[0].get("total") or 0) or 48
    done_before = wait_checkpoint(state, run_id, disk, at_least=total // 4, timeout=60)

    stopped = fleet.kill("local", signal.SIGTERM, restart=False, group=False)
    try:
        code = stopped.wait(timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the worker did not stop within its soft shutdown") from exc
    assert code != -signal.SIGKILL, code
    log = (fleet.root / "proc" / "local.out").read_text()
    assert "Initiating Soft Shutdown" in log, log[-2000:]
    # The disk's message is back in its queue: nothing waits for a lease or a scan.
    client = redis.Redis(port=fleet.redis_port)
    assert sum(client.llen(k) for k in queue_keys("local")) == 1
    assert state.run(run_id)["status"] not in ("committed", "failed")

    fleet.start_worker("local-2", ["local"], concurrency=1)
    finished = events.wait(lambda e: e["event"] == "run", 120, "the run to finish")
    assert finished["status"] == "committed", state.run(run_id)
    status = state.disk(run_id, disk)
    assert status.fields["attempts"] == "2"
    assert int(state.run(run_id).get("redispatches") or 0) == 0  # the requeue, not a scan
    assert int(status.fields["chunks_resumed"]) >= done_before
    store = ChunkStore(str(fleet.root / "store"))
    out = fleet.root / "restored.raw"
    restore_disk(store, vm_id, run_id, disk, str(out))
    assert filecmp.cmp(image, out, shallow=False)
