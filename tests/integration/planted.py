"""A run in the state vm.sync leaves after planning, built with the calls vm.sync makes.

For tests of what the scan and finalize repair when a task died at a given step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.base import VmRef
from hamal_workers.platforms.local import LocalPlatform
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import SYNCING, State

MiB = 1024 * 1024
SMALL = ImageLayout(
    size=16 * MiB, random_bytes=4 * MiB, compressible_bytes=0, zero_bytes=0, piece=MiB
)


def plant_run(fleet: LocalFleet, state: State) -> tuple[VmRef, str, list[Path]]:
    """One VM with two disks, snapshotted and planned, its disk tasks never sent."""
    # Imported here: the task modules read the fleet's config, set up by the fixtures.
    from hamal_workers.tasks.vm_sync import new_run_id

    images = make_inventory(fleet.root / "inventory", vms=1, disks=2, layout=SMALL)
    platform = LocalPlatform(str(fleet.root / "inventory"), str(fleet.root / "lib"))
    (vm,) = platform.discover()
    run_id = new_run_id()
    assert state.claim_vm_run(vm.vm_id, run_id)
    state.record_vm(vm.vm_id, vm.name, "local")
    state.create_run(
        run_id,
        {
            "vm_id": vm.vm_id,
            "vm_name": vm.name,
            "platform": "local",
            "point_id": run_id,
            "started": str(time.time()),
        },
    )
    snapshot = platform.create_snapshot(vm, f"hamal-{run_id}")
    state.snapshot_created(snapshot.key, {**snapshot.to_json(), "run_id": run_id})
    state.plan_disks(run_id, {d.name: {"base_point": ""} for d in vm.disks})
    state.set_run_fields(run_id, snapshot=json.dumps(snapshot.to_json()), status=SYNCING)
    return vm, run_id, images
