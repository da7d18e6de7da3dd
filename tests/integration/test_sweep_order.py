"""The sweep never deletes a live base snapshot, whatever commits while it reads.

The local platform keeps its base snapshot here ([local] keep_base_snapshot, the way Ceph
must). A run is left with every disk settled and its finalize not sent (the crash point
`after-last-disk`); the sweep then runs in this process against the fleet's Redis, store
and platform, and between two of its reads the fleet's worker finalizes that run —
the new point's snapshot becomes the base and the old one is dropped. After the sweep
the new base must still exist, at every interleaving: by the order of the reads alone
(reading the bases before the active runs fails at "active"), and with the store's
record of the newest point as a second defence.
"""

from __future__ import annotations

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import LocalPlatform, vm_id_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from hamal_workers.state import State
from hamal_workers.targets.chunkstore import ChunkStore

MiB = 1024 * 1024
LAYOUT = ImageLayout(
    size=16 * MiB, random_bytes=4 * MiB, compressible_bytes=0, zero_bytes=0, piece=MiB
)


@pytest.mark.parametrize("store_bases", [False, True], ids=["read-order-alone", "with-store"])
@pytest.mark.parametrize("step", ["records", "leftovers", "active"])
def test_a_finalize_between_two_reads_never_loses_the_new_base(
    fleet: LocalFleet, state: State, events, step: str, store_bases: bool
) -> None:
    make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=LAYOUT)
    marker = fleet.root / "fired"
    fleet.overrides = {
        **fleet.overrides,
        "HAMAL_LOCAL_KEEP_BASE_SNAPSHOT": "true",
        "HAMAL_WORKER_LEASE_TIMEOUT": "3",
        "HAMAL_REDIS_SOCKET_TIMEOUT": "0.5",
    }
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    # Imported here: the task modules read the fleet's config, set up by the fixtures.
    from hamal_workers.celery_app import app
    from hamal_workers.tasks.scan import Sweep, sweep_snapshots

    vm_id = vm_id_for("vm01")

    def sync() -> str:
        app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"})
        return events.wait(lambda e: e["event"] == "run-started", 60, "a run")["run_id"]

    first = sync()
    events.wait(lambda e: e["event"] == "run" and e["run_id"] == first, 60, "the first point")
    platform = LocalPlatform(
        str(fleet.root / "inventory"), str(fleet.root / "lib"), keep_base_snapshot=True
    )
    assert [s.run_id for s in platform.leftover_snapshots()] == [first]  # the base is kept

    # The next run: every disk settled, finalize never sent (its sender died).
    fleet.stop("local")
    fleet.overrides["HAMAL_FAULTS"] = f"after-last-disk@{marker}"
    fleet.start_worker("local-2", ["local"], concurrency=1)
    fleet.wait_worker_ready("local-2")
    second = sync()
    # Its task dies right after it settles the disk, before it could send the finalize.
    events.wait(lambda e: e["event"] == "disk" and e["run_id"] == second, 60, "its disk")

    def finalize_meanwhile(at: str) -> None:
        if at != step:
            return
        app.send_task("hamal.vm.finalize", kwargs={"run_id": second})
        end = events.wait(
            lambda e: e["event"] == "run" and e["run_id"] == second, 60, "the finalize"
        )
        assert end["status"] == "committed"

    sweep = Sweep(
        state,
        ChunkStore(fleet.root / "store", create=False),
        ["local"],
        lambda name, vm_id="": platform,
        store_bases=store_bases,
    )
    swept = sweep_snapshots(sweep, between=finalize_meanwhile)
    left = [s.run_id for s in platform.leftover_snapshots()]
    assert left == [second], (swept, left)  # the new base lives; the old one was dropped
    assert state.vm(vm_id)["base_snapshot"] and second in state.vm(vm_id)["base_snapshot"]
