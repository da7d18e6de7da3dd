"""Peak memory of a real `celery worker` syncing 4 disks at once: 1 GiB vs 32 GiB disks.

    .venv/bin/python bench/memory.py            (bench/engine.py runs it last, too)

A LocalFleet (its own redis-server on a free port, a `period` worker for the VM and
finalize tasks) syncs one VM of 4 sparse disks with the same allocated data, 256 MiB
per disk spread over the disk, once with 1 GiB disks and once with 32 GiB ones. Each
time a fresh `local` worker (concurrency 4, so the 4 disk tasks run at once) does the
disk tasks; every 50 ms its process tree (main process + prefork children) is read
from /proc: RSS and PSS from /proc/PID/smaps_rollup. PSS splits pages shared after fork
between the processes sharing them; the sum of RSS counts them once per process.
Target: under 300 MiB, and not growing with the disk size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.images import GiB, MiB, remove_tree  # noqa: E402
from hamal_workers.localfleet import LocalFleet  # noqa: E402
from hamal_workers.platforms.local import vm_id_for  # noqa: E402
from hamal_workers.simulators.local_vms import ImageLayout, make_image  # noqa: E402

DISK_SIZES = (1 * GiB, 32 * GiB)
DISKS = 4
ALLOCATED_PER_DISK = 256 * MiB  # half random, half compressible, in 4 MiB pieces
WORKER_CONCURRENCY = 4
SAMPLE_EVERY_S = 0.05
TARGET_MIB = 300
RUN_TIMEOUT_S = 600


# --- /proc ------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it, from each /proc/PID/stat's parent."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name may hold spaces and parentheses: parse after its last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class Usage:
    rss: int  # bytes, summed over the processes
    pss: int
    processes: int


def usage(pids: list[int]) -> Usage:
    rss = pss = counted = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
        rss += int(fields.get("Rss", "0 kB").split()[0]) * 1024
        pss += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        counted += 1
    return Usage(rss, pss, counted)


@dataclass
class Sampler:
    """Samples a process tree's memory in a thread until stopped; keeps the peaks."""

    root_pid: int
    peak_rss: int = 0
    peak_pss: int = 0
    most_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            now = usage(process_tree(self.root_pid))
            self.peak_rss = max(self.peak_rss, now.rss)
            self.peak_pss = max(self.peak_pss, now.pss)
            self.most_processes = max(self.most_processes, now.processes)
            self.samples += 1


# --- the runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    disk_size: int
    idle: Usage
    peak_rss: int
    peak_pss: int
    processes: int
    samples: int
    status: str
    seconds: float
    overlapped: bool  # the 4 disk tasks all ran at one time


def make_vm(inventory: Path, disk_size: int, seed: int) -> str:
    """A VM of DISKS sparse disks with the same allocated data whatever their size."""
    half = ALLOCATED_PER_DISK // 2
    layout = ImageLayout(disk_size, random_bytes=half, compressible_bytes=half, zero_bytes=0)
    name = f"vm-{disk_size // GiB}gib"
    for disk in range(DISKS):
        make_image(inventory / name / f"disk{disk}.raw", layout, seed=seed + disk)
    return name


def measure(fleet: LocalFleet, vm_name: str, disk_size: int) -> Measurement:
    """Sync the VM with a fresh `local` worker and sample that worker's memory meanwhile."""
    import redis

    from hamal_workers.celery_app import app
    from hamal_workers.state import key

    worker = fleet.start_worker("local", ["local"], concurrency=WORKER_CONCURRENCY)
    fleet.wait_worker_ready("local")
    time.sleep(1.0)  # let the prefork children finish starting
    idle = usage(process_tree(worker.popen.pid))
    pubsub = redis.Redis.from_url(fleet.redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key("events"))
    sampler = Sampler(worker.popen.pid)
    sampler.start()
    vm_id = vm_id_for(vm_name)
    started = time.monotonic()
    app.send_task("hamal.vm.sync", kwargs={"vm_id": vm_id, "platform": "local"}, queue="period")
    try:
        event = wait_for_run(pubsub, vm_id)
    finally:
        seconds = time.monotonic() - started
        sampler.stop()
        pubsub.close()
        fleet.stop("local")
    return Measurement(
        disk_size,
        idle,
        sampler.peak_rss,
        sampler.peak_pss,
        sampler.most_processes,
        sampler.samples,
        str(event.get("status", "timed out")),
        seconds,
        disks_overlapped(fleet, vm_id),
    )


