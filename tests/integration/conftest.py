"""Real components: one redis-server for the session, real celery worker/beat processes per test.

The test process talks to the fleet through the same Redis (sending tasks, reading
state, awaiting events on the hamal:events channel); each test gets its own directory
for inventory, store, logs and library, passed to the fleet's processes as HAMAL_* env.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hamal_workers.localfleet import LocalFleet, free_port
from hamal_workers.state import State, key

# Each pytest-xdist worker has its own Redis, Ceph and fleet directories: nothing is shared.
# HAMAL_TESTRUN moves them, so that two sessions can run from one tree.
TESTRUN = Path(
    os.environ.get("HAMAL_TESTRUN") or Path(__file__).resolve().parents[2] / ".testrun"
) / os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def redis_port() -> Iterator[int]:
    root = TESTRUN / "redis"
    shutil.rmtree(root, ignore_errors=True)
    fleet = LocalFleet(root)
    fleet.redis_port = free_port()
    fleet.start_redis()
    os.environ["HAMAL_REDIS_URL"] = fleet.redis_url
    os.environ["HAMAL_CONF"] = str(fleet.config)
    os.environ["HAMAL_DEFAULT_LOG_DIR"] = str(root / "log")
    os.environ["HAMAL_DEFAULT_HAMAL_LIB_DIR"] = str(root / "lib")
    os.environ["HAMAL_DEFAULT_HAMAL_INFO_PATH"] = str(root / "lib" / "hamal_info")
    yield fleet.redis_port
    # Celery's AsyncResults unsubscribe when collected: let them while Redis still runs.
    gc.collect()
    fleet.stop_all()


class Events:
    """Awaits events the fleet publishes on hamal:events: no sleeping, no polling."""

    def __init__(self, client: redis.Redis) -> None:
        # Held: a Redis client that is collected disconnects its pool, this subscription too.
        self.client = client
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(key("events"))
        # Subscribed only once Redis confirms: an event published before would be missed.
        confirmed = self.pubsub.get_message(timeout=10.0)
        assert confirmed and confirmed["type"] == "subscribe", confirmed
        self.pubsub.ignore_subscribe_messages = True
        self.seen: list[dict[str, Any]] = []

    def wait(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.pubsub.get_message(timeout=min(left, 1.0))
            except redis.ConnectionError:
                # Redis is restarting: the next call reconnects and subscribes again.
                time.sleep(0.1)
                continue
            if msg is None:
                continue
            event = json.loads(msg["data"])
            self.seen.append(event)
            if predicate(event):
                return event
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; saw {self.seen}")

    def runs(self, count: int, timeout: float) -> list[dict[str, Any]]:
        done = []
        for n in range(count):
            done.append(
                self.wait(
                    lambda e: e["event"] == "run", timeout, f"run {n + 1} of {count} to finish"
                )
            )
        return done


@pytest.fixture
def fleet(redis_port: int, request: pytest.FixtureRequest) -> Iterator[LocalFleet]:
    root = TESTRUN / request.node.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    client = redis.Redis(port=redis_port)
    client.flushall()
    fleet = LocalFleet(root, {"HAMAL_LOCAL_INVENTORY": str(root / "inventory")})
    fleet.redis_port = redis_port
    (root / "inventory").mkdir()
    yield fleet
    fleet.stop_all()
    logs = root / "proc"
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for f in sorted(logs.glob("*.out")):
            print(f"--- {f.name}\n{f.read_text()[-4000:]}")


@pytest.fixture
def state(redis_port: int) -> State:
    return State(redis.Redis(port=redis_port))


@pytest.fixture
def st(redis_port: int) -> State:
    """State on an emptied Redis, for tests that drive the product without a fleet."""
    client = redis.Redis(port=redis_port)
    client.flushall()
    return State(client)


@pytest.fixture
def events(redis_port: int) -> Iterator[Events]:
    ev = Events(redis.Redis(port=redis_port))
    yield ev
    ev.pubsub.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def ceph() -> Iterator[Any]:
    """A real one-monitor, one-OSD Ceph for the session; none of our snapshots may outlive it."""
    from hamal_workers.testbeds.ceph import down, missing_tools, up

    missing = missing_tools()
    if missing:
        pytest.skip(f"Ceph tools missing ({', '.join(missing)}): run scripts/setup-ceph.sh")
    try:
        import rbd  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the rbd binding does not load ({exc}): run scripts/setup-ceph.sh")
    from tests.integration.ceph_rig import ours_left

    directory = TESTRUN / "ceph"
    down(directory)
    cluster = up(directory)
    yield cluster
    left = ours_left(cluster)
    down(directory)
    assert not left, f"the suite left the proxy's snapshots on the cluster: {left}"


@pytest.fixture
def start_vcenter(tmp_path: Path) -> Iterator[Any]:
    """start_vcenter(**options): a vCenter simulator for this test, stopped after it."""
    from hamal_workers.testbeds import vcenter as testbed

    missing = testbed.missing_tools()
    if missing:
        pytest.skip(
            f"vCenter simulator tools missing ({', '.join(missing)}): run scripts/setup-vmware.sh"
        )
    started: list[Any] = []

    def start(**options: Any) -> Any:
        started.append(testbed.start(tmp_path / f"vcenter{len(started)}", **options))
        return started[-1]

    yield start
    left = {}
    for running in started:
        if running.process.poll() is None:
            left[running.url] = _our_vcenter_snapshots(running)
        running.stop()
    left = {url: names for url, names in left.items() if names}
    assert not left, f"the test left the proxy's snapshots on vCenter: {left}"


def _our_vcenter_snapshots(vc: Any) -> list[str]:
    from hamal_workers.platforms.base import run_of_snapshot
    from tests.integration.vmware_rig import VSphereRig

    rig = VSphereRig(vc)
    try:
        return [name for name in rig.every_snapshot() if run_of_snapshot(name)]
    finally:
        rig.close()


@pytest.fixture
def vsphere(start_vcenter: Any) -> Iterator[Any]:
    """A vCenter simulator (two VMs of one 64 MiB disk) and its administrator's rig."""
    from tests.integration.vmware_rig import VSphereRig

    rig = VSphereRig(start_vcenter())
    yield rig
    rig.close()


