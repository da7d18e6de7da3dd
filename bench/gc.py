"""Garbage collection of a store of 1 million chunks and 10,000 restore points: time, memory.

    .venv/bin/python bench/gc.py                              (also: make bench)
    .venv/bin/python bench/gc.py --chunks 20000 --points 200  (a quick run: seconds)

The requirement: GC streams the manifests and the chunk listing, so its memory stays
bounded (a 10 TB store of 4 MiB chunks holds about 2.6 million chunks). Target: a pass
over a synthetic store of 1 million chunks and 10,000 points within 300 MiB peak RSS.

The store: --vms VMs (default one per 100 points) share the --points; each point is one
disk of about --disk-chunks entries. A VM's first point names new chunks only; each
later one changes a few entries, at random positions, to chunks of its own, so that the
VM's points together name its share of 90% of the --chunks. The other 10% no point
names, and were written a day ago (past the young-chunk grace): what the pass collects.
Chunk files are written as put_chunk leaves them (header and a tiny raw payload named
by its blake3; GC never reads a chunk), points through stage_disk and commit_point.
Building takes minutes, so the store is kept under .bench/gc/ and reused by the next run
with the same parameters.

Two passes of hamal_workers.gc.collect, each in a fresh spawned process so that its peak
RSS is its own, against a redis-server of its own on loopback: pass 1 condemns every
chunk no point names, pass 2 drops them. Each prints its time, peak RSS, counters and
steps, and whether the counters are what was built. Peers in the same run: `find chunks
-type f | wc -l`, the bare listing any collector needs, and `cat` of every manifest,
the other input: the ratios say what the pass costs over reading its inputs.

Afterwards the collected chunks are written again, so the next run finds the store as
built. A benchmark, not a test: it asserts nothing and exits 0 on a MISS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.images import MiB, remove_tree  # noqa: E402
from hamal_workers import config  # noqa: E402
from hamal_workers.gc import GcReport, collect, young_grace  # noqa: E402
from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.state import State  # noqa: E402
from hamal_workers.targets import chunk_format  # noqa: E402
from hamal_workers.targets.base import CODEC_RAW, DiskManifest  # noqa: E402
from hamal_workers.targets.chunkstore import GC_DIR, GC_RECORD, ChunkStore  # noqa: E402

RSS_TARGET_MIB = 300
GARBAGE_EVERY = 10  # one chunk in this many is named by no point
# Well past the young-chunk grace (two lease times: 60 s at the defaults).
GARBAGE_AGE_S = 24 * 3600.0
POINTS_PER_VM = 100  # when --vms is not given
DISK = "disk0"
CHANGE_SEED = 11
# The payload of chunk i is this and i: unique, so every chunk has a name of its own.
PAYLOAD_PREFIX = b"hamal bench/gc chunk "
# Bumped whenever the store this bench builds changes: an older one is built again.
BUILDER_VERSION = 1
STAMP = "built.json"


# --- the store's shape ------------------------------------------------------------------


@dataclass(frozen=True)
class StoreShape:
    chunks: int
    points: int
    vms: int
    disk_chunks: int  # entries of one disk, when the VM's share of chunks allows

    @property
    def garbage(self) -> int:
        return self.chunks // GARBAGE_EVERY

    @property
    def referenced(self) -> int:
        return self.chunks - self.garbage

    def vm_chunks(self, vm: int) -> range:
        """Indices of the chunks the points of VM `vm` name (each VM has its own)."""
        return _share(self.referenced, self.vms, vm)

    def garbage_chunks(self) -> range:
        return range(self.referenced, self.chunks)

    def vm_points(self, vm: int) -> int:
        return len(_share(self.points, self.vms, vm))

    def problem(self) -> str | None:
        if self.vms < 1 or self.disk_chunks < 1:
            return "--vms and --disk-chunks must be at least 1"
        if self.points < self.vms or self.referenced < self.vms:
            return "every VM needs a point and a chunk: --points and 90% of --chunks >= --vms"
        return None


def _share(total: int, parts: int, part: int) -> range:
    return range(part * total // parts, (part + 1) * total // parts)


def disk_size(vm_chunks: int, points: int, wanted: int) -> int:
    """Entries of each point's disk: `wanted`, but large enough that `points` points can
    name all `vm_chunks` chunks, and no larger than them."""
    return max(min(wanted, vm_chunks), -(-vm_chunks // points))


def vm_disks(shape: StoreShape, vm: int, name_of: Callable[[int], bytes]) -> Iterator[list[bytes]]:
    """The disk entries of the VM's points, oldest first.

    The first point names new chunks only; each later one changes entries at random
    positions to new chunks, spread evenly so that the last point names the last of the
    VM's chunks: successive points share most of their chunks, as a VM's do.
    """
    chunks, points = shape.vm_chunks(vm), shape.vm_points(vm)
    size = disk_size(len(chunks), points, shape.disk_chunks)
    rng = random.Random(CHANGE_SEED + vm)
    entries = [name_of(i) for i in chunks[:size]]
    yield list(entries)
    fresh = iter(chunks[size:])
    new = len(chunks) - size
    for k in range(1, points):
        changed = new * k // (points - 1) - new * (k - 1) // (points - 1)
        for position in rng.sample(range(size), changed):
            entries[position] = name_of(next(fresh))
        yield list(entries)


def chunk_payload(index: int) -> bytes:
    return PAYLOAD_PREFIX + index.to_bytes(8, "big")


def chunk_file_size() -> int:
    return len(chunk_format.chunk_header(CODEC_RAW)) + len(chunk_payload(0))


# --- building it ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreBuild:
    """How long building the store took, and when: what a run that reuses it reports."""

    chunks_s: float
    points_s: float
    built_at: str  # ISO time the build finished
    reused: bool = False

    @property
    def seconds(self) -> float:
        return self.chunks_s + self.points_s


def write_chunk(store: ChunkStore, index: int, mtime: float | None = None) -> None:
    """Chunk `index`'s file where and as put_chunk leaves it, but without its fdatasync
    and rename: a million of those would take most of an hour, and a bench needs no
    durability. `mtime`: when it was written, if not now."""
    payload = chunk_payload(index)
    path = store.chunk_path(store.chunk_name(payload))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except FileNotFoundError:
        # Directories come with their first chunk, as in a real store.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o640)
    try:
        os.write(fd, chunk_format.chunk_header(CODEC_RAW) + payload)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def write_garbage(store: ChunkStore, shape: StoreShape) -> None:
    """The chunks no point names, written a day ago: old enough to be collected."""
    written = time.time() - GARBAGE_AGE_S
    for index in shape.garbage_chunks():
        write_chunk(store, index, written)


def commit_points(store: ChunkStore, shape: StoreShape) -> None:
    """Every point through stage_disk and commit_point, as a disk task and finalize do.

    Their fsyncs cost about 3.5 ms a point here: half a minute for 10,000.
    """
    created = time.time() - GARBAGE_AGE_S

    def name_of(index: int) -> bytes:
        return store.chunk_name(chunk_payload(index))

    for vm in range(shape.vms):
        vm_id = f"vm{vm:04d}"
        for k, entries in enumerate(vm_disks(shape, vm, name_of)):
            point_id = f"p{k:05d}"
            size = len(entries) * store.chunk_size
            store.stage_disk(vm_id, point_id, DiskManifest(DISK, size, store.chunk_size, entries))
            store.commit_point(vm_id, vm_id, point_id, created + k * 3600, [DISK], {})


def build(store_root: Path, shape: StoreShape) -> StoreBuild:
    remove_tree(store_root)
    store = ChunkStore(store_root)
    started = time.perf_counter()
    for index in range(shape.referenced):
        write_chunk(store, index)
    write_garbage(store, shape)
    os.sync()
    chunks_done = time.perf_counter()
    commit_points(store, shape)
    os.sync()
    finished = time.perf_counter()
    built_at = datetime.now(UTC).isoformat(timespec="seconds")
    return StoreBuild(chunks_done - started, finished - chunks_done, built_at)


def write_stamp(root: Path, shape: StoreShape, built: StoreBuild) -> None:
    """Say that the store under `root` is as built, for this shape and this builder."""
    built = replace(built, reused=False)
    record = {"builder": BUILDER_VERSION, "shape": asdict(shape), "built": asdict(built)}
    (root / STAMP).write_text(json.dumps(record, indent=2) + "\n")


def reusable(root: Path, shape: StoreShape) -> StoreBuild | None:
    """How the store under `root` was built, if it has this shape and is as built."""
    try:
        record = json.loads((root / STAMP).read_text())
        if record["builder"] != BUILDER_VERSION or record["shape"] != asdict(shape):
            return None
        return StoreBuild(**{**record["built"], "reused": True})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepared_store(root: Path, shape: StoreShape) -> tuple[ChunkStore, StoreBuild]:
    """The store of this shape, as built: reused when the last run left one, else built.

    Its stamp is taken away while the passes change the store: a run cut short leaves
    none, and the next run builds afresh.
    """
    built = reusable(root, shape)
    if built is None:
        print(f"building the store under {root} (minutes) ...", flush=True)
        built = build(root / "store", shape)
        write_stamp(root, shape, built)
    (root / STAMP).unlink()
    return ChunkStore(root / "store", create=False), built


def restore_as_built(root: Path, store: ChunkStore, shape: StoreShape, built: StoreBuild) -> float:
    """Write the collected chunks again and forget the passes' rounds; the seconds it took."""
    started = time.perf_counter()
    write_garbage(store, shape)
    (store.root / GC_DIR / GC_RECORD).unlink(missing_ok=True)
    os.sync()
    write_stamp(root, shape, built)
    return time.perf_counter() - started


