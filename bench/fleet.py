"""The user's view: `hamal sync --wait` and `hamal restore` on a running fleet, against benji.

    .venv/bin/python bench/fleet.py [--rounds 3]      (also: make bench)

A LocalFleet runs its own redis-server; each round empties it and starts a `period` and
a `local` worker (no beat, so nothing syncs unless asked) with one VM in the local
platform's inventory whose only disk is the 2 GiB mixed image of bench/images.py, and a
new chunk store, everything on one filesystem under .bench/. It times, as a user would
type them:

  hamal sync --vm V --wait           full sync, then incremental after the 1% change
  hamal restore --vm V --disk D --point latest --to FILE
  benji backup                       full; incremental with hints; without hints
  benji restore --sparse             of the same (changed) image

and checks each restore byte for byte against the source. Medians of --rounds rounds,
each from an empty Redis, new workers, chunk store and benji repository. Prints the
table, the issue's targets (PASS/MISS) and where Hamal's end-to-end time goes, read from
the run and disk records the fleet keeps in Redis. A benchmark, not a test: it exits 0
on a MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report  # noqa: E402
from bench.peers import Benji, PeerError, Ran, prepare_benji, run_timed  # noqa: E402
from hamal_workers.engine.extents import Extent  # noqa: E402
from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.platforms.local import vm_id_for  # noqa: E402
from hamal_workers.state import State  # noqa: E402
from hamal_workers.targets.base import CHUNK_SIZE  # noqa: E402

IMAGE_SEED = 20240601  # the same bytes bench/engine.py measures
CHANGE_SEED = 7
CHANGED_FRACTION = 0.01
VM = "vm-bench"
DISK = "disk0.raw"
FULL_TARGET = 2.0  # benji's full backup time / Hamal's full sync time, end to end
RESTORE_TARGET = 1.5  # benji's restore time / Hamal's restore time
# No beat runs, and the scan's interval is long: only the bench's commands start syncs.
FLEET_ENV = {"HAMAL_PERIOD_INTERVAL": "3600"}
_RESTORE_SECONDS = re.compile(r" in ([0-9.]+)s ")


class Results(report.Rows):
    """Every measured operation, in the order the table prints them."""

    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.hamal_full = row("Hamal", "sync --wait, full")
        self.benji_full = row("benji", "backup, full")
        self.hamal_incremental = row("Hamal", "sync --wait, incremental")
        self.benji_unhinted = row("benji", "backup, incremental, no hints")
        self.benji_hinted = row("benji", "backup, incremental, hints", rate=False)
        self.hamal_restore = row("Hamal", "restore --point latest")
        self.benji_restore = row("benji", "restore --sparse")
        self.benji_restore_synced = row("benji", "restore --sparse, then sync")
        self.hamal_startup = row("Hamal", "CLI start-up (--version)", rate=False)
        self.benji_startup = row("benji", "start-up alone (ls)", rate=False)
        self.full_phases: list[SyncPhases] = []
        self.incremental_phases: list[SyncPhases] = []
        self.restore_inner: list[float] = []  # restore_disk's own seconds, as the CLI prints
        self.sync_details: list[str] = []


# --- where a sync's time goes -----------------------------------------------------------


@dataclass(frozen=True)
class SyncPhases:
    """One `hamal sync --wait`, cut at the instants the fleet records in Redis."""

    until_run: float  # CLI start-up, VM lookup, send; the period worker takes the task
    until_snapshot: float  # vm.sync: VM lease, run record
    snapshot: float  # the local platform's copy of the disk, under its exclusive flock
    until_disk_task: float  # plan recorded, disk task sent, taken by the local worker
    engine: float  # the disk's `seconds`: read, hash, compress, store, checkpoints
    until_finished: float  # the disk task's plan and stage, then finalize: commit, drop snapshot
    until_cli_exit: float  # the CLI notices the finished run (it polls) and exits


PHASE_LABELS = {
    "until_run": "CLI launch -> run `started` (CLI start-up, VM lookup, send, pickup)",
    "until_snapshot": "run `started` -> snapshot `created` (VM lease, run record)",
    "snapshot": "snapshot `created` -> disk `dispatched_at` (copy of the disk)",
    "until_disk_task": "disk `dispatched_at` -> `started_at` (queue, local worker)",
    "engine": "disk `seconds` (engine: read, hash, compress, store)",
    "until_finished": "the rest -> run `finished` (disk plan and stage, finalize)",
    "until_cli_exit": "run `finished` -> CLI exit (its 0.5 s poll)",
}


def sync_phases(state: State, run_id: str, ran: Ran) -> SyncPhases:
    """The phases of one run, from its Redis records and the CLI's start and end."""
    run = state.run(run_id)
    disk = state.disk(run_id, DISK)
    started = float(run["started"])
    snapshot_created = float(json.loads(run["snapshot"])["created"])
    dispatched = disk.number("dispatched_at")
    disk_started = disk.number("started_at")
    engine_end = disk_started + disk.number("seconds")
    finished = float(run["finished"])
    return SyncPhases(
        until_run=started - ran.started_at,
        until_snapshot=snapshot_created - started,
        snapshot=dispatched - snapshot_created,
        until_disk_task=disk_started - dispatched,
        engine=disk.number("seconds"),
        until_finished=finished - engine_end,
        until_cli_exit=ran.ended_at - finished,
    )


