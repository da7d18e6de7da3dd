"""The fleet under Mass (docs/mass-api.yaml): the project's Mass simulator gives the tasks,
the workers sync what they say -- a FusionCompute VM whose credentials come only from its
task, and a local one -- and report every state change; through an outage of Mass the syncs
go on and the reports wait, then arrive newest first, once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.metrics import HamalCollector
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.simulators.mass import MassSimulator
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore
from tests.integration.points import restored
from tests.integration.test_fusion_sync import redis_values

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20
TINY = ImageLayout(size=8 * MiB, random_bytes=2 * MiB, compressible_bytes=MiB, zero_bytes=0,
                   piece=MiB)  # fmt: skip


def mass_fleet(fleet: LocalFleet, sim: MassSimulator, **extra: str) -> None:
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_LOCAL_INVENTORY": "",  # Mass decides what is protected
        **sim.hamal_env(),
        "HAMAL_SYNC_SAVE_LOCAL_SNAPSHOT_METADATA": "true",
        **extra,
    }
    fleet.apply_env()


def exchange(events: Any) -> dict[str, Any]:
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.mass", queue="period")
    return events.wait(lambda e: e["event"] == "mass", 60, "an exchange with Mass")


def scan(events: Any) -> dict[str, Any]:
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")
    return events.wait(lambda e: e["event"] == "scan", 60, "a scan")


def run_of(events: Any, vm_id: str) -> dict[str, Any]:
    return events.wait(
        lambda e: e["event"] == "run" and e["vm_id"] == vm_id, 120, f"a run of {vm_id}"
    )


def test_mass_tasks_drive_the_syncs_and_every_state_is_reported(
    fleet: LocalFleet, state: State, events: Any, fusion: Any, tmp_path: Path
) -> None:
    canary = "c4nary-vrm-by-mass/5"
    fusion.password = canary  # the VRM's password: only the task carries it
    fc_vm = fusion.add_vm("erp-9", [16 * MiB])
    fusion.write(fc_vm, 0, 3 * MiB, b"\x3c" * (2 * MiB))
    images = make_inventory(tmp_path / "inventory", vms=2, disks=1, layout=TINY)
    auth_key = "c4nary-mass-auth/6"
    with MassSimulator(tmp_path / "mass", auth_key=auth_key) as sim:
        sim.put_task({
            "task_id": "fc-1", "platform": "fusion", "vm": {"id": fc_vm, "name": "erp-9"},
            "source": fusion.connection(ca_cert=True),  # its password: the canary
            "schedule": {"interval_s": 3600},
            "ip_mapping": [{"source_ip": "10.1.0.9", "target_ip": "172.16.0.9"}],
        })  # fmt: skip
        sim.put_task({
            "task_id": "local-1", "platform": "local", "vm": {"id": vm_id_for("vm01")},
            "source": {"inventory": str(tmp_path / "inventory")}, "schedule": {"interval_s": 3600},
        })  # fmt: skip
        mass_fleet(fleet, sim)
        for name, queues in (("period", ["period"]), ("fusion", ["fusion"]), ("local", ["local"])):
            fleet.start_worker(name, queues, concurrency=1)
        for name in ("period", "fusion", "local"):
            fleet.wait_worker_ready(name)

        assert exchange(events)["accepted"] == 2
        scanned = scan(events)
        assert scanned["vms"] == 2, "vm02 has no task: not protected"
        ended = events.runs(2, 120)
        assert {run["vm_id"] for run in ended} == {fc_vm, vm_id_for("vm01")}
        for vm_id in (fc_vm, vm_id_for("vm01")):
            last = state.history(vm_id, 1)[0]
            assert last["status"] == "committed", last
        point = state.history(fc_vm, 1)[0]["run_id"]
        assert restored(fleet, fc_vm, point, "disk1") == fusion.content(fc_vm, 0)
        local_point = state.history(vm_id_for("vm01"), 1)[0]["run_id"]
        assert (
            restored(fleet, vm_id_for("vm01"), local_point, "disk0.raw") == images[0].read_bytes()
        )

        assert exchange(events)["delivered"] >= 4
        states = [(r["task_id"], r["state"]) for r in sim.reports]
        for task_id in ("fc-1", "local-1"):
            mine = [s for t, s in states if t == task_id]
            assert mine[0] == "accepted" and {"syncing", "committed"} <= set(mine), mine
        committed = next(
            r for r in sim.reports if r["task_id"] == "fc-1" and r["state"] == "committed"
        )
        assert committed["point_id"] == point and committed["bytes_read"] > 0
        assert scan(events)["requests"] == 0, "not due again within the task's interval"

        metadata = (fleet.root / "lib" / "metadata").rglob(f"{point}.json")
        record = json.loads(next(metadata).read_text())
        assert record["ip_mapping"] == [{"source_ip": "10.1.0.9", "target_ip": "172.16.0.9"}]
        assert record["mass_task"] == {"task_id": "fc-1", "version": 1}

        # A damaged chunk is read again from the source Mass' task names (`verify --repair`).
        store = ChunkStore(fleet.root / "store", create=False)
        names = [n for n in store.manifest(fc_vm, point, "disk1").entries if n is not None]
        damaged = store.chunk_path(names[0])
        data = bytearray(damaged.read_bytes())
        data[100] ^= 0x40
        damaged.write_bytes(bytes(data))
        repair = subprocess.run(
            [sys.executable, "-m", "hamal_workers.cli", "verify", "--vm", "erp-9", "--repair"],
            env=fleet.env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert f"REPAIRED chunk {names[0].hex()}" in repair.stdout, (repair.stdout, repair.stderr)
        assert fusion.snapshot_names(fc_vm) == [f"hamal-{point}"], "the repair's snapshot is gone"

        # Mass stops protecting the FusionCompute VM: its base snapshot goes, then the task.
        assert fusion.snapshot_names(fc_vm) == [f"hamal-{point}"], "the base, kept until now"
        sim.remove_task("fc-1")
        assert exchange(events)["removed"] == 1
        assert "fc-1" in state.retired_mass_tasks()
        swept = scan(events)
        assert fusion.snapshot_names(fc_vm) == [], swept
        assert state.retired_mass_tasks() == {} and state.mass_source("fc-1") is None
        assert restored(fleet, fc_vm, point, "disk1") == fusion.content(fc_vm, 0), "points stay"

        values = redis_values(state.r)
        fleet.stop_all()
        texts = {f"redis {k}": v for k, v in values.items()}
        texts |= {str(p): p.read_bytes() for folder in ("log", "lib", "proc", "store")
                  for p in (fleet.root / folder).rglob("*") if p.is_file()}  # fmt: skip
        assert any("metadata.json" in name or "/metadata/" in name for name in texts)
        for secret in (canary, auth_key):
            assert [name for name, data in texts.items() if secret.encode() in data] == []


def test_through_an_outage_syncs_go_on_and_reports_arrive_newest_first_once(
    fleet: LocalFleet, state: State, events: Any, tmp_path: Path
) -> None:
    make_inventory(tmp_path / "inventory", vms=1, disks=1, layout=TINY)
    vm_id = vm_id_for("vm01")
    with MassSimulator(tmp_path / "mass") as sim:
        sim.put_task({"task_id": "local-1", "platform": "local", "vm": {"id": vm_id},
                      "source": {"inventory": str(tmp_path / "inventory")},
                      "schedule": {"interval_s": 3600}})  # fmt: skip
        mass_fleet(fleet, sim)
        fleet.start_worker("period", ["period"], concurrency=1)
        fleet.start_worker("local", ["local"], concurrency=1)
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("local")
        assert exchange(events)["accepted"] == 1
        beat = sim.heartbeats[-1]
        assert beat["workers_online"].get("period", 0) >= 1, beat
        assert beat["workers_online"].get("local", 0) >= 1, beat
        assert beat["host_addresses"] and beat["version"]
        scan(events)
        assert run_of(events, vm_id)["status"] == "committed"
        assert exchange(events)["ok"]
        before = len(sim.reports)

        sim.stop()  # Mass is away for two syncs
        for _ in range(2):  # `hamal sync` knows the VMs of Mass' tasks
            synced = subprocess.run(
                [sys.executable, "-m", "hamal_workers.cli", "sync", "--vm", "vm01", "--wait"],
                env=fleet.env(), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert synced.returncode == 0, synced.stderr
            assert run_of(events, vm_id)["status"] == "committed"
            down = exchange(events)  # the second waits out the first's backoff
            assert not down["ok"] and ("error" in down or down.get("skipped")), down
        waiting = state.waiting_mass_reports(100)
        changes = [r for r in waiting if "progress" not in r]
        assert len(changes) == 4, waiting  # syncing, committed, twice (and maybe a progress)
        assert state.mass_tasks(), "the verified list stays"
        shown = subprocess.run(
            [sys.executable, "-m", "hamal_workers.cli", "status"],
            env={**fleet.env(), "COLUMNS": "300"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "Mass: UNREACHABLE since" in shown.stdout, shown.stdout[-2000:]
        assert f"protecting 1 verified tasks; {len(waiting)} status reports waiting" in shown.stdout
        scraped = {m.name: m.samples[0].value for m in HamalCollector(lambda: state).collect()}
        assert scraped["hamal_mass_up"] == 0 and scraped["hamal_mass_reports_waiting"] == len(
            waiting
        )

        sim.start()
        state.clear_mass_link("next_attempt")  # rather than wait out the backoff
        back = exchange(events)
        assert back["ok"] and back["delivered"] == len(waiting), back
        late = sim.reports[before:]
        states = [r["state"] for r in late if "progress" not in r]
        assert states == ["committed", "syncing", "committed", "syncing"], late
        assert [r["at"] for r in late] == sorted((r["at"] for r in late), reverse=True)
        assert sim.duplicate_reports == 0 and state.mass_reports_waiting() == 0
        scraped = {m.name: m.samples[0].value for m in HamalCollector(lambda: state).collect()}
        assert scraped["hamal_mass_up"] == 1 and scraped["hamal_mass_tasks"] == 1
        log = (fleet.root / "log" / "hamal-period.log").read_text()
        assert "unreachable since" in log and "answers again after" in log


def test_after_redis_is_lost_the_sweep_lists_the_sources_of_mass_tasks(
    fleet: LocalFleet, state: State, events: Any, fusion: Any, tmp_path: Path
) -> None:
    from hamal_workers.config import load
    from hamal_workers.mass_sources import task_settings
    from hamal_workers.platforms import open_platform
    from hamal_workers.platforms.base import new_run_id, snapshot_name

    fc_vm = fusion.add_vm("left-9", [8 * MiB])
    fusion.write(fc_vm, 0, 0, b"\x07" * MiB)
    source = fusion.connection(ca_cert=True)
    with MassSimulator(tmp_path / "mass") as sim:
        sim.put_task({"task_id": "fc-9", "platform": "fusion", "vm": {"id": fc_vm},
                      "source": source, "schedule": {"interval_s": 3600}})  # fmt: skip
        mass_fleet(fleet, sim)
        fleet.start_worker("period", ["period"], concurrency=1)
        fleet.start_worker("fusion", ["fusion"], concurrency=1)
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("fusion")
        exchange(events)
        scan(events)
        first = run_of(events, fc_vm)
        assert first["status"] == "committed"
        # A proxy that died after a snapshot, then lost Redis: only the source knows.
        settings = load(fleet.env()["HAMAL_CONF"], fleet.env())
        scoped = task_settings(settings, "fc-9", "fusion", source, [fc_vm])
        with open_platform("fusion", scoped) as platform:
            dead = platform.create_snapshot(platform.vm(fc_vm), snapshot_name(new_run_id()))
        state.r.flushall()
        assert exchange(events)["accepted"] == 1, "the list is taken and verified again"
        swept = scan(events)
        assert swept["swept"] == 1, swept
        names = fusion.snapshot_names(fc_vm)
        assert dead.snapshot_id not in names
        assert f"hamal-{first['run_id']}" in names, "the store's newest point keeps its base"
        if state.vm(fc_vm).get("active_run"):
            run_of(events, fc_vm)  # the scan asked for a sync (Redis forgot the last one)