# --- one pass, in a process of its own --------------------------------------------------


@dataclass(frozen=True)
class PassResult:
    report: GcReport
    seconds: float  # collect() alone, as the child timed it
    rss_before_mib: float  # the child's peak before the pass: interpreter, imports, clients
    rss_peak_mib: float
    rss_by_step: dict[str, float] = field(default_factory=dict)  # the peak by each step's end


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_pass(store_root: str, redis_url: str, young_s: float, answer: Connection) -> None:
    """In a spawned child: one collect() pass, and this process's peak RSS around it."""
    store = ChunkStore(store_root, create=False)
    state = State.from_url(redis_url)
    by_step: dict[str, float] = {}

    def note(step: str) -> None:
        by_step[step] = peak_rss_mib()

    before = peak_rss_mib()
    started = time.perf_counter()
    gc_report = collect(store, state, young_s=young_s, between=note)
    seconds = time.perf_counter() - started
    answer.send(PassResult(gc_report, seconds, before, peak_rss_mib(), by_step))
    answer.close()


def run_pass(store: ChunkStore, redis_url: str, young_s: float) -> PassResult:
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=one_pass, args=(str(store.root), redis_url, young_s, sending))
    child.start()
    sending.close()
    try:
        result: PassResult = receiving.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the pass's process exited with {child.exitcode}") from None
    child.join()
    return result