def disk_detail(state: State, run_id: str) -> str:
    d = state.disk(run_id, DISK).fields
    return (
        f"{d.get('mode', '?')}: {int(d.get('chunks_read') or 0)} chunks read, "
        f"{int(d.get('chunks_new') or 0)} stored, "
        f"{int(d.get('bytes_stored') or 0) / images.MiB:.0f} MiB written"
    )


# --- the commands -----------------------------------------------------------------------


def hamal_exe() -> str:
    """The venv's `hamal`, next to the interpreter running the bench."""
    return str(Path(sys.executable).parent / "hamal")


def hamal(fleet: LocalFleet, *args: str) -> Ran:
    # The fleet's environment: its config, Redis, store, and this tree on PYTHONPATH.
    return run_timed([hamal_exe(), *args], env=fleet.env())


def hamal_sync(fleet: LocalFleet, results: Results, row: report.Measured, source: Path) -> None:
    """`hamal sync --vm VM --wait`, timed; its phases read back from the run's records."""
    ran = report.measured(row, source, lambda: hamal(fleet, "sync", "--vm", VM, "--wait"), _secs)
    state = State.from_url(fleet.redis_url)
    run_id = state.vm(vm_id_for(VM)).get("last_point", "")
    phases = results.full_phases if row is results.hamal_full else results.incremental_phases
    phases.append(sync_phases(state, run_id, ran))
    results.sync_details.append(f"{row.operation}: {disk_detail(state, run_id)}")


def hamal_restore(fleet: LocalFleet, results: Results, work: Path, source: Path) -> None:
    """`hamal restore` of the latest point of the disk into work/, from work/store."""
    out = work / "hamal-restored.raw"
    args = ("restore", "--vm", VM, "--disk", DISK, "--point", "latest", "--to", str(out))
    ran = report.measured(results.hamal_restore, work / "store", lambda: hamal(fleet, *args), _secs)
    found = _RESTORE_SECONDS.search(ran.stdout)
    if found:
        results.restore_inner.append(float(found.group(1)))
    check_restore("Hamal", out, source)


def _secs(ran: Ran) -> float:
    return ran.seconds


def benji_restore(benji: Benji, results: Results, out: Path, source: Path) -> None:
    """`benji restore --sparse` of V2; then the `sync` that makes it durable, timed apart."""
    seconds = report.measured(results.benji_restore, benji.root, lambda: benji.restore("V2", out))
    started = time.perf_counter()
    os.sync()
    synced = results.benji_restore_synced
    synced.seconds.append(seconds + time.perf_counter() - started)
    synced.disk_reads.append(results.benji_restore.disk_reads[-1])
    check_restore("benji", out, source)


