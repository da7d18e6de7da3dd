"""The proxy and the Mass management service (docs/mass-api.yaml), against the project's Mass
simulator over HTTPS, with a real Redis: registration, heartbeat, the signed task list and
its refusals, status reports through an outage, and where a task's credentials go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hamal_workers.config import Settings, load
from hamal_workers.localfleet import REFERENCE_CONF
from hamal_workers.mass import MassLink, SourceKey, TaskView
from hamal_workers.simulators.mass import MassSimulator
from hamal_workers.state import State

pytestmark = pytest.mark.timeout(120)
CANARY = "c4nary-vcenter-pw/7"


@pytest.fixture
def mass(tmp_path: Path) -> Any:
    with MassSimulator(tmp_path / "mass") as sim:
        yield sim


def mass_settings(sim: MassSimulator, tmp_path: Path, redis_port: int, **extra: str) -> Settings:
    env = {
        "HAMAL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        **sim.hamal_env(),
        "HAMAL_DEFAULT_LOG_DIR": str(tmp_path / "log"),
        "HAMAL_DEFAULT_HAMAL_LIB_DIR": str(tmp_path / "lib"),
        **extra,
    }
    (tmp_path / "log").mkdir(exist_ok=True)
    return load(str(REFERENCE_CONF), env)


def task(task_id: str, vm: str, **extra: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "platform": "vmware",
        "source": {"host": "vcenter.example", "user": "backup", "password": CANARY},
        "vm": {"id": vm, "name": f"name-{vm}"},
        "schedule": {"interval_s": 3600},
        "ip_mapping": [
            {"mac": "00:50:56:aa:bb:01", "source_ip": "10.0.0.5", "target_ip": "192.168.50.5"}
        ],  # fmt: skip
        **extra,
    }


def test_register_heartbeat_and_the_task_list(
    mass: MassSimulator, tmp_path: Path, redis_port: int, st: State
) -> None:
    mass.put_task(task("t1", "vm-1"))
    mass.put_task(task("t2", "vm-2"))
    settings = mass_settings(mass, tmp_path, redis_port)
    summary = MassLink(settings, st).exchange()
    assert summary["ok"] and summary["accepted"] == 2 and summary["refused"] == 0, summary
    (registration,) = mass.registrations
    assert "vmware" in registration["platforms"] and registration["host_addresses"]
    (beat,) = mass.heartbeats
    assert beat["exporter_id"] == "exporter-1" and beat["syncs_running"] == 0
    assert beat["tasks_known"] == 0 and "public_addresses" not in beat
    assert sorted(r["state"] for r in mass.reports) == ["accepted", "accepted"]
    views = st.mass_tasks()
    assert sorted(views) == ["t1", "t2"]
    assert TaskView.from_json(views["t1"]).vm_id == "vm-1"

    # The credentials: sealed in Redis, opened with the proxy's own key, nowhere in clear.
    for name in st.r.scan_iter():
        kind = st.r.type(name).decode()
        values = (
            st.r.hvals(name) if kind == "hash" else [st.r.get(name)] if kind == "string" else []
        )
        assert not any(CANARY.encode() in (v or b"") for v in values), name
    source = SourceKey(settings.default.hamal_lib_dir).open("t1", 1, st.mass_source("t1") or b"")
    assert source["password"] == CANARY
    key_file = Path(settings.default.hamal_lib_dir) / "mass" / "sources.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    backup = json.loads((tmp_path / "log" / "ip_mapping.backup").read_text())
    assert backup["tasks"]["t1"] == [{"mac": "00:50:56:aa:bb:01", "source_ip": "10.0.0.5",
                                      "target_ip": "192.168.50.5"}]  # fmt: skip

    # Nothing changed: nothing reported again; a task removed in Mass is reported removed.
    assert MassLink(settings, st).exchange()["accepted"] == 0
    mass.remove_task("t2")
    summary = MassLink(settings, st).exchange()
    assert summary["removed"] == 1 and sorted(st.mass_tasks()) == ["t1"]
    assert [r["state"] for r in mass.reports][-1] == "removed"
    assert mass.heartbeats[-1]["tasks_known"] == 2
    mass.forget_exporters()  # Mass lost its state: the proxy registers again
    assert MassLink(settings, st).exchange()["ok"]
    assert len(mass.registrations) == 2


def test_unsigned_wrongly_signed_foreign_and_replayed_tasks_are_refused(
    mass: MassSimulator, tmp_path: Path, redis_port: int, st: State, caplog: Any
) -> None:
    settings = mass_settings(mass, tmp_path, redis_port)
    mass.put_task(task("t1", "vm-1"))
    mass.put_task(task("t1", "vm-1", schedule={"interval_s": 7200}))  # version 2
    assert MassLink(settings, st).exchange()["accepted"] == 1
    assert st.mass_versions() == {"t1": 2}

    unsigned = dict(mass.envelope({**task("t3", "vm-3"), "version": 1,
                                   "exporter_id": "exporter-1"}))  # fmt: skip
    del unsigned["signature"]
    forged = mass.envelope({**task("t4", "vm-4"), "version": 1, "exporter_id": "exporter-1"},
                           key=Ed25519PrivateKey.generate())  # fmt: skip
    foreign = mass.envelope({**task("t5", "vm-5"), "version": 1, "exporter_id": "exporter-2"})
    replay = mass.old_envelope("t1", 1)
    for envelope in (unsigned, forged, foreign, replay):
        mass.serve_extra(envelope)
    summary = MassLink(settings, st).exchange()
    assert summary["refused"] == 4 and summary["accepted"] == 0, summary
    reasons = {r["task_id"]: r["error"] for r in mass.reports if r["state"] == "refused"}
    assert reasons["t3"] == "unsigned"
    assert reasons["t4"].startswith("wrongly signed")
    assert reasons["t5"] == "meant for exporter 'exporter-2'"
    assert reasons["t1"] == "replayed: version 1, version 2 already accepted"
    assert TaskView.from_json(st.mass_tasks()["t1"]).interval_s == 7200, (
        "the replay changed nothing"
    )
    assert sorted(st.mass_tasks()) == ["t1"]
    assert CANARY not in caplog.text and "refused: unsigned" in caplog.text
    # Reported once: the same documents next time are not reported again.
    reports = len(mass.reports)
    assert MassLink(settings, st).exchange()["refused"] == 4
    assert len(mass.reports) == reports

    # Redis flushed: the replay is still refused (the lib dir keeps the versions too).
    st.r.flushall()
    mass.clear_extra()
    mass.remove_task("t1")
    mass.serve_extra(replay)  # the old document alone
    summary = MassLink(settings, st).exchange()
    assert summary["refused"] == 1 and st.mass_tasks() == {}, summary
    # And a list holding a task twice: the newer is taken whatever the order.
    Path(settings.default.hamal_lib_dir, "mass", "versions.json").unlink()
    st.r.flushall()
    mass.serve_extra(mass.old_envelope("t1", 2))
    summary = MassLink(settings, st).exchange()
    assert summary["refused"] == 1 and TaskView.from_json(st.mass_tasks()["t1"]).version == 2
    assert "replayed: version 1, version 2 listed" in caplog.text


def test_a_wrong_auth_key_is_a_clear_error(
    mass: MassSimulator, tmp_path: Path, redis_port: int, st: State, caplog: Any
) -> None:
    settings = mass_settings(mass, tmp_path, redis_port, HAMAL_MASS_AUTH_KEY="not-the-key")
    summary = MassLink(settings, st).exchange()
    assert not summary["ok"]
    assert "refused the auth key: check [mass] auth_key" in summary["error"]
    assert "not-the-key" not in caplog.text


def test_an_outage_keeps_the_list_and_delivers_the_backlog_newest_first_once(
    mass: MassSimulator, tmp_path: Path, redis_port: int, st: State, caplog: Any
) -> None:
    from hamal_workers.mass import status_report

    settings = mass_settings(mass, tmp_path, redis_port)
    mass.put_task(task("t1", "vm-1"))
    assert MassLink(settings, st).exchange()["accepted"] == 1
    mass.stop()
    link = MassLink(settings, st)
    view = TaskView.from_json(st.mass_tasks()["t1"])
    for n in range(3):  # state changes while Mass is away, and progress reports
        st.queue_mass_report(status_report(view, "t1", "syncing", run_id=f"r{n}"))
        st.queue_mass_report(status_report(view, "t1", "syncing", progress={"disk0": {"done": n}}),
                             progress=True)  # fmt: skip
        summary = link.exchange(now=1e10 + n * 1000)  # past every backoff
        assert not summary["ok"] and summary["waiting"] == n + 2, summary  # progress: one
    assert (
        "unreachable since" in caplog.text
        and "protecting with the last verified task list (1" in caplog.text
    )
    assert sorted(st.mass_tasks()) == ["t1"], "the last verified list stays"
    assert link.exchange(now=1e10 + 2001)["skipped"], "the next try waits its backoff"

    mass.start()
    before = len(mass.reports)
    summary = link.exchange(now=1e10 + 10**6)
    assert summary["ok"] and summary["delivered"] == 4, summary
    late = mass.reports[before:]
    assert [r.get("run_id") for r in late if "run_id" in r] == ["r2", "r1", "r0"], "newest first"
    assert [r["progress"] for r in late if "progress" in r] == [{"disk0": {"done": 2}}]
    assert mass.duplicate_reports == 0 and st.mass_reports_waiting() == 0
    assert "answers again after" in caplog.text


def test_progress_is_reported_at_most_every_task_update_wait_time_and_coalesced(
    st: State,
) -> None:
    from hamal_workers.state import Writes, key

    st.set_vm_fields("vm-1", mass_task="t1")
    writes = Writes()
    st.start_run(writes, "vm-1", "r1", {"vm_id": "vm-1"})
    st.plan_disks(writes, "r1", ["disk0", "disk1"])
    st.apply(writes)
    st.r.hset(key("run", "r1", "disk", "disk0"), mapping={"done_bytes": 10, "total_bytes": 100})
    assert st.mass_progress("vm-1", "r1", every_s=0.3)
    assert not st.mass_progress("vm-1", "r1", every_s=0.3), "too soon: not reported"
    while st.r.exists(key("mass", "progress-sent", "t1")):  # the gate's own expiry
        pass
    st.r.hset(key("run", "r1", "disk", "disk0"), mapping={"done_bytes": 60})
    assert st.mass_progress("vm-1", "r1", every_s=0.3)
    waiting = st.waiting_mass_reports(10)
    progress = [r for r in waiting if "progress" in r]
    assert len(progress) == 1, "a newer progress report replaces the one still waiting"
    assert progress[0]["progress"] == {"disk0": {"done": 60, "total": 100},
                                       "disk1": {"done": 0, "total": 0}}  # fmt: skip
    assert [r["state"] for r in waiting if "progress" not in r] == ["syncing"]  # the start
    assert not st.mass_progress("vm-2", "r1", every_s=0.3), "a VM of no task: nothing"


def test_public_addresses_are_in_the_heartbeat_when_enabled(
    mass: MassSimulator, tmp_path: Path, redis_port: int, st: State
) -> None:
    import ipaddress

    settings = mass_settings(mass, tmp_path, redis_port, HAMAL_MASS_ENABLE_GET_PUBLIC_IPS="true")
    assert MassLink(settings, st).exchange()["ok"]
    (beat,) = mass.heartbeats
    assert isinstance(beat["public_addresses"], list)
    assert all(ipaddress.ip_address(a).is_global for a in beat["public_addresses"])
    assert set(beat["public_addresses"]) <= set(beat["host_addresses"])


def test_a_call_mass_does_not_answer_times_out_at_default_request_timeout(
    mass: MassSimulator, tmp_path: Path, redis_port: int, st: State
) -> None:
    settings = mass_settings(mass, tmp_path, redis_port, HAMAL_MASS_DEFAULT_REQUEST_TIMEOUT="1")
    mass.hang()
    try:
        summary = MassLink(settings, st).exchange()
    finally:
        mass.clear_faults()
    assert not summary["ok"] and "timed out" in summary["error"], summary
    assert st.mass_link()["unreachable_since"]
