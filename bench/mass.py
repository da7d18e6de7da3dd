"""Mass at a proxy's scale: one exchange with 1,000 signed tasks, and what a scan then costs.

    .venv/bin/python bench/mass.py [--tasks 1000] [--rounds 3]

The project's Mass simulator (in this process, over HTTPS on loopback) serves --tasks
tasks, each a local VM with a source holding a password; a real redis-server (LocalFleet)
holds the proxy's state. Timed, medians of --rounds, each round from an empty Redis:

  first exchange      register, heartbeat, list, verify every signature, seal every
                      source, write the list, deliver the "accepted" reports
  unchanged exchange  the same list again: verify, nothing to write, nothing to report
  unseal every source what the scan does before it discovers (one AES-GCM open each)

No peer does this; the figures are for the exchange period (15 s) and the scan interval.
A benchmark, not a test: it asserts nothing and exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hamal_workers.config import load  # noqa: E402
from hamal_workers.localfleet import REFERENCE_CONF, LocalFleet, free_port  # noqa: E402
from hamal_workers.mass import MassLink, TaskView  # noqa: E402
from hamal_workers.mass_sources import task_source  # noqa: E402
from hamal_workers.simulators.mass import MassSimulator  # noqa: E402
from hamal_workers.state import State  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root) / "mass-bench"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fleet = LocalFleet(root / "fleet")
    fleet.redis_port = free_port()
    times: dict[str, list[float]] = {"first": [], "unchanged": [], "unseal": []}
    try:
        fleet.start_redis()
        with MassSimulator(root / "mass") as sim:
            made = time.perf_counter()
            for n in range(args.tasks):
                sim.put_task({
                    "task_id": f"t{n:05d}", "platform": "local", "vm": {"id": f"vm-{n}"},
                    "source": {"inventory": f"/srv/vms/{n}", "password-note": "x" * 16},
                    "schedule": {"interval_s": 3600},
                    "ip_mapping": [{"source_ip": "10.0.0.1", "target_ip": "10.1.0.1"}],
                })  # fmt: skip
            print(f"{args.tasks} tasks put and signed by the simulator in "
                  f"{time.perf_counter() - made:.2f} s")  # fmt: skip
            env = {
                "HAMAL_REDIS_URL": fleet.redis_url,
                **sim.hamal_env(),
                "HAMAL_DEFAULT_LOG_DIR": str(root / "log"),
                "HAMAL_DEFAULT_HAMAL_LIB_DIR": str(root / "lib"),
            }
            (root / "log").mkdir(exist_ok=True)
            settings = load(str(REFERENCE_CONF), env)
            state = State(redis.Redis.from_url(fleet.redis_url))
            for n in range(args.rounds):
                state.r.flushall()
                shutil.rmtree(root / "lib" / "mass", ignore_errors=True)
                link = MassLink(settings, state)
                started = time.perf_counter()
                first = link.exchange()
                times["first"].append(time.perf_counter() - started)
                started = time.perf_counter()
                again = link.exchange()
                times["unchanged"].append(time.perf_counter() - started)
                started = time.perf_counter()
                for raw in state.mass_tasks().values():
                    task_source(settings, state, TaskView.from_json(raw))
                times["unseal"].append(time.perf_counter() - started)
                print(f"round {n + 1}: first {times['first'][-1]:.2f} s (accepted "
                      f"{first['accepted']}, delivered {first['delivered']}), unchanged "
                      f"{times['unchanged'][-1]:.2f} s (accepted {again['accepted']}), unseal "
                      f"{times['unseal'][-1]:.3f} s")  # fmt: skip
    finally:
        fleet.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nmedians of {args.rounds} rounds, {args.tasks} tasks:")
    for name, label in (("first", "first exchange (verify, seal, store, report each)"),
                        ("unchanged", "unchanged exchange (verify each)"),
                        ("unseal", "unseal every source (the scan's start)")):  # fmt: skip
        print(f"  {label:<52} {statistics.median(times[name]):7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