# --- peers ------------------------------------------------------------------------------

FIND_CHUNKS = "find chunks -type f | wc -l"
CAT_MANIFESTS = "find points -type f -name '*.manifest' -exec cat {} + | wc -c"


@dataclass(frozen=True)
class TimedCommand:
    seconds: float
    number: int  # what it printed: files counted or bytes read


def shell(command: str, cwd: Path) -> TimedCommand:
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return TimedCommand(time.perf_counter() - started, int(done.stdout.split()[0]))


def warm(store: ChunkStore) -> None:
    """Read the listing and the manifests once, right before a timed operation: every
    one finds them in the page cache (this machine pages out what sat idle a minute)."""
    shell(FIND_CHUNKS, store.root)
    shell(CAT_MANIFESTS, store.root)


class Results(report.Rows):
    """Every timed operation, in the order the table prints them."""

    def __init__(self) -> None:
        super().__init__(0)
        self.find = self.row("find", "chunks -type f | wc -l", rate=False)
        self.cat = self.row("cat", "every manifest | wc -c", rate=False)
        self.pass_1 = self.row("hamal gc", "pass 1: condemns", rate=False)
        self.pass_2 = self.row("hamal gc", "pass 2: drops", rate=False)


def time_peers(store: ChunkStore, results: Results, rounds: int) -> tuple[int, int]:
    """Medians of `rounds` of each; (chunk files listed, manifest bytes read)."""
    listed = read = 0
    for _ in range(rounds):
        warm(store)
        listed = report.measured(
            results.find, None, lambda: shell(FIND_CHUNKS, store.root), _seconds
        ).number
        warm(store)
        read = report.measured(
            results.cat, None, lambda: shell(CAT_MANIFESTS, store.root), _seconds
        ).number
    return listed, read


