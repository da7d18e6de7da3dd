"""Finalize when the store refuses the point: the run fails at once, cleanly, not forever."""

from __future__ import annotations

from hamal_workers.localfleet import LocalFleet
from hamal_workers.state import DONE, FINALIZING, State
from tests.integration.planted import plant_run


def test_a_point_the_store_refuses_fails_the_run_and_frees_the_vm(
    fleet: LocalFleet, state: State, events
) -> None:
    # Every disk settled as done, but nothing was staged in the store: commit must refuse.
    vm, run_id, _ = plant_run(fleet, state)
    for disk in vm.disks:
        state.settle_disk(run_id, disk.name, {"state": DONE})
    state.set_run_fields(run_id, status=FINALIZING, dispatched="1")
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.wait_worker_ready("period")
    from hamal_workers.celery_app import app

    app.send_task("hamal.period.scan", queue="period")  # finds the run and sends finalize
    finished = events.wait(
        lambda e: e["event"] == "run" and e["run_id"] == run_id, 60, "the run to be failed"
    )
    assert finished["status"] == "failed"
    run = state.run(run_id)
    assert run["error"].startswith("commit refused:"), run
    assert "active_run" not in state.vm(vm.vm_id)
    assert state.live_snapshots() == {}
    assert not list((fleet.root / "lib" / "snapshots").rglob("*.raw"))
    vm_log = next((fleet.root / "log").glob("vm-vm01_Agent-*.log")).read_text()
    assert "failed, no restore point: commit refused" in vm_log