@pytest.fixture
def rb(ceph: Any) -> Iterator[Any]:
    """librbd on the session's cluster, as a guest or an operator would touch it."""
    from tests.integration.ceph_rig import Rbd

    handle = Rbd(ceph)
    yield handle
    handle.close()


@pytest.fixture
def cloud(ceph: Any) -> Iterator[Any]:
    """The project's OpenStack simulator over the session's cluster, for one test."""
    from hamal_workers.simulators.openstack import OpenStackSimulator

    with OpenStackSimulator(str(ceph.conf), str(ceph.keyring)) as sim:
        yield sim


@pytest.fixture
def fusion(tmp_path: Path) -> Iterator[Any]:
    """The project's FusionCompute simulator (a VRM over HTTPS and its hosts' backup sockets)
    for one test, which must leave no backup resource behind. Snapshots: the tests check
    them, since the newest committed one stays as the next sync's base."""
    from hamal_workers.simulators.fusion_compute import FusionComputeSimulator

    with FusionComputeSimulator(tmp_path / "fusion") as sim:
        yield sim
        live = sim.backup_resources(live_only=True)
        assert not live, f"the test left backup resources: {live}"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[Any]:
    """A real S3 HTTP server (moto's server mode) on loopback with a bucket "hamal"."""
    from hamal_workers.testbeds import s3 as testbed

    with testbed.start(tmp_path / "s3") as server:
        server.create_bucket("hamal")
        yield server


# The longest tests start first: pytest-xdist hands tests out in collection order, and one
# of these begun last would run alone at the end while the other process idles.
LONG_FIRST = (
    "test_install.py",
    "test_images.py",
    "test_gc.py",
    "test_s3_sync.py",
    "test_secrets.py",
    "test_redis_loss.py",
    "test_faults.py",
    "test_crash_resume.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