def _seconds(outcome: TimedCommand | PassResult) -> float:
    return outcome.seconds


# --- what a pass should have found -------------------------------------------------------


def expected(shape: StoreShape, pass_number: int) -> dict[str, int]:
    """The counters of pass 1 (condemns the garbage) or pass 2 (drops it), no sync running."""
    garbage = shape.garbage
    first = pass_number == 1
    return {
        "running_disks": 0,
        "marked": shape.referenced,
        "chunks_seen": shape.chunks,
        "condemned": garbage if first else 0,
        "revived": 0,
        "dropped": 0 if first else garbage,
        "bytes_freed": 0 if first else garbage * chunk_file_size(),
        "waiting": 0,
    }


def differences(shape: StoreShape, pass_number: int, gc_report: GcReport) -> list[str]:
    found = gc_report.as_dict()
    wrong = [
        f"{name} {found[name]:,} (built for {value:,})"
        for name, value in expected(shape, pass_number).items()
        if found[name] != value
    ]
    if gc_report.refused:
        wrong.append(f"refused: {gc_report.refused}")
    return wrong


# --- printing ---------------------------------------------------------------------------


def print_store(shape: StoreShape, built: StoreBuild, root: Path, young_s: float) -> None:
    size = disk_size(len(shape.vm_chunks(0)), shape.vm_points(0), shape.disk_chunks)
    new = len(shape.vm_chunks(0)) - size
    per_point = new / max(1, shape.vm_points(0) - 1)
    how = f"reused, built on {built.built_at} in" if built.reused else "built in"
    print(
        f"\nStore: {shape.chunks:,} chunks ({shape.referenced:,} named by points, "
        f"{shape.garbage:,} by none and written {GARBAGE_AGE_S / 3600:g} h ago; the grace for "
        f"young chunks is {young_s:g} s), "
        f"{shape.points:,} points of {shape.vms:,} VMs; each point one disk of {size:,} "
        f"chunks, {per_point:.0f} of them changed from the VM's point before\n"
        f"  {how} {built.seconds:.0f} s (chunk files {built.chunks_s:.0f} s, points through "
        f"stage_disk + commit_point {built.points_s:.0f} s), under {root}",
        flush=True,
    )


