"""OpenStack instances on Ceph synced by the real fleet: Nova and Cinder from the project's
OpenStack simulator (HTTP, openstacksdk), the disks real RBD images on a real Ceph cluster.

Each restore point must restore byte for byte equal to `rbd export` of the snapshot it
was taken from. The snapshot of point N is the base until point N+1 is committed, so the
reference of each point is exported right after its commit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.simulators.openstack import OpenStackSimulator
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from tests.integration.ceph_rig import MiB, Rbd, digest
from tests.integration.points import restored

pytestmark = pytest.mark.timeout(240)


def ceph_fleet(fleet: LocalFleet, cloud: OpenStackSimulator, ceph: Any, **extra: str) -> None:
    """Point the fleet at the simulated cloud and the test cluster; local platform off."""
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_LOCAL_INVENTORY": "",
        "HAMAL_OPENSTACK_AUTH_URL": cloud.auth_url,
        "HAMAL_OPENSTACK_USERNAME": cloud.username,
        "HAMAL_OPENSTACK_PASSWORD": cloud.connect_kwargs()["password"],
        "HAMAL_OPENSTACK_PROJECT_NAME": cloud.project_name,
        "HAMAL_OPENSTACK_REGION_NAME": cloud.region,
        "HAMAL_OPENSTACK_API_TIMEOUT": "5",
        "HAMAL_CEPH_CONF": str(ceph.conf),
        "HAMAL_CEPH_KEYRING": str(ceph.keyring),
        "HAMAL_OPENSTACK_CEPH_DISK_FLAG_SIZE": "1",
        **extra,
    }


def start(fleet: LocalFleet) -> None:
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("ceph", ["ceph"], concurrency=2)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("ceph")


def sync(fleet: LocalFleet, events: Any, server_id: str, timeout: float = 120) -> dict[str, Any]:
    """`hamal sync` of one instance, and the run event that ends it."""
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": server_id, "platform": "ceph"}, queue="period")
    return events.wait(
        lambda e: e["event"] == "run" and e["vm_id"] == server_id, timeout, f"a run of {server_id}"
    )


def sync_refused(fleet: LocalFleet, events: Any, server_id: str) -> dict[str, Any]:
    """`hamal sync` of an instance that cannot start: the vm-sync event says why."""
    from hamal_workers.celery_app import app

    app.send_task("hamal.vm.sync", kwargs={"vm_id": server_id, "platform": "ceph"}, queue="period")
    return events.wait(
        lambda e: e["event"] == "vm-sync" and e["vm_id"] == server_id and e["status"] == "failed",
        60,
        f"the refusal of {server_id}",
    )


def test_full_then_incremental_with_writes_discards_and_a_resize(
    fleet: LocalFleet, state: State, events: Any, cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    boot = cloud.create_volume("boot", 64 * MiB)
    data = cloud.create_volume("data", 48 * MiB)
    server = cloud.create_server("web-1", volumes=[boot, data])
    images = {f"vda-{boot}": f"volume-{boot}", f"vdb-{data}": f"volume-{data}"}
    rb.fill("volumes", images[f"vda-{boot}"], seed=11, pieces=16)
    rb.fill("volumes", images[f"vdb-{data}"], seed=12, pieces=10)
    ceph_fleet(fleet, cloud, ceph)
    start(fleet)

    expected: dict[str, dict[str, str]] = {}  # point -> disk -> digest of rbd export

    def commit_and_record() -> str:
        run = sync(fleet, events, server)
        assert run["status"] == "committed", state.run(run["run_id"])
        point = run["run_id"]
        expected[point] = {
            disk: digest(rb.export("volumes", image, f"hamal-{point}"))
            for disk, image in images.items()
        }
        return point

    first = commit_and_record()
    store = ChunkStore(str(fleet.root / "store"))
    info = store.point(server, first)
    assert sorted(info.disks) == sorted(images)
    assert info.meta["consistency"] == "group", info.meta
    assert set(info.meta["flags"]) == set(images)

    # Writes, a discard and a grown volume between syncs.
    rb.write("volumes", images[f"vda-{boot}"], 3 * MiB + 17, os.urandom(300_000))
    with rb.image("volumes", images[f"vda-{boot}"]) as img:
        img.discard(16 * MiB, 8 * MiB)
    with rb.image("volumes", images[f"vdb-{data}"]) as img:
        img.resize(80 * MiB)
        img.write(os.urandom(MiB), 70 * MiB)
    second = commit_and_record()
    for disk in images:
        fields = state.disk(second, disk).fields
        assert fields["mode"] == "changed", fields
    # The first point's snapshot went once the second was committed; the second's is the base.
    for image in images.values():
        assert sorted(rb.user_snaps("volumes", image)) == [f"hamal-{second}"]
    assert not [g for g in rb.groups() if g.startswith("hamal-")], "group left after commit"

    third = commit_and_record()  # nothing changed
    assert sum(int(state.disk(third, d).fields["bytes_stored"]) for d in images) == 0

    for point, disks in expected.items():
        for disk, want in disks.items():
            assert digest(restored(fleet, server, point, disk)) == want, (point, disk)

    # The instance is deleted: the next scan deletes its base snapshot (which would block
    # deleting the volume in Cinder), its points stay, and a sync of it fails clearly.
    delete_and_scan(fleet, events, cloud, server)
    for image in images.values():
        assert rb.user_snaps("volumes", image) == []
    assert ChunkStore(str(fleet.root / "store")).point_ids(server) == [first, second, third]
    gone = sync_refused(fleet, events, server)
    assert "not found" in gone["error"], gone


def test_a_clone_and_a_volume_not_on_ceph(
    fleet: LocalFleet, state: State, events: Any, cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    parent = f"golden-{os.urandom(3).hex()}"
    rb.create("volumes", parent, 32 * MiB)
    rb.fill("volumes", parent, seed=21, pieces=8)
    with rb.image("volumes", parent) as img:
        img.create_snap("golden")
    clone = cloud.create_volume("from-golden", 32 * MiB, clone_of=("volumes", parent, "golden"))
    lvm = cloud.create_volume("on-lvm", 16 * MiB, ceph=False)
    server = cloud.create_server("db-1", boot_image_size=24 * MiB, volumes=[clone, lvm])
    rb.fill("vms", f"{server}_disk", seed=22, pieces=5)
    rb.write("volumes", f"volume-{clone}", 5 * MiB, os.urandom(70_000))
    ceph_fleet(fleet, cloud, ceph)
    start(fleet)

    run = sync(fleet, events, server)
    assert run["status"] == "committed", state.run(run["run_id"])
    point = run["run_id"]
    info = ChunkStore(str(fleet.root / "store")).point(server, point)
    assert sorted(info.disks) == ["vda-ephemeral", f"vdb-{clone}"]
    (skipped,) = info.meta["skipped"]
    assert skipped.startswith(f"vdc: volume {lvm}: not on Ceph"), skipped
    history = state.history(server, 1)[0]
    assert history["skipped"] == [skipped]
    log = (fleet.root / "log").rglob("*.log")
    assert any(skipped in p.read_text() for p in log), "the VM's log names the skipped volume"

    shown = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "points", "--vm", "db-1"],
        env=fleet.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "not synced: vdc" in shown.stdout, shown.stdout

    want_clone = rb.export("volumes", f"volume-{clone}", f"hamal-{point}")
    want_root = rb.export("vms", f"{server}_disk", f"hamal-{point}")
    assert restored(fleet, server, point, f"vdb-{clone}") == want_clone
    assert restored(fleet, server, point, "vda-ephemeral") == want_root
    delete_and_scan(fleet, events, cloud, server)


def test_a_base_snapshot_removed_behind_our_back_falls_back_exactly(
    fleet: LocalFleet, state: State, events: Any, cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    vol = cloud.create_volume("boot", 32 * MiB)
    server = cloud.create_server("app-1", volumes=[vol])
    image, disk = f"volume-{vol}", f"vda-{vol}"
    rb.fill("volumes", image, seed=31, pieces=10)
    ceph_fleet(fleet, cloud, ceph)
    start(fleet)
    first = sync(fleet, events, server)
    assert first["status"] == "committed"
    with rb.image("volumes", image) as img:
        img.remove_snap(f"hamal-{first['run_id']}")  # an operator cleaning up
        img.write(os.urandom(4096), 7 * MiB)
    second = sync(fleet, events, server)
    assert second["status"] == "committed", state.run(second["run_id"])
    fields = state.disk(second["run_id"], disk).fields
    assert fields["mode"] == "allocated" and "cannot tell what changed" in fields["notes"], fields
    want = rb.export("volumes", image, f"hamal-{second['run_id']}")
    assert restored(fleet, server, second["run_id"], disk) == want
    delete_and_scan(fleet, events, cloud, server)


def delete_and_scan(
    fleet: LocalFleet, events: Any, cloud: OpenStackSimulator, *servers: str
) -> None:
    """The instances are deleted: a scan deletes their base snapshots (the first scan after
    a run of theirs that was still going when they were deleted)."""
    from hamal_workers.celery_app import app
    from hamal_workers.state import State

    for server in servers:
        cloud.delete_server(server)
    state = State(events.client)
    for _ in range(5):
        app.send_task("hamal.period.scan", queue="period")
        events.wait(lambda e: e["event"] == "scan", 60, "a scan")
        if not any(state.vm(s).get("base_snapshot") for s in servers):
            return
        events.wait(lambda e: e["event"] == "run", 60, "the run still going to end")
    raise AssertionError(f"base snapshots left: {[state.vm(s) for s in servers]}")


def test_discovery_through_a_clouds_yaml_cloud(
    cloud: OpenStackSimulator, ceph: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hamal_workers.config import CephSection, OpenstackSection
    from hamal_workers.platforms.openstack_ceph import OpenStackCephPlatform

    boot = cloud.create_volume("boot", 8 * MiB)
    lvm = cloud.create_volume("scratch", 8 * MiB, ceph=False)
    server = cloud.create_server("yaml-1", volumes=[boot, lvm])
    auth = cloud.connect_kwargs()
    (tmp_path / "clouds.yaml").write_text(
        "clouds:\n  sim:\n    auth:\n"
        + "".join(
            f"      {k}: {auth[k]}\n" for k in ("auth_url", "username", "password", "project_name")
        )
        + "      user_domain_name: Default\n      project_domain_name: Default\n"
        + f"    region_name: {cloud.region}\n    interface: public\n"
    )
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    section = OpenstackSection(cloud="sim", servers="yaml-1")
    ceph_section = CephSection(conf=str(ceph.conf), keyring=str(ceph.keyring))
    with OpenStackCephPlatform(section, ceph_section) as platform:
        (vm,) = platform.discover()
        assert (vm.vm_id, vm.name) == (server, "yaml-1")
        full = platform.vm(server)
    assert [(d.name, d.locator) for d in full.disks] == [(f"vda-{boot}", f"volumes/volume-{boot}")]
    (why,) = full.skipped
    assert why == f"vdb: volume {lvm}: not on Ceph (its connection is iscsi)", why


def test_the_api_certificate_is_checked(ceph: Any, tmp_path: Any) -> None:
    from hamal_workers.config import CephSection, OpenstackSection
    from hamal_workers.platforms.base import PlatformError
    from hamal_workers.platforms.openstack_ceph import OpenStackCephPlatform
    from tests.integration.test_openstack_simulator import _self_signed

    cert, key = _self_signed(tmp_path)
    ceph_section = CephSection(conf=str(ceph.conf), keyring=str(ceph.keyring))
    with OpenStackSimulator(str(ceph.conf), str(ceph.keyring), tls=(str(cert), str(key))) as sim:
        sim.create_server("tls-1", volumes=[sim.create_volume("boot", 4 * MiB)])
        auth = sim.connect_kwargs()
        keys = {k: auth[k] for k in ("auth_url", "username", "password", "project_name")}

        def names(**extra: Any) -> list[str]:
            section = OpenstackSection(**keys, **extra)
            with OpenStackCephPlatform(section, ceph_section) as platform:
                return [vm.name for vm in platform.discover()]

        assert names(cacert=str(cert)) == ["tls-1"]
        assert names(insecure=True) == ["tls-1"]
        with pytest.raises(PlatformError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            names()  # the system's CAs do not know the simulator's certificate
        assert auth["password"] not in str(refused.value)


def test_nova_flavor_disks_are_synced_and_swap_is_said_to_be_skipped(
    cloud: OpenStackSimulator, ceph: Any, rb: Rbd
) -> None:
    from hamal_workers.config import CephSection, OpenstackSection
    from hamal_workers.platforms.openstack_ceph import OpenStackCephPlatform

    data = cloud.create_volume("data", 8 * MiB)
    server = cloud.create_server("flavor-1", boot_image_size=8 * MiB, volumes=[data])
    rb.create("vms", f"{server}_disk.local", 16 * MiB)
    rb.create("vms", f"{server}_disk.swap", 4 * MiB)
    auth = cloud.connect_kwargs()
    section = OpenstackSection(
        **{k: auth[k] for k in ("auth_url", "username", "password", "project_name")}
    )
    ceph_section = CephSection(conf=str(ceph.conf), keyring=str(ceph.keyring))
    with OpenStackCephPlatform(section, ceph_section) as platform:
        vm = platform.vm(server)
    assert [(d.name, d.locator, d.size) for d in vm.disks] == [
        ("vda-ephemeral", f"vms/{server}_disk", 8 * MiB),
        ("ephemeral-local", f"vms/{server}_disk.local", 16 * MiB),
        (f"vdb-{data}", f"volumes/volume-{data}", 8 * MiB),
    ]
    assert vm.skipped == (f"{server}_disk.swap (swap space): not synced",)
    for image in (f"{server}_disk.local", f"{server}_disk.swap"):
        import rbd

        rbd.RBD().remove(rb.io("vms"), image)