def check_restore(tool: str, out: Path, source: Path) -> None:
    problem = images.same_content(out, source)
    out.unlink()
    verdict = "byte-identical to the source" if problem is None else f"DIFFERS: {problem}"
    print(f"  {tool} restore: {verdict}")


# --- a round ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """What every round uses: the fleet's one redis-server, benji, the base image.

    This process's Celery client (which `wait_worker_ready` pings with) is bound to the
    first broker it sees, so the rounds share one redis-server, emptied between them.
    """

    fleet: LocalFleet
    overrides: dict[str, str]  # the fleet's HAMAL_* overrides, read when a process starts
    benji_exe: Path | None
    base: Path


def start_fleet(root: Path, base: Path, benji_exe: Path | None) -> Shared:
    overrides = dict(FLEET_ENV)
    fleet = LocalFleet(root, overrides)
    fleet.start_redis()
    fleet.apply_env()
    return Shared(fleet, overrides, benji_exe, base)


def start_workers(shared: Shared, work: Path) -> None:
    """A fleet as good as new: empty Redis, the round's inventory and store, new workers."""
    redis.Redis.from_url(shared.fleet.redis_url).flushall()
    shared.overrides["HAMAL_LOCAL_INVENTORY"] = str(work / "inventory")
    shared.overrides["HAMAL_TARGET_PATH"] = str(work / "store")
    shared.fleet.start_worker("period", ["period"], concurrency=2)
    shared.fleet.start_worker("local", ["local"])
    shared.fleet.wait_worker_ready("period")
    shared.fleet.wait_worker_ready("local")


def one_round(n: int, work: Path, results: Results, shared: Shared) -> None:
    """Full sync and backup, the change, incrementals, restores: a fresh store and repo."""
    fleet, base = shared.fleet, shared.base
    disk = work / "inventory" / VM / DISK
    disk.parent.mkdir(parents=True)
    images.copy_sparse(base, disk)
    benji = Benji(shared.benji_exe, work / "benji", CHUNK_SIZE) if shared.benji_exe else None
    try:
        start_workers(shared, work)
        report.measured(results.hamal_startup, None, lambda: hamal(fleet, "--version"), _secs)
        hamal_sync(fleet, results, results.hamal_full, disk)
        if benji is not None:
            benji.create()
            report.measured(results.benji_startup, None, benji.startup_seconds)
            report.measured(results.benji_full, disk, lambda: benji.backup("V1", disk, "d0"))
        extents = images.change_chunks(base, disk, CHUNK_SIZE, CHANGED_FRACTION, CHANGE_SEED)
        hamal_sync(fleet, results, results.hamal_incremental, disk)
        hamal_restore(fleet, results, work, disk)
        if benji is not None:
            benji_incrementals_and_restore(benji, results, disk, extents, work)
    except (PeerError, FleetError) as exc:
        print(f"round {n + 1} stopped, its numbers are incomplete: {exc}")
    finally:
        fleet.stop("period")
        fleet.stop("local")
    images.remove_tree(work)
    print(results.round_line(n), flush=True)


def benji_incrementals_and_restore(
    benji: Benji, results: Results, disk: Path, extents: list[Extent], work: Path
) -> None:
    hints = benji.write_hints(extents)
    report.measured(results.benji_hinted, disk, lambda: benji.backup("V2", disk, "d0", "V1", hints))
    benji_restore(benji, results, work / "benji-restored.raw", disk)
    benji.remove("V2")  # else the next backup finds the changed blocks already stored
    report.measured(results.benji_unhinted, disk, lambda: benji.backup("V3", disk, "d0", "V1"))


# --- output -----------------------------------------------------------------------------