def print_pass(number: int, result: PassResult) -> None:
    r = result.report
    print(
        f"\npass {number}: {result.seconds:.1f} s, peak RSS {result.rss_peak_mib:.0f} MiB "
        f"({result.rss_before_mib:.0f} MiB before the pass: interpreter, imports, clients)"
    )
    print("  step             seconds  peak RSS by its end, MiB")
    for step, seconds in r.steps.items():
        print(f"  {step:<15} {seconds:8.2f}  {result.rss_by_step.get(step, 0):8.0f}")
    rest = r.seconds - sum(r.steps.values())
    print(f"  {'record':<15} {rest:8.2f}  {result.rss_peak_mib:8.0f}")
    print(
        f"  round {r.gc_round} (drops round {r.dropped_round} and older): marked "
        f"{r.marked:,}, seen {r.chunks_seen:,}, condemned {r.condemned:,}, revived "
        f"{r.revived:,}, dropped {r.dropped:,} ({r.bytes_freed:,} bytes), waiting "
        f"{r.waiting:,}, running disks {r.running_disks}" + (f"; {r.refused}" if r.refused else "")
    )


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def print_verdicts(shape: StoreShape, passes: list[PassResult], listed: int) -> bool:
    """The targets and the checks; True when the store is left as the passes should."""
    worst = max(p.rss_peak_mib for p in passes)
    peaks = " / ".join(f"{p.rss_peak_mib:.0f}" for p in passes)
    print(
        f"\n  {verdict(worst <= RSS_TARGET_MIB)}  peak RSS of a pass within "
        f"{RSS_TARGET_MIB} MiB: {peaks} MiB (pass 1 / pass 2)"
    )
    print(
        f"  {verdict(listed == shape.chunks)}  the listing holds the chunks built: "
        f"{listed:,} of {shape.chunks:,}"
    )
    as_built = True
    for number, result in enumerate(passes, start=1):
        wrong = differences(shape, number, result.report)
        as_built = as_built and not wrong
        what = "condemns" if number == 1 else "drops"
        told = "; ".join(wrong) if wrong else "as built"
        print(
            f"  {verdict(not wrong)}  pass {number} {what} exactly the {shape.garbage:,} "
            f"chunks no point names, and keeps the rest: {told}"
        )
    return as_built


def print_ratios(results: Results, passes: list[PassResult]) -> None:
    find, cat = results.find.median, results.cat.median
    print(f"\nRatios to the peers (medians: find {find:.2f} s, cat {cat:.2f} s):")
    for number, result in enumerate(passes, start=1):
        steps = result.report.steps
        print(
            f"  pass {number} / (find + cat): {result.seconds / (find + cat):.2f}x; "
            f"its sweep step / find: {steps.get('sweep', 0) / find:.2f}x; "
            f"its points step / cat: {steps.get('points', 0) / cat:.2f}x"
        )


# --- the whole bench --------------------------------------------------------------------


def run(root: Path, shape: StoreShape, rounds: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    store, built = prepared_store(root, shape)
    young_s = young_grace(config.defaults().data_sync_v2.fsync_period_frequency)
    print_store(shape, built, root, young_s)
    results = Results()
    listed, manifest_bytes = time_peers(store, results, rounds)
    print(
        f"\nPeers: {listed:,} chunk files listed, {manifest_bytes / MiB:,.0f} MiB of manifests "
        f"read; each timed operation after a warm-up read of both (page cache warm)"
    )
    fleet = LocalFleet(root / "fleet")
    passes: list[PassResult] = []
    try:
        fleet.start_redis()
        for row in (results.pass_1, results.pass_2):
            warm(store)
            passes.append(
                report.measured(
                    row, None, lambda: run_pass(store, fleet.redis_url, young_s), _seconds
                )
            )
    except (FleetError, RuntimeError) as exc:
        print(f"  stopped: {exc}; the store will be built again by the next run")
        return
    finally:
        fleet.stop_all()
        remove_tree(root / "fleet")
    print(report.table(results.rows()))
    for number, result in enumerate(passes, start=1):
        print_pass(number, result)
    as_built = print_verdicts(shape, passes, listed)
    print_ratios(results, passes)
    if as_built:
        seconds = restore_as_built(root, store, shape, built)
        print(f"\nthe {shape.garbage:,} collected chunks written again in {seconds:.0f} s")
    else:
        print("\nthe store is not as built: the next run builds it again")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench" / "gc"))
    parser.add_argument("--chunks", type=int, default=1_000_000, help="chunks in the store")
    parser.add_argument("--points", type=int, default=10_000, help="restore points")
    parser.add_argument("--vms", type=int, help=f"VMs (default: one per {POINTS_PER_VM} points)")
    parser.add_argument("--disk-chunks", type=int, default=4000, help="entries of each disk")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each peer (median)")
    args = parser.parse_args()
    vms = args.vms if args.vms is not None else max(1, args.points // POINTS_PER_VM)
    shape = StoreShape(args.chunks, args.points, vms, args.disk_chunks)
    if problem := shape.problem():
        parser.error(problem)
    print(report.header("bench/gc.py"), end="")
    run(Path(args.root), shape, max(1, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
