"""The Ceph platform when things go wrong: a worker killed mid-disk, OpenStack refusing or
slow, and snapshots left behind by runs that no longer exist."""

from __future__ import annotations

from typing import Any

import pytest

from hamal_workers.config import load
from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms import open_platform
from hamal_workers.platforms.base import new_run_id, snapshot_name
from hamal_workers.simulators.openstack import OpenStackSimulator
from hamal_workers.state import State
from tests.integration.ceph_rig import MiB, Rbd, digest
from tests.integration.test_ceph_sync import (
    ceph_fleet,
    delete_and_scan,
    restored,
    start,
    sync,
    sync_refused,
)
from tests.integration.test_crash_resume import wait_checkpoint

pytestmark = pytest.mark.timeout(240)


def scan_now(events: Any) -> dict[str, Any]:
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")
    return events.wait(lambda e: e["event"] == "scan", 60, "a scan")


def test_kill_9_of_the_ceph_worker_resumes_from_its_checkpoint(
    fleet: LocalFleet, state: State, events: Any, cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    vol = cloud.create_volume("big", 512 * MiB)
    server = cloud.create_server("batch-1", volumes=[vol])
    image, disk = f"volume-{vol}", f"vda-{vol}"
    rb.fill("volumes", image, seed=41, pieces=48, piece=4 * MiB)
    want = digest(rb.export("volumes", image))  # nothing writes it from here on
    ceph_fleet(
        fleet,
        cloud,
        ceph,
        HAMAL_PERIOD_INTERVAL="5",
        HAMAL_WORKER_LEASE_TIMEOUT="3",
        HAMAL_REDIS_SOCKET_TIMEOUT="0.5",
        HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY="1",
        HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT="1",
        # About 25 MiB/s: the sync takes several seconds, long enough to be killed in.
        HAMAL_PERIOD_OPENSTACK_RELEASE_CPU_TIME="40",
    )
    start(fleet)
    fleet.start_beat()
    run_id = events.wait(lambda e: e["event"] == "run-started", 60, "the first run")["run_id"]
    total = int(state.checkpoint(run_id, disk)[0].get("total") or 0) or 48
    done_before = wait_checkpoint(state, run_id, disk, at_least=total // 3, timeout=90)

    fleet.kill("ceph", restart=False)
    fleet.start_worker("ceph-2", ["ceph"], concurrency=1)
    fleet.wait_worker_ready("ceph-2")
    finished = events.wait(lambda e: e["event"] == "run" and e["run_id"] == run_id, 150, "the run")
    assert finished["status"] == "committed", state.run(run_id)
    status = state.disk(run_id, disk).fields
    assert status["attempts"] == "2", status
    assert int(status["chunks_resumed"]) >= done_before, status
    assert int(status["bytes_read"]) <= (total - done_before) * 4 * MiB, status
    assert digest(restored(fleet, server, run_id, disk)) == want

    fleet.stop("beat")
    if state.vm(server).get("active_run"):
        events.wait(lambda e: e["event"] == "run", 120, "the scheduled run to end")
    delete_and_scan(fleet, events, cloud, server)
    assert rb.user_snaps("volumes", image) == []


def test_refused_credentials_fail_at_once_and_a_slow_api_is_retried(
    fleet: LocalFleet, state: State, events: Any, cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    vol = cloud.create_volume("boot", 16 * MiB)
    server = cloud.create_server("api-1", volumes=[vol])
    rb.fill("volumes", f"volume-{vol}", seed=51, pieces=3)
    ceph_fleet(fleet, cloud, ceph, HAMAL_OPENSTACK_API_TIMEOUT="2")
    start(fleet)

    # Refused credentials: a clear status, and no retry (one token request only).
    cloud.set_password("rotated-by-the-cloud-admin")
    cloud.revoke_tokens()
    cloud.clear_calls()
    refused = sync_refused(fleet, events, server)
    assert "credentials were refused (401)" in refused["error"], refused
    assert "rotated" not in refused["error"] and "secret" not in refused["error"]
    tokens = [c for c in cloud.calls if c.method == "POST" and c.path.endswith("/auth/tokens")]
    assert len(tokens) == 1, cloud.calls

    # A slow API: the first call times out, the task is retried, and the sync goes through.
    cloud.set_password(cloud_password := "secret")
    assert cloud.connect_kwargs()["password"] == cloud_password
    cloud.delay(rf"/servers/{server}$", 6, count=1, method="GET")
    cloud.clear_calls()
    run = sync(fleet, events, server, timeout=120)
    assert run["status"] == "committed", state.run(run["run_id"])
    period_log = (fleet.root / "log" / "hamal-period.log").read_text()
    assert f"vm {server}: sync not started, retried later: openstack: reading instance" in (
        period_log
    ), period_log[-2000:]

    # Listings failing (503): the scan keeps every base snapshot, whatever it could not see.
    cloud.fail_next(r"/volumes/detail", 503, count=20)
    cloud.fail_next(r"/servers/detail", 503, count=20)
    failed_scan = scan_now(events)
    assert failed_scan["swept"] == 0, failed_scan
    assert rb.user_snaps("volumes", f"volume-{vol}") == [f"hamal-{run['run_id']}"]
    cloud.clear_faults()
    delete_and_scan(fleet, events, cloud, server)


def test_the_sweep_removes_leftovers_of_dead_runs_and_nothing_else(
    fleet: LocalFleet, state: State, events: Any, cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    vol = cloud.create_volume("boot", 16 * MiB)
    server = cloud.create_server("left-1", boot_image_size=8 * MiB, volumes=[vol])
    ceph_fleet(fleet, cloud, ceph)
    fleet.apply_env()
    settings = load(fleet.env()["HAMAL_CONF"], fleet.env())
    # A proxy that crashed between its snapshot and its first record: Redis knows nothing.
    with open_platform("ceph", settings) as platform:
        vm = platform.vm(server)
        dead = platform.create_snapshot(vm, snapshot_name(new_run_id()))
        assert dead.consistency == "group"
    for pool, image in (("volumes", f"volume-{vol}"), ("vms", f"{server}_disk")):
        with rb.image(pool, image) as img:
            img.create_snap("nightly")  # the operator's
            img.create_snap("hamal-manual")  # named like ours, but no run id: not ours
    start(fleet)
    swept = scan_now(events)  # it also asks for a sync of the instance, which runs now
    assert swept["swept"] == 1, swept
    for pool, image in (("volumes", f"volume-{vol}"), ("vms", f"{server}_disk")):
        left = rb.user_snaps(pool, image)
        assert dead.snapshot_id not in left and {"hamal-manual", "nightly"} <= set(left), left
    assert dead.snapshot_id not in rb.groups()
    run = events.wait(lambda e: e["event"] == "run", 120, "the scan's sync of the instance")
    assert run["status"] == "committed", state.run(run["run_id"])
    for pool, image in (("volumes", f"volume-{vol}"), ("vms", f"{server}_disk")):
        with rb.image(pool, image) as img:
            img.remove_snap("nightly")
            img.remove_snap("hamal-manual")
    delete_and_scan(fleet, events, cloud, server)
    with open_platform("ceph", settings) as platform:
        assert platform.leftover_snapshots() == []
