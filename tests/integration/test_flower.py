"""Flower as an operator uses it, in Debian's Chromium (headless): refused without its basic
auth; with it, the tasks page lists the running hamal.disk.sync, whose page names its VM
and disk; and no password -- Redis's or Flower's own -- appears on any page."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from hamal_workers.localfleet import LocalFleet, free_port
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import make_inventory
from hamal_workers.state import State
from tests.integration.conftest import TESTRUN
from tests.integration.test_crash_resume import LAYOUT, wait_checkpoint
from tests.integration.test_secrets import REDIS_PASSWORD, wait_answering

pytestmark = pytest.mark.timeout(240)
FLOWER_PASSWORD = "fl0wer-canary-pw"


@pytest.fixture
def browser() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("Debian's chromium is not installed: run scripts/setup-flower.sh")
    return found


@pytest.fixture
def password_fleet(request: pytest.FixtureRequest) -> Iterator[LocalFleet]:
    root = TESTRUN / request.node.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fleet = LocalFleet(root, redis_password=REDIS_PASSWORD)
    fleet.start_redis()  # its own, with a password: the session Redis has none
    fleet.overrides = {
        "HAMAL_LOCAL_INVENTORY": str(root / "inventory"),
        "HAMAL_PERIOD_INTERVAL": "3600",
        # A disk that takes long enough to be seen running.
        "HAMAL_LOCAL_RELEASE_CPU_TIME": "150",
        "HAMAL_DATA_SYNC_V2_PRE_DISK_READERS_COUNT": "1",
        "HAMAL_DATA_SYNC_V2_FSYNC_PERIOD_FREQUENCY": "1",
    }
    make_inventory(root / "inventory", vms=1, disks=1, layout=LAYOUT)
    yield fleet
    fleet.stop_all()


def page(browser: str, url: str, profile: Path) -> str:
    """The page's DOM once its scripts ran (Flower fills its tables from its API)."""
    done = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_an_operator_sees_the_running_disk_task_and_no_secret(
    password_fleet: LocalFleet, browser: str, tmp_path: Path
) -> None:
    fleet = password_fleet
    port = free_port()
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.start_flower(port, f"ops:{FLOWER_PASSWORD}")
    wait_answering(fleet, ["period", "local"])
    app = Celery("flower-test", broker=fleet.redis_url, set_as_current=False)
    app.send_task(
        "hamal.vm.sync", kwargs={"vm_id": vm_id_for("vm01"), "platform": "local"}, queue="period"
    )
    app.close()
    state = State(redis.Redis.from_url(fleet.redis_url))
    deadline = time.monotonic() + 60
    while not state.active_runs():  # no events for a fleet on its own Redis: its record
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    (run_id,) = state.active_runs()
    wait_checkpoint(state, run_id, "disk0.raw", at_least=1, timeout=60)

    base = f"http://127.0.0.1:{port}"
    refused = page(browser, f"{base}/tasks", tmp_path / "anonymous")
    assert "hamal.disk.sync" not in refused
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{base}/api/tasks", timeout=30)
    assert denied.value.code == 401

    login = f"http://ops:{FLOWER_PASSWORD}@127.0.0.1:{port}"
    profile = tmp_path / "operator"
    tasks = page(browser, f"{login}/tasks", profile)
    running = re.search(r"hamal\.disk\.sync.{0,400}?([0-9a-f-]{36}).{0,200}?STARTED", tasks, re.S)
    assert running, tasks[-3000:]
    task = page(browser, f"{login}/task/{running.group(1)}", profile)
    assert "STARTED" in task and "vm01" in task and "disk0.raw" in task, task[-3000:]
    pages = [tasks, task, refused]
    pages += [page(browser, f"{login}/{where}", profile) for where in ("workers", "broker")]
    for text in pages:
        for secret in (REDIS_PASSWORD, FLOWER_PASSWORD):
            assert secret not in text
