"""OpenStack/Ceph: `hamal sync --wait` of a 4 GiB RBD volume against `rbd export` and
`rbd export-diff`, on one real Ceph cluster, in one run.

    .venv/bin/python bench/ceph.py [--rounds 3]      (also: make bench)

A one-monitor, one-OSD Ceph (memstore) comes up under .bench/ceph; the project's
OpenStack simulator serves one instance whose only volume is a 4 GiB RBD image with the
mixed content of bench/images.py (40% random, 30% compressible, 30% never written).
A LocalFleet (period and ceph workers, no beat) syncs it. Each round, from an empty
Redis and a new chunk store:

  hamal sync --vm V --wait                  full: allocated extents, hash, compress, store
  rbd snap create + rbd export @SNAP        the peer's full: every byte, to /dev/null
  (1% of the 4 MiB blocks get one random write each)
  hamal sync --vm V --wait                  incremental: diff_iterate from the last point
  rbd snap create + rbd export-diff         the peer's incremental, to /dev/null, then the
    --from-snap + rbd snap rm               previous snapshot removed (a rotation, as Hamal's)

and the incremental point is restored with `hamal restore` and compared with `rbd export`
of its snapshot. The engine's own seconds (the disk task's record) are printed beside the
whole path, since the whole path also holds the CLI, OpenStack calls, two snapshots and
Celery's hops, which a bare `rbd` command does not have. A benchmark, not a test: it
exits 0 on a MISS.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report  # noqa: E402
from bench.peers import PeerError, Ran  # noqa: E402
from bench.runs import hamal, last_disk, phases, seconds_of, to_null  # noqa: E402
from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.simulators.local_vms import compressible  # noqa: E402
from hamal_workers.simulators.openstack import OpenStackSimulator  # noqa: E402
from hamal_workers.state import State  # noqa: E402
from hamal_workers.testbeds import ceph as testbed  # noqa: E402

GiB = images.GiB
MiB = images.MiB
IMAGE_SEED = 20240601
CHANGE_SEED = 7
CHANGED_FRACTION = 0.01
VM = "bench-ceph"
FULL_TARGET = 0.8  # Hamal's full throughput / rbd export's, at least
INCREMENTAL_TARGET = 1.2  # Hamal's incremental time / rbd export-diff's, at most
FLEET_ENV = {"HAMAL_PERIOD_INTERVAL": "3600", "HAMAL_LOCAL_INVENTORY": ""}


class Results(report.Rows):
    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.hamal_full = row("Hamal", "sync --wait, full")
        self.hamal_full_engine = row("Hamal", "  of which the disk task's engine")
        self.rbd_export = row("rbd", "snap create + export, full")
        self.hamal_incremental = row("Hamal", "sync --wait, incremental", rate=False)
        self.hamal_incremental_engine = row(
            "Hamal", "  of which the disk task's engine", rate=False
        )
        self.rbd_export_diff = row("rbd", "snap create + export-diff + snap rm", rate=False)
        self.hamal_restore = row("Hamal", "restore --point latest")
        self.details: list[str] = []
        self.full_phases: list[dict[str, float]] = []
        self.incremental_phases: list[dict[str, float]] = []


# --- the volume -----------------------------------------------------------------------------


def fill(io: Any, image: str, spec: images.MixedImage) -> dict[str, int]:
    """The mixed content of bench/images.py, written through librbd (holes never written)."""
    import rbd

    rng = random.Random(IMAGE_SEED)
    counts = {"random": 0, "text": 0, "hole": 0}
    with rbd.Image(io, image) as img:
        for index, kind in enumerate(spec.kinds(rng)):
            counts[kind] += 1
            if kind == "random":
                img.write(rng.randbytes(spec.piece), index * spec.piece)
            elif kind == "text":
                img.write(compressible(rng, spec.piece), index * spec.piece)
    return counts


def change(io: Any, image: str, size: int, seed: int) -> int:
    """One random write inside 1% of the 4 MiB blocks, as bench/images.change_chunks does."""
    import rbd

    rng = random.Random(seed)
    block = 4 * MiB
    chosen = sorted(
        rng.sample(range(size // block), max(1, round(size // block * CHANGED_FRACTION)))
    )
    written = 0
    with rbd.Image(io, image) as img:
        for index in chosen:
            pages = block // 4096
            first = rng.randrange(pages)
            length = rng.randint(min(64, pages - first), pages - first) * 4096
            img.write(rng.randbytes(length), index * block + first * 4096)
            written += length
    return written


# --- the commands ---------------------------------------------------------------------------


def rbd_cmd(cluster: testbed.CephCluster, *args: str) -> list[str]:
    return ["rbd", *args, "--conf", str(cluster.conf), "--keyring", str(cluster.keyring)]


def peer_snapshot_and(cluster: testbed.CephCluster, spec: str, snap: str, then: list[str]) -> float:
    """`rbd snap create` then the export: what a backup script built on rbd would run."""
    return to_null(rbd_cmd(cluster, "snap", "create", f"{spec}@{snap}")) + to_null(then)


def sync(fleet: LocalFleet) -> Ran:
    return hamal(fleet, "sync", "--vm", VM, "--wait")


PHASES = (
    ("until_run", "CLI start -> run `started` (CLI, vm.sync, Keystone, Nova, Cinder, Ceph)"),
    ("snapshot", "run `started` -> disk `dispatched_at` (image + group snapshots)"),
    ("until_disk_task", "disk `dispatched_at` -> `started_at` (queue, ceph worker)"),
    ("engine", "disk `seconds` (plan, diff_iterate, read, hash, compress, store)"),
    ("until_finished", "the rest -> run `finished` (stage, finalize, trim, retention)"),
    ("until_cli_exit", "run `finished` -> CLI exit (its poll)"),
)


def engine_seconds(fleet: LocalFleet, server: str) -> tuple[float, str]:
    _, _, fields = last_disk(fleet, server)
    detail = (
        f"{fields.get('mode')}: {int(fields.get('chunks_read') or 0)} chunks read, "
        f"{int(fields.get('chunks_new') or 0)} stored, "
        f"{int(fields.get('bytes_stored') or 0) / MiB:.0f} MiB written"
    )
    return float(fields.get("seconds") or 0), detail


def sha(stream_cmd: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    with subprocess.Popen(stream_cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while piece := proc.stdout.read(16 * MiB):
            h.update(piece)
    return h.hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while piece := fh.read(16 * MiB):
            h.update(piece)
    return h.hexdigest()


# --- a round --------------------------------------------------------------------------------


def one_round(
    n: int, work: Path, fleet: LocalFleet, overrides: dict[str, str], ctx: dict[str, Any],
    results: Results,
) -> None:  # fmt: skip
    cluster: testbed.CephCluster = ctx["cluster"]
    spec = f"volumes/{ctx['image']}"
    redis.Redis.from_url(fleet.redis_url).flushall()
    overrides["HAMAL_TARGET_PATH"] = str(work / "store")
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("ceph", ["ceph"])
    try:
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("ceph")
        ran = report.measured(results.hamal_full, None, lambda: sync(fleet), seconds_of)
        results.full_phases.append(phases(fleet, ctx["server"], ran))
        seconds, detail = engine_seconds(fleet, ctx["server"])
        results.hamal_full_engine.seconds.append(seconds)
        results.details.append(f"full: {detail}")
        full_snap = f"bench-{n}-full"
        export = rbd_cmd(cluster, "export", "--no-progress", f"{spec}@{full_snap}", "-")
        report.measured(results.rbd_export, None,
                        lambda: peer_snapshot_and(cluster, spec, full_snap, export))  # fmt: skip

        written = change(ctx["io"], ctx["image"], ctx["size"], CHANGE_SEED + n)
        ran = report.measured(results.hamal_incremental, None, lambda: sync(fleet), seconds_of)
        results.incremental_phases.append(phases(fleet, ctx["server"], ran))
        seconds, detail = engine_seconds(fleet, ctx["server"])
        results.hamal_incremental_engine.seconds.append(seconds)
        results.details.append(f"incremental ({written / MiB:.1f} MiB written): {detail}")
        incr_snap = f"bench-{n}-incr"
        diff = rbd_cmd(cluster, "export-diff", "--no-progress", "--from-snap", full_snap,
                       f"{spec}@{incr_snap}", "-")  # fmt: skip
        rotate = rbd_cmd(cluster, "snap", "rm", "--no-progress", f"{spec}@{full_snap}")
        report.measured(results.rbd_export_diff, None,
                        lambda: peer_snapshot_and(cluster, spec, incr_snap, diff)
                        + to_null(rotate))  # fmt: skip

        state = State.from_url(fleet.redis_url)
        point = state.vm(ctx["server"]).get("last_point", "")
        (disk,) = state.run_disks(point)
        out = work / "restored.raw"
        args = ("restore", "--vm", VM, "--disk", disk, "--point", "latest", "--to", str(out))
        report.measured(results.hamal_restore, None, lambda: hamal(fleet, *args), seconds_of)
        want = sha(rbd_cmd(cluster, "export", "--no-progress", f"{spec}@hamal-{point}", "-"))
        got = file_sha(out)
        out.unlink()
        verdict = "byte-identical to rbd export" if got == want else "DIFFERS from rbd export"
        print(f"  round {n + 1}: Hamal's restore of the incremental point: {verdict}")
        to_null(rbd_cmd(cluster, "snap", "rm", "--no-progress", f"{spec}@{incr_snap}"))
    except (PeerError, FleetError) as exc:
        print(f"round {n + 1} stopped, its numbers are incomplete: {exc}")
    finally:
        fleet.stop("period")
        fleet.stop("ceph")
        images.remove_tree(work)
    print(results.round_line(n), flush=True)


def print_results(results: Results) -> None:
    print("\n" + report.table(results.rows()))
    print("(MB/s: the volume's 4 GiB apparent size over the median time)\n")
    print("Targets (ratios of medians within this run):")
    full = report.throughput_ratio(results.hamal_full, results.rbd_export, FULL_TARGET)
    incremental = report.time_ratio(
        results.hamal_incremental, results.rbd_export_diff, INCREMENTAL_TARGET
    )
    for goal in (full, incremental):
        print("  " + (goal.line() if goal else "n/a: a tool has no numbers"))
    engine_full = report.throughput_ratio(results.hamal_full_engine, results.rbd_export, 1.0)
    engine_incr = report.time_ratio(results.hamal_incremental_engine, results.rbd_export_diff, 1.0)
    if engine_full and engine_incr:
        print(
            f"  (engine only) full throughput / rbd export: {engine_full.value:.2f}x; "
            f"incremental time / rbd export-diff: {engine_incr.value:.2f}x"
        )
    print(
        "  note: Hamal's figures are end to end (CLI, OpenStack API, snapshot + group snapshot,"
        " Celery, commit, retention, the old snapshot removed); rbd's are `snap create`, the "
        "export to /dev/null and, for the incremental, `snap rm` of the previous snapshot. "
        "Hamal also hashes, compresses and writes what it reads; rbd writes nothing."
    )
    for line in dict.fromkeys(results.details):
        print(f"  {line}")
    for what, runs in (("full", results.full_phases), ("incremental", results.incremental_phases)):
        if not runs:
            continue
        print(f"\nWhere `hamal sync --wait` spends its time, {what} (medians of {len(runs)}):")
        for name, label in PHASES:
            print(f"  {label:<80} {statistics.median(r[name] for r in runs):6.2f} s")
    if results.hamal_full.seconds and results.hamal_full_engine.seconds:
        rest = statistics.median(
            a - b
            for a, b in zip(
                results.hamal_full.seconds, results.hamal_full_engine.seconds, strict=False
            )
        )
        print(f"  full sync outside the engine (median): {rest:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument(
        "--propose-interval",
        type=float,
        default=1.0,
        help="the monitor's paxos propose interval: Ceph's default 1 s, as in production "
        "(every snapshot created or removed waits about that long); the tests use 0.02",
    )
    args = parser.parse_args()
    root = Path(args.root) / "ceph-bench"
    images.remove_tree(root)
    print(report.header("bench/ceph.py"))
    missing = testbed.missing_tools()
    if missing:
        print(
            f"Ceph: NOT MEASURED, tools missing ({', '.join(missing)}): run scripts/setup-ceph.sh"
        )
        return 0
    import rados

    spec = images.MixedImage(size=args.size_gib * GiB)
    cluster = testbed.up(
        root / "ceph",
        memstore_mib=args.size_gib * 1024 + 3072,
        propose_interval=args.propose_interval,
    )
    print(f"monitor: paxos propose interval {args.propose_interval:g} s")
    cloud = OpenStackSimulator(str(cluster.conf), str(cluster.keyring))
    cloud.start()
    client = rados.Rados(conffile=str(cluster.conf), rados_id="admin",
                         conf={"keyring": str(cluster.keyring)})  # fmt: skip
    client.connect(timeout=10)
    io = client.open_ioctx("volumes")
    fleet: LocalFleet | None = None
    try:
        volume = cloud.create_volume("data", spec.size)
        server = cloud.create_server(VM, volumes=[volume])
        started = time.perf_counter()
        counts = fill(io, f"volume-{volume}", spec)
        print(
            f"volume {spec.size // GiB} GiB: {counts['random']} random, {counts['text']} "
            f"compressible, {counts['hole']} unwritten pieces of 4 MiB, written in "
            f"{time.perf_counter() - started:.1f} s\n",
            flush=True,
        )
        overrides = {
            **FLEET_ENV,
            "HAMAL_OPENSTACK_AUTH_URL": cloud.auth_url,
            "HAMAL_OPENSTACK_USERNAME": cloud.username,
            "HAMAL_OPENSTACK_PASSWORD": cloud.connect_kwargs()["password"],
            "HAMAL_OPENSTACK_PROJECT_NAME": cloud.project_name,
            "HAMAL_OPENSTACK_REGION_NAME": cloud.region,
            "HAMAL_CEPH_CONF": str(cluster.conf),
            "HAMAL_CEPH_KEYRING": str(cluster.keyring),
        }
        fleet = LocalFleet(root / "fleet", overrides)
        fleet.start_redis()
        fleet.apply_env()
        ctx = {"cluster": cluster, "image": f"volume-{volume}", "io": io, "size": spec.size,
               "server": server}  # fmt: skip
        results = Results(spec.size)
        for n in range(args.rounds):
            one_round(n, root / f"round{n + 1}", fleet, overrides, ctx, results)
        print_results(results)
    finally:
        if fleet is not None:
            fleet.stop_all()
        io.close()
        client.shutdown()
        cloud.stop()
        testbed.down(root / "ceph")
        images.remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