def prepare_image(spec: images.MixedImage, base: Path) -> None:
    started = time.perf_counter()
    counts = images.build_image(base, spec, IMAGE_SEED)
    os.sync()
    print(
        f"image: {spec.size / images.GiB:g} GiB, {counts['random']} random, {counts['text']} "
        f"compressible, {counts['hole']} holes in 4 MiB pieces (seed {IMAGE_SEED}); for the "
        f"incremental the disk is replaced by a copy with {CHANGED_FRACTION:.0%} of its 4 MiB "
        f"chunks changed (built in {time.perf_counter() - started:.0f} s)"
    )


def print_results(results: Results) -> None:
    print("\n" + report.table(results.rows()))
    print("(MB/s: the image's 2 GiB apparent size over the median time)\n")
    goals = [
        report.throughput_ratio(results.hamal_full, results.benji_full, FULL_TARGET),
        report.throughput_ratio(results.hamal_restore, results.benji_restore, RESTORE_TARGET),
    ]
    print("Targets (ratios of medians within this run; > 1 means Hamal is faster):")
    for goal in goals:
        print("  " + (goal.line() if goal else "n/a: a tool has no numbers"))
    for ours, peer in (
        (results.hamal_incremental, results.benji_unhinted),
        (results.hamal_incremental, results.benji_hinted),
        (results.hamal_restore, results.benji_restore_synced),
    ):
        ratio = report.throughput_ratio(ours, peer, 1.0)
        if ratio:
            print(f"  (no target) {ratio.name}: {ratio.value:.2f}x")
    print(
        "  note: every figure is end to end: each tool's start-up is in it. Hamal's restore "
        "fsyncs its image before it returns; benji's does not (the `then sync` row adds it)."
    )
    print(
        "  note: the local platform has no change tracking, so Hamal's incremental reads "
        "every allocated byte; benji's unhinted incremental is the like-for-like one."
    )


def print_phases(results: Results) -> None:
    """Medians of each phase of Hamal's syncs, and what the restore's time is made of."""
    for what, phases in (
        ("full sync", results.full_phases),
        ("incremental sync", results.incremental_phases),
    ):
        if not phases:
            continue
        print(f"\nWhere `hamal sync --wait` spends its time, {what} (medians of {len(phases)}):")
        medians = {
            f.name: statistics.median(getattr(p, f.name) for p in phases)
            for f in fields(SyncPhases)
        }
        total = sum(medians.values())
        for name, label in PHASE_LABELS.items():
            share = medians[name] / total if total else 0.0
            print(f"  {label:<78} {medians[name]:6.2f} s  {share:4.0%}")
        print(f"  {'sum of the medians':<78} {total:6.2f} s")
    if results.hamal_startup.seconds:
        print(
            f"  the CLI's start-up alone (`hamal --version`, median): "
            f"{results.hamal_startup.median:.2f} s, inside the first phase"
        )
    for line in dict.fromkeys(results.sync_details):  # each round's, once if the same
        print(f"  {line}")
    if results.restore_inner and results.hamal_restore.seconds:
        inner = statistics.median(results.restore_inner)
        print(
            f"\n`hamal restore`: median {results.hamal_restore.median:.2f} s end to end, of which "
            f"{inner:.1f} s in restore_disk (as the CLI prints it; fetch, decode, write, fsync) "
            f"and {results.hamal_restore.median - inner:.1f} s of start-up and point lookup"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root)
    work = root / "fleet"
    images.remove_tree(work)
    print(report.header("bench/fleet.py"))
    spec = images.MixedImage()
    base = work / "base.raw"
    prepare_image(spec, base)
    benji = prepare_benji(root)
    print(
        "Page cache: before every timed operation `sync` runs and its source (the image, "
        "or the chunk store / benji repository for a restore) is read once. The table shows "
        "what each still read from disk.\n",
        flush=True,
    )
    results = Results(spec.size)
    try:
        shared = start_fleet(work / "fleet", base, benji)
    except FleetError as exc:
        print(f"Hamal: NOT MEASURED, the fleet did not start: {exc}")
        return 0
    try:
        for n in range(args.rounds):
            one_round(n, work / f"round{n + 1}", results, shared)
    finally:
        shared.fleet.stop_all()
    print_results(results)
    print_phases(results)
    images.remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