def wait_for_run(pubsub: Any, vm_id: str) -> dict[str, Any]:
    """The {"event": "run"} the finalize task publishes for the VM, or {} on timeout."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=min(left, 1.0))
        if message is None:
            continue
        event = json.loads(message["data"])
        if event.get("event") == "run" and event.get("vm_id") == vm_id:
            return dict(event)
    return {}


def disks_overlapped(fleet: LocalFleet, vm_id: str) -> bool:
    """Whether every disk task was running at one instant, from the run's summary."""
    from hamal_workers.state import State

    history = State.from_url(fleet.redis_url).history(vm_id, 1)
    disks = history[0].get("disks", {}) if history else {}
    spans = [
        (float(d["started_at"]), float(d["started_at"]) + float(d["seconds"]))
        for d in disks.values()
        if d.get("started_at") and d.get("seconds")
    ]
    return len(spans) == DISKS and max(s for s, _ in spans) < min(e for _, e in spans)


def run(root: Path) -> list[Measurement]:
    """Build the VMs, run the fleet, measure each disk size, print the comparison."""
    remove_tree(root)
    inventory = root / "inventory"
    started = time.perf_counter()
    vms = {size: make_vm(inventory, size, seed=1000 * n) for n, size in enumerate(DISK_SIZES)}
    print(
        f"\nbench/memory.py — {DISKS} disks of one VM synced at once by one `celery worker "
        f"-Q local -c {WORKER_CONCURRENCY}`, {ALLOCATED_PER_DISK // MiB} MiB allocated per "
        f"disk (VMs built in {time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    fleet = LocalFleet(root / "fleet", {"HAMAL_LOCAL_INVENTORY": str(inventory)})
    try:
        fleet.start_redis()
        fleet.apply_env()
        fleet.start_worker("period", ["period"], concurrency=1)
        fleet.wait_worker_ready("period")
        results = [measure(fleet, vms[size], size) for size in DISK_SIZES]
    finally:
        fleet.stop_all()
    print_results(results)
    remove_tree(root)
    return results


def print_results(results: list[Measurement]) -> None:
    def mib(n: int) -> str:
        return f"{n / MiB:,.0f}"

    rows = [
        ("disk size", *(f"{m.disk_size // GiB} GiB" for m in results)),
        ("run status", *(m.status for m in results)),
        ("run seconds (send to finished)", *(f"{m.seconds:.1f}" for m in results)),
        ("4 disk tasks ran at once", *("yes" if m.overlapped else "NO" for m in results)),
        ("processes in the worker's tree", *(str(m.processes) for m in results)),
        ("samples (every 50 ms)", *(str(m.samples) for m in results)),
        ("idle sum of RSS, MiB", *(mib(m.idle.rss) for m in results)),
        ("idle sum of PSS, MiB", *(mib(m.idle.pss) for m in results)),
        ("peak sum of RSS, MiB", *(mib(m.peak_rss) for m in results)),
        ("peak sum of PSS, MiB", *(mib(m.peak_pss) for m in results)),
    ]
    width = max(len(r[0]) for r in rows)
    for label, *cells in rows:
        print(f"  {label.ljust(width)}  " + "  ".join(c.rjust(10) for c in cells))
    print_verdict(results)


def print_verdict(results: list[Measurement]) -> None:
    limit = TARGET_MIB * MiB
    for metric in ("pss", "rss"):
        peaks = [getattr(m, f"peak_{metric}") for m in results]
        under = all(p < limit for p in peaks)
        print(
            f"  {'PASS' if under else 'MISS'}  peak sum of {metric.upper()} under "
            f"{TARGET_MIB} MiB at every disk size (worst {max(peaks) / MiB:,.0f} MiB)"
        )
    pss = [m.peak_pss for m in results]
    growth = (pss[-1] - pss[0]) / MiB
    # Flat within 10%: peaks move a little from run to run (timing of the 50 ms samples).
    flat = pss[-1] <= pss[0] * 1.1
    print(
        f"  {'PASS' if flat else 'MISS'}  peak PSS does not grow with disk size: "
        f"{growth:+,.0f} MiB from {results[0].disk_size // GiB} to "
        f"{results[-1].disk_size // GiB} GiB disks"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench" / "memory"))
    run(Path(parser.parse_args().root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
