"""`hamal metrics` scraped over HTTP while a fleet syncs: per-VM recovery point age, the
last run's duration and bytes, runs per status, sweeps and queue lengths."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import make_inventory
from hamal_workers.state import FAILED, State
from hamal_workers.targets.chunkstore import ChunkStore
from tests.integration.test_local_sync import SMALL, scan, start

pytestmark = pytest.mark.timeout(180)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def vm_sample(found: dict[Any, float], name: str, vm_id: str, vm: str, **more: str) -> float:
    return found[(name, tuple(sorted({"vm_id": vm_id, "vm": vm, **more}.items())))]


def test_a_scrape_tells_each_vms_recovery_point_and_the_fleets_backlog(
    fleet: LocalFleet, events: Any, state: State
) -> None:
    make_inventory(fleet.root / "inventory", vms=2, disks=1, layout=SMALL)
    start(fleet)
    before = time.time()
    scan(fleet)
    runs = events.runs(2, timeout=120)
    assert {r["status"] for r in runs} == {"committed"}, runs
    fleet.stop_all()
    # Three messages no worker takes (no fleet runs now), on one queue.
    from hamal_workers.celery_app import app

    for _ in range(3):
        app.send_task("hamal.disk.sync", kwargs={}, queue="vmware")
    # A failed run of vm02, ended by the product's own bookkeeping.
    vm02 = vm_id_for("vm02")
    state.finish_run("failed-run", vm02, FAILED, {"status": FAILED, "error": "test"})

    server = subprocess.Popen(
        [sys.executable, "-m", "hamal_workers.cli", "metrics", "--port", "0"],
        env=fleet.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("hamal metrics: serving http://127.0.0.1:"), line
        url = line.split()[-1]
        with urllib.request.urlopen(url, timeout=30) as answer:
            text = answer.read().decode()
        scraped = time.time()
    finally:
        server.terminate()
        server.wait(timeout=30)
    found = samples(text)

    assert found[("hamal_redis_up", ())] == 1
    assert found[("hamal_queue_length", (("queue", "vmware"),))] == 3
    assert found[("hamal_queue_length", (("queue", "local"),))] == 0
    assert found[("hamal_runs_active", ())] == 0
    store = ChunkStore(fleet.root / "store", create=False)
    for name in ("vm01", "vm02"):
        vm_id = vm_id_for(name)
        (point,) = store.points(vm_id)
        stamp = vm_sample(found, "hamal_vm_last_point_timestamp_seconds", vm_id, name)
        assert stamp == point.created
        age = vm_sample(found, "hamal_vm_last_point_age_seconds", vm_id, name)
        assert 0 <= age <= scraped - point.created and point.created >= before
        assert vm_sample(found, "hamal_vm_runs_total", vm_id, name, status="committed") == 1
    vm01 = vm_id_for("vm01")
    (last,) = state.history(vm01, 1)
    read = sum(int(d["bytes_read"]) for d in last["disks"].values())
    assert vm_sample(found, "hamal_vm_last_run_read_bytes", vm01, "vm01") == read > 0
    stored = vm_sample(found, "hamal_vm_last_run_stored_bytes", vm01, "vm01")
    assert 0 < stored <= read
    duration = vm_sample(found, "hamal_vm_last_run_duration_seconds", vm01, "vm01")
    assert duration == pytest.approx(last["finished"] - last["started"])
    assert vm_sample(found, "hamal_vm_last_run_failed", vm01, "vm01") == 0
    # vm02's last run failed: it says so, and its newest point is still the committed one.
    assert vm_sample(found, "hamal_vm_last_run_failed", vm02, "vm02") == 1
    assert vm_sample(found, "hamal_vm_consecutive_failures", vm02, "vm02") == 1
    assert vm_sample(found, "hamal_vm_runs_total", vm02, "vm02", status="failed") == 1
    assert found[("hamal_snapshots_swept_total", ())] == 0


def test_redis_out_of_reach_is_a_scrape_that_says_so(fleet: LocalFleet) -> None:
    env = {**fleet.env(), "HAMAL_REDIS_URL": "redis://:hunter2-canary@127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "metrics", "--once"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert samples(done.stdout)[("hamal_redis_up", ())] == 0
    assert "hunter2-canary" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
