"""`make demo`: the whole fleet, for real, on the embedded default (local platform + chunk store).

redis-server, celery beat (RedBeat) and celery workers for the `period`, `local` and
`fusion` queues run as separate processes. Three sample VMs with two sparse 1 GiB disks
each, and one VM on the project's FusionCompute simulator (a VRM over HTTPS and a host's
backup socket on loopback, `--fusion-vms 0` to leave it out), are synced for four periods,
with guest writes between them, under a small retention policy (the last 2 points): older
points are deleted after each commit, and garbage collection frees their chunks. Then the
latest restore point of every disk is restored and compared byte for byte with its source.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hamal_workers.localfleet import FleetError, LocalFleet, free_port  # noqa: E402
from hamal_workers.platforms.local import ChangeJournal  # noqa: E402
from hamal_workers.simulators.fusion_compute import FusionComputeSimulator  # noqa: E402
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory, scribble  # noqa: E402

if TYPE_CHECKING:
    from hamal_workers.state import State

MiB = 1 << 20
# Piped (make, CI logs): wide enough that no figure is cut.
console = Console() if sys.stdout.isatty() else Console(width=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(REPO / ".demo"), help="working directory")
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--disks", type=int, default=2)
    parser.add_argument("--periods", type=int, default=4)
    parser.add_argument("--keep-last", type=int, default=2, help="[retention] keep_last")
    parser.add_argument("--interval", type=int, default=5, help="[period] interval, seconds")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per period at most")
    parser.add_argument("--fusion-vms", type=int, default=1, help="VMs on FusionCompute")
    parser.add_argument(
        "--mass", action="store_true",
        help="run under the simulated Mass: its signed tasks say what to protect; it is "
        "unreachable for one period",
    )  # fmt: skip
    args = parser.parse_args()

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    inventory = root / "inventory"
    console.print(
        f"[bold]Hamal demo[/] in {root}: {args.vms} VMs x {args.disks} disks, "
        f"{args.periods} periods of {args.interval} s"
    )
    images = make_inventory(inventory, args.vms, args.disks, ImageLayout())
    # vm01's "hypervisor" tracks changes (like VMware's CBT): its incrementals read only
    # what its guest wrote; the others read every allocated extent and compare hashes.
    for image in images:
        if image.parent.name == "vm01":
            ChangeJournal(image).reset()
    fusion = FusionDemo(root / "fusion", args.fusion_vms)
    mass = MassDemo(root / "mass", inventory, images, fusion, args.interval) if args.mass else None
    fleet = LocalFleet(
        root,
        {
            "HAMAL_LOCAL_INVENTORY": str(inventory),
            "HAMAL_PERIOD_INTERVAL": str(args.interval),
            "HAMAL_RETENTION_KEEP_LAST": str(args.keep_last),
            **fusion.env(),
            **(mass.env() if mass else {}),
        },
    )
    try:
        fleet.start_redis()
        fleet.apply_env()
        fleet.start_worker("period", ["period"], concurrency=2)
        fleet.start_worker("local", ["local"])
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("local")
        if fusion.vms:
            fleet.start_worker("fusion", ["fusion"])
            fleet.wait_worker_ready("fusion")
            console.print(
                f"FusionCompute simulator: VRM on {fusion.sim.start()}, {len(fusion.vms)} VM(s) "
                "of two disks; worker fusion"
            )
        fleet.start_beat()
        if mass is not None:
            mass.first_exchange()
        flower_port = free_port()
        credentials = root / "flower-credentials"
        credentials.write_text(f"hamal:{secrets.token_urlsafe(16)}\n")
        credentials.chmod(0o600)
        fleet.start_flower(flower_port, credentials.read_text().strip())
        console.print(
            f"fleet up: redis :{fleet.redis_port}, beat, workers period + local "
            f"(logs in {root / 'log'}); Flower on http://127.0.0.1:{flower_port} "
            f"(user:password in {credentials})"
        )
        return run_periods(fleet, images, fusion, args, mass)
    except FleetError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    finally:
        fleet.stop_all()
        fusion.sim.stop()
        if mass is not None:
            mass.sim.stop()
        console.print("every process the demo started is stopped")


class FusionDemo:
    """VMs on the project's FusionCompute simulator, run in this process (its own threads)."""

    def __init__(self, directory: Path, count: int) -> None:
        self.sim = FusionComputeSimulator(directory)
        self.vms: dict[str, str] = {}  # name -> uuid
        if count:
            self.sim.start()
        rng = random.Random(11)
        for n in range(1, count + 1):
            name = f"fc-vm{n:02d}"
            self.vms[name] = self.sim.add_vm(name, [512 * MiB, 256 * MiB])
            for index, size in enumerate((512 * MiB, 256 * MiB)):
                for _ in range(6):  # random and compressible pieces between holes
                    length = rng.randint(1, 8) * MiB
                    data = rng.randbytes(length) if rng.random() < 0.5 else bytes(length // 2) * 2
                    self.sim.write(self.vms[name], index, rng.randrange(0, size - length), data)

    def env(self) -> dict[str, str]:
        return self.sim.hamal_env() if self.vms else {}

    def scribble(self, rng: random.Random, writes: int) -> int:
        """The guests' writes, through the simulator (which marks the blocks for CBT)."""
        written = 0
        for vm in self.vms.values():
            for index, size in enumerate((512 * MiB, 256 * MiB)):
                for _ in range(writes):
                    length = rng.randint(512, MiB)
                    self.sim.write(
                        vm, index, rng.randrange(0, size - length), rng.randbytes(length)
                    )
                    written += length
        return written


class MassDemo:
    """The simulated Mass, in this process: one signed task per VM, the proxy in Mass mode."""

    def __init__(
        self, directory: Path, inventory: Path, images: list[Path], fusion: FusionDemo,
        interval: int,
    ) -> None:  # fmt: skip
        from hamal_workers.platforms.local import vm_id_for
        from hamal_workers.simulators.mass import MassSimulator

        self.sim = MassSimulator(directory)
        self.sim.start()
        for n, name in enumerate(sorted({p.parent.name for p in images}), start=1):
            self.sim.put_task({
                "task_id": f"local-{name}", "platform": "local",
                "vm": {"id": vm_id_for(name), "name": name},
                "source": {"inventory": str(inventory)}, "schedule": {"interval_s": interval},
                "ip_mapping": [{"source_ip": f"10.0.0.{n}", "target_ip": f"192.168.100.{n}"}],
            })  # fmt: skip
        for name, vm in fusion.vms.items():
            self.sim.put_task({
                "task_id": f"fusion-{name}", "platform": "fusion", "vm": {"id": vm, "name": name},
                "source": fusion.sim.connection(ca_cert=True),
                "schedule": {"interval_s": interval},
            })  # fmt: skip

    def env(self) -> dict[str, str]:
        # Only Mass says what to protect: no inventory, no VRM in hamal.conf.
        return {
            "HAMAL_LOCAL_INVENTORY": "",
            "HAMAL_FUSION_COMPUTE_VRM_HOST": "",
            "HAMAL_FUSION_COMPUTE_USER": "",
            "HAMAL_FUSION_COMPUTE_PASSWORD": "",
            **self.sim.hamal_env(),
            "HAMAL_SYNC_SAVE_LOCAL_SNAPSHOT_METADATA": "true",
        }

    def first_exchange(self) -> None:
        """At once rather than at the beat's first tick: register, heartbeat, take the tasks."""
        from hamal_workers.celery_app import app

        app.send_task("hamal.period.mass", queue="period")
        deadline = time.monotonic() + 60
        while not self.sim.reports and time.monotonic() < deadline:
            time.sleep(0.2)
        accepted = sum(1 for r in self.sim.reports if r["state"] == "accepted")
        console.print(
            f"Mass simulator on {self.sim.endpoint}: {len(self.sim.tasks())} signed tasks; the "
            f"proxy registered, sent a heartbeat and accepted {accepted}"
        )

    def summary(self) -> None:
        counts: dict[str, int] = {}
        for report in self.sim.reports:
            counts[report["state"]] = counts.get(report["state"], 0) + 1
        console.print(
            f"Mass received {len(self.sim.heartbeats)} heartbeats and {len(self.sim.reports)} "
            f"status reports ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
            f"{self.sim.duplicate_reports} duplicates"
        )


def run_periods(
    fleet: LocalFleet, images: list[Path], fusion: FusionDemo, args: argparse.Namespace,
    mass: MassDemo | None = None,
) -> int:  # fmt: skip
    from hamal_workers.celery_app import settings
    from hamal_workers.platforms.local import vm_id_for
    from hamal_workers.state import State
    from hamal_workers.targets import open_target
    from hamal_workers.targets.restore import restore_disk

    state = State.from_url(settings.redis.url)
    target = open_target(settings)
    vm_ids = {name: vm_id_for(name) for name in sorted({p.parent.name for p in images})}
    vm_ids.update(fusion.vms)
    vm_names = list(vm_ids)
    rng = random.Random(7)
    changed_since: dict[str, float] = dict.fromkeys(vm_names, 0.0)
    started = time.monotonic()
    for period in range(1, args.periods + 1):
        deadline = time.monotonic() + args.timeout
        for vm in vm_names:
            while True:
                points = target.points(vm_ids[vm])
                if points and points[-1].created > changed_since[vm]:
                    break
                failed = [h for h in state.history(vm_ids[vm], 5) if h.get("status") == "failed"]
                if failed:
                    raise FleetError(f"{vm}: sync failed: {failed[0].get('error')}")
                if time.monotonic() > deadline:
                    raise FleetError(f"{vm}: no restore point within {args.timeout:g} s")
                time.sleep(0.5)
        console.print(
            f"period {period}: every VM has a new restore point "
            f"({time.monotonic() - started:.0f} s)"
        )
        if mass is not None and period == 2 and period < args.periods:
            mass.sim.stop()
            console.print("  [bold]Mass is unreachable[/] for the next period: the proxy goes on "
                          "with the tasks it verified, and keeps its status reports")  # fmt: skip
        if mass is not None and period == 3:
            waiting = state.mass_reports_waiting()
            mass.sim.start()
            state.clear_mass_link("next_attempt")  # the next exchange now, not after backoff
            from hamal_workers.celery_app import app

            app.send_task("hamal.period.mass", queue="period")
            deadline = time.monotonic() + 60
            while state.mass_reports_waiting() and time.monotonic() < deadline:
                time.sleep(0.2)
            console.print(f"  Mass is back: the {waiting} status reports kept meanwhile are "
                          "delivered, newest first")  # fmt: skip
        if period < args.periods:
            written = 0
            for image in images:
                written += scribble(image, rng, writes=8)
            written += fusion.scribble(rng, writes=8)
            for vm in vm_names:
                changed_since[vm] = time.time()
            disks = len(images) + 2 * len(fusion.vms)
            console.print(f"  guests wrote {written / 2**20:.1f} MiB across {disks} disks")
    show_retention(state, vm_ids, args.keep_last)
    if mass is not None:
        mass.summary()
    wait_for_freed_space(state, args.timeout)
    console.print(f"garbage collection: the scan's passes freed {_freed(state)} so far")
    fleet.stop("beat")  # no new syncs while we restore
    deadline = time.monotonic() + args.timeout
    while state.active_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    console.print("[bold]hamal gc[/], twice (what the scan's next two passes would do):")
    for _ in range(2):
        gc_pass = subprocess.run(
            [sys.executable, "-m", "hamal_workers.cli", "gc"], capture_output=True, text=True
        )
        print("  " + (gc_pass.stdout.strip() or gc_pass.stderr.strip()), flush=True)
    console.print(f"garbage collection freed {_freed(state)} in all")

    table = Table(title="Restore of the latest point of every disk")
    columns = ("VM", "disk", "kept", "incr. by", "bytes read", "stored", "seconds", "verified")
    for col in columns:
        table.add_column(col, justify="left" if col in ("VM", "disk", "incr. by") else "right")
    restore_dir = fleet.root / "restore"
    restore_dir.mkdir()
    all_ok = True
    sources: list[tuple[str, str, str, Callable[[], bytes]]] = [
        (image.parent.name, vm_ids[image.parent.name], image.name, image.read_bytes)
        for image in images
    ]
    for name, vm in fusion.vms.items():
        for index in (0, 1):
            sources.append((name, vm, f"disk{index + 1}", partial(fusion.sim.content, vm, index)))
    for vm, vm_id, disk, content in sources:
        points = target.points(vm_id)
        runs = [h for h in state.history(vm_id, 100) if h.get("status") == "committed"]
        stats = [h["disks"].get(disk, {}) for h in runs]
        read = sum(int(s.get("bytes_read") or 0) for s in stats)
        stored = sum(int(s.get("bytes_stored") or 0) for s in stats)
        seconds = sum(float(s.get("seconds") or 0) for s in stats)
        out = restore_dir / f"{vm}-{disk}"
        restore_disk(target, vm_id, points[-1].point_id, disk, str(out))
        same = out.read_bytes() == content()
        all_ok &= same
        # After the first (full) sync: read what changed, or every allocated extent?
        modes = {st.get("mode") for st in stats[:-1]}
        plans = {"changed": "changes", "allocated": "hashes"}.get(
            modes.pop() if len(modes) == 1 else "", "mixed"
        )
        table.add_row(
            vm,
            disk,
            str(len(points)),
            plans,
            f"{read:,}",
            f"{stored:,}",
            f"{seconds:.2f}",
            "[green]yes[/]" if same else "[red]NO[/]",
        )
        out.unlink()
    console.print(table)
    leftovers = list((fleet.root / "lib" / "snapshots").rglob("*.raw"))
    # FusionCompute keeps each VM's newest snapshot as the next sync's base (getcbt answers
    # between two snapshots of one chain); anything more is left behind.
    for name, vm in fusion.vms.items():
        names = fusion.sim.snapshot_names(vm)
        newest = f"hamal-{target.points(vm)[-1].point_id}"
        leftovers += [f"{name}: {n}" for n in names if n != newest]
    leftovers += [str(r) for r in fusion.sim.backup_resources(live_only=True)]
    if leftovers:
        console.print(f"[red]snapshots left behind:[/] {leftovers}")
        all_ok = False
    else:
        kept = " (FusionCompute keeps each VM's newest as the next base)" if fusion.vms else ""
        console.print(f"no snapshot or backup resource left behind on the source{kept}")
    console.print(
        "[bold green]every restore matched its source[/]"
        if all_ok
        else "[bold red]some restores did not match[/]"
    )
    return 0 if all_ok else 1


def show_retention(state: State, vm_ids: dict[str, str], keep_last: int) -> None:
    """What retention did after each commit, and `hamal points` for one VM."""
    vm_names = list(vm_ids)
    deleted = {
        vm: [
            gone
            for h in state.history(vm_ids[vm], 100)
            for gone in (h.get("retention") or {}).get("deleted", [])
        ]
        for vm in vm_names
    }
    total = sum(len(ids) for ids in deleted.values())
    console.print(
        f"retention (keep_last = {keep_last}) deleted {total} restore points after commits: "
        + ", ".join(f"{vm} {len(ids)}" for vm, ids in deleted.items())
    )
    console.print(f"[bold]hamal points --vm {vm_names[0]}[/]")
    shown = subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", "points", "--vm", vm_names[0]],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
    )
    print(shown.stdout.rstrip() or shown.stderr.rstrip(), flush=True)


def _freed(state: State) -> str:
    passes = state.gc_history()
    freed = sum(int(p.get("bytes_freed") or 0) for p in passes)
    dropped = sum(int(p.get("dropped") or 0) for p in passes)
    return f"{freed / 2**20:.1f} MiB ({dropped} chunks only expired points used)"


def wait_for_freed_space(state: State, timeout: float) -> dict[str, object]:
    """The first garbage collection pass (the scan sends them) that frees a chunk."""
    from hamal_workers.state import key

    pubsub = state.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key("events"))  # before looking, so no pass goes unseen
    deadline = time.monotonic() + timeout
    try:
        last = state.last_gc()
        if int(last.get("dropped") or 0):
            return dict(last)
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            event = json.loads(message["data"])
            if event.get("event") == "gc" and int(event.get("dropped") or 0):
                return dict(event)
    finally:
        pubsub.close()
    raise FleetError(f"no garbage collection pass freed anything within {timeout:g} s")


if __name__ == "__main__":
    sys.exit(main())
