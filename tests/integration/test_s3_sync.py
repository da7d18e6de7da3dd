"""The fleet syncing into an S3 bucket (`[target] type = s3`) on a real S3 HTTP server,
through an HTTP proxy that makes S3 fail; then a new proxy with nothing but the bucket."""

from __future__ import annotations

import filecmp
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hamal_workers.config import load
from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import make_inventory, scribble
from hamal_workers.targets import open_target
from hamal_workers.targets.restore import restore_disk
from hamal_workers.testbeds import s3 as testbed
from hamal_workers.testbeds.faultproxy import FaultProxy
from tests.integration.test_local_sync import SMALL, scan, start

pytestmark = pytest.mark.timeout(240)


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "HAMAL_TARGET_TYPE": "s3",
        "HAMAL_S3_ENDPOINT_URL": endpoint,
        "HAMAL_S3_BUCKET": "hamal",
        "HAMAL_S3_PREFIX": "site-1",
        "HAMAL_S3_ACCESS_KEY": testbed.ACCESS_KEY,
        "HAMAL_S3_SECRET_KEY": testbed.SECRET_KEY,
        "HAMAL_S3_MAX_ATTEMPTS": "6",
        **extra,
    }


def restored_equal(fleet: LocalFleet, image: Path, env: dict[str, str]) -> bool:
    target = open_target(load(env["HAMAL_CONF"], env), create=False)
    vm_id = vm_id_for(image.parent.name)
    point = target.points(vm_id)[-1]
    out = fleet.root / "out.raw"
    restore_disk(target, vm_id, point.point_id, image.name, str(out))
    try:
        return filecmp.cmp(image, out, shallow=False)
    finally:
        out.unlink()


def test_syncs_into_a_bucket_through_s3_faults_restore_exactly(
    fleet: LocalFleet, events: Any, s3: Any
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=2, disks=1, layout=SMALL)
    with FaultProxy(s3.endpoint_url) as proxy:
        fleet.overrides = {**fleet.overrides, **s3_env(proxy.url)}
        start(fleet)
        # Throttling, 5xx and dropped connections on chunk uploads, a slow manifest.
        proxy.fail(503, count=4, method="PUT", path="/chunks/")
        proxy.fail(500, count=2, method="PUT", path="/chunks/")
        proxy.drop(count=2, method="PUT", path="/chunks/")
        proxy.delay(1.0, count=1, method="PUT", path="/staging/")
        scan(fleet)
        runs = events.runs(2, timeout=120)
        assert {r["status"] for r in runs} == {"committed"}, runs
        injected = [what for *_, what in proxy.calls if what in ("503", "500", "dropped")]
        assert sorted(injected) == ["500"] * 2 + ["503"] * 4 + ["dropped"] * 2
        env = fleet.env()
        for image in images:
            assert restored_equal(fleet, image, env), image

        rng = random.Random(3)
        for image in images:
            scribble(image, rng, writes=2, max_len=128 * 1024)
        scan(fleet)
        runs = events.runs(2, timeout=120)
        assert {r["status"] for r in runs} == {"committed"}, runs
        for image in images:
            assert restored_equal(fleet, image, env), image

        # S3 down for the whole sync: the disk task fails clearly, the next run completes.
        scribble(images[0], rng, writes=1, max_len=4096)
        proxy.down()
        from hamal_workers.celery_app import app

        vm_id = vm_id_for(images[0].parent.name)
        app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"},
                      queue="period")  # fmt: skip
        failed = events.wait(lambda e: e["event"] == "run" and e["vm_id"] == vm_id, 120,
                             "the run while S3 is down")  # fmt: skip
        assert failed["status"] == "failed", failed
        assert testbed.SECRET_KEY not in json.dumps(failed)
        proxy.up()
        app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"},
                      queue="period")  # fmt: skip
        again = events.wait(lambda e: e["event"] == "run" and e["vm_id"] == vm_id, 120,
                            "the run once S3 is back")  # fmt: skip
        assert again["status"] == "committed", again
        assert restored_equal(fleet, images[0], env)


def test_a_new_proxy_with_only_the_bucket_lists_and_restores_every_point(
    fleet: LocalFleet, events: Any, s3: Any, tmp_path: Path
) -> None:
    images = make_inventory(fleet.root / "inventory", vms=2, disks=1, layout=SMALL)
    metadata = {"HAMAL_SYNC_UPLOAD_METADATA_TO_OSS": "true"}
    fleet.overrides = {**fleet.overrides, **s3_env(s3.endpoint_url, **metadata)}
    start(fleet)
    scan(fleet)
    assert {r["status"] for r in events.runs(2, timeout=120)} == {"committed"}
    fleet.stop_all()

    # A new machine: its own empty config directory, no Redis, no inventory, no lib dir.
    new = tmp_path / "new-proxy"
    new.mkdir()
    conf = new / "hamal.conf"
    conf.write_text(
        "[DEFAULT]\n"
        f"hamal_lib_dir = {new / 'lib'}\nhamal_info_path = {new / 'lib' / 'info'}\n"
        f"log_dir = {new / 'log'}\n"
        "[redis]\nurl = redis://127.0.0.1:1/0\n"
        "[target]\ntype = s3\n"
        f"[s3]\nendpoint_url = {s3.endpoint_url}\nbucket = hamal\nprefix = site-1\n"
        f"access_key = {testbed.ACCESS_KEY}\nsecret_key = {testbed.SECRET_KEY}\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HAMAL_CONF": str(conf), "HOME": str(new)}
    for image in images:
        name = image.parent.name
        shown = subprocess.run(
            [sys.executable, "-m", "hamal_workers.cli", "points", "--vm", name, "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert testbed.SECRET_KEY not in shown.stdout + shown.stderr
        (point,) = json.loads(shown.stdout)["points"]
        # The bucket describes the VM too: its disks in order, each with its change id.
        described = point["metadata"]
        assert (described["vm_name"], described["point_id"]) == (name, point["point_id"])
        assert [d["name"] for d in described["disks"]] == [image.name]
        assert described["disks"][0]["change_id"] == point["meta"]["tokens"][image.name]
        out = new / f"{name}.raw"
        restore = subprocess.run(
            [sys.executable, "-m", "hamal_workers.cli", "restore", "--vm", name, "--disk",
             image.name, "--point", point["point_id"], "--to", str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert restore.returncode == 0, restore.stderr
        assert filecmp.cmp(image, out, shallow=False), name
