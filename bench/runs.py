"""`hamal` commands timed on a running fleet, and where their time went, read back from the
run and disk records: what every platform's bench measures the same way."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.peers import PeerError, Ran, run_timed
from hamal_workers.localfleet import LocalFleet
from hamal_workers.state import State


def hamal(fleet: LocalFleet, *args: str) -> Ran:
    """The venv's `hamal` with the fleet's environment, timed."""
    return run_timed([str(Path(sys.executable).parent / "hamal"), *args], env=fleet.env())


def seconds_of(ran: Ran) -> float:
    return ran.seconds


def to_null(cmd: list[str]) -> float:
    """Run a command whose output goes to /dev/null, as `... > /dev/null` would; seconds."""
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise PeerError(f"{' '.join(cmd[:3])} exited {done.returncode}: {done.stderr[-500:]!r}")
    return time.perf_counter() - started


def last_disk(fleet: LocalFleet, vm_id: str) -> tuple[str, str, dict[str, str]]:
    """(run id, disk, the disk's record) of the VM's last point, a one-disk VM's."""
    state = State.from_url(fleet.redis_url)
    run_id = state.vm(vm_id).get("last_point", "")
    (disk,) = state.run_disks(run_id)
    return run_id, disk, state.disk(run_id, disk).fields


def phases(fleet: LocalFleet, vm_id: str, ran: Ran) -> dict[str, float]:
    """Where a `hamal sync --wait` of a one-disk VM spent its time, from the records."""
    state = State.from_url(fleet.redis_url)
    run_id, disk, _ = last_disk(fleet, vm_id)
    run = state.run(run_id)
    d = state.disk(run_id, disk)
    started, finished = float(run["started"]), float(run["finished"])
    engine_end = d.number("started_at") + d.number("seconds")
    return {
        "until_run": started - ran.started_at,
        "snapshot": d.number("dispatched_at") - started,
        "until_disk_task": d.number("started_at") - d.number("dispatched_at"),
        "engine": d.number("seconds"),
        "until_finished": finished - engine_end,
        "until_cli_exit": ran.ended_at - finished,
    }
