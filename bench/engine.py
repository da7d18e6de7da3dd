"""Hamal's engine against cp and benji on one 2 GiB image: full and incremental syncs.

    .venv/bin/python bench/engine.py            (also: make bench)

Builds the image of shared/TESTBEDS.md (40% random, 30% holes, 30% compressible, 4 MiB
pieces, fixed seed), changes 1% of its 4 MiB chunks, and times in each round:

  cp --sparse=always       copy of the image
  benji 0.17               full backup; incremental with change hints; without hints
  Hamal engine             full sync; incremental with the changed extents; without
  Hamal engine, encrypted  full sync and restore, against the same into a plain store

Medians of --rounds runs, each round from a fresh benji repository and chunk store.
Prints the table and the issue's targets (PASS/MISS), then runs bench/memory.py unless
--skip-memory. A benchmark, not a test: it asserts nothing and exits 0 on a MISS.
Everything lives under .bench/ (gitignored), benji in its own venv there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report, stages  # noqa: E402
from bench.hamal_engine import (  # noqa: E402
    VM_ID,
    ImageSource,
    MeteredStore,
    TimedSync,
    commit,
    engine_settings,
    forget_chunks,
    new_digests,
    restore_point,
    timed_sync,
)
from bench.peers import Benji, PeerError, cp_sparse, prepare_benji  # noqa: E402
from hamal_workers import config  # noqa: E402
from hamal_workers.engine.extents import Extent  # noqa: E402
from hamal_workers.engine.pipeline import EngineSettings  # noqa: E402
from hamal_workers.targets.base import CHUNK_SIZE  # noqa: E402
from hamal_workers.targets.chunkstore import ChunkStore  # noqa: E402
from hamal_workers.targets.encryption import ChunkCipher  # noqa: E402

IMAGE_SEED = 20240601
CHANGE_SEED = 7
CHANGED_FRACTION = 0.01
FULL_TARGET = 3.0  # Hamal full throughput at least 3x benji's
HINTED_TARGET = 0.3  # Hamal hinted incremental under 0.3x benji's time


class Results(report.Rows):
    """Every measured operation, in the order the table prints them."""

    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.cp = row("cp --sparse=always", "copy")
        self.benji_full = row("benji", "full backup")
        self.benji_hinted = row("benji", "incremental, hints", rate=False)
        self.benji_unhinted = row("benji", "incremental, no hints")
        self.hamal_full = row("Hamal", "full sync")
        self.hamal_hinted = row("Hamal", "incremental, hints", rate=False)
        self.hamal_unhinted = row("Hamal", "incremental, no hints")
        self.hamal_restore = row("Hamal", "restore of the full point")
        self.sealed_full = row("Hamal, encrypted", "full sync")
        self.sealed_restore = row("Hamal, encrypted", "restore of the full point")
        self.benji_startup = row("benji", "start-up alone (ls)", rate=False)
        self.full_sync_barriers: list[float] = []  # seconds in target.sync() per full sync


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true", help="do not run bench/memory.py")
    args = parser.parse_args()
    root = Path(args.root)
    work = root / "engine"
    images.remove_tree(work)
    print(report.header("bench/engine.py"))

    spec = images.MixedImage()
    base, changed = work / "images" / "base.raw", work / "images" / "changed.raw"
    extents = prepare_images(spec, base, changed)
    benji = prepare_benji(root)
    settings = engine_settings(config.defaults())
    print(
        f"Hamal engine settings (hamal.conf defaults): readers={settings.readers} "
        f"([data_sync_v2] pre_disk_readers_count), writers={settings.writers} "
        f"([target] writers), checkpoint barrier every "
        f"{settings.checkpoint_every_s:g} s"
    )
    print(
        "Page cache: nothing is dropped (that needs root). Before every timed operation "
        "its source image is read once, so every tool starts with it in the page cache, "
        "and `sync` runs, so none pays for another's write-back. The table shows what "
        "each still read from disk.\n"
    )

    results = Results(spec.size)
    for n in range(args.rounds):
        one_round(n, work / f"round{n + 1}", results, benji, settings, (base, changed), extents)

    print_results(results, benji is not None)
    print_step_costs(base, work / "steps")
    images.remove_tree(work)
    if not args.skip_memory:
        from bench import memory

        memory.run(root / "memory")
    return 0


def prepare_images(spec: images.MixedImage, base: Path, changed: Path) -> list[Extent]:
    started = time.perf_counter()
    counts = images.build_image(base, spec, IMAGE_SEED)
    extents = images.change_chunks(base, changed, CHUNK_SIZE, CHANGED_FRACTION, CHANGE_SEED)
    os.sync()
    written = sum(e.length for e in extents)
    print(
        f"image: {spec.size / images.GiB:g} GiB, {spec.pieces} pieces of "
        f"{spec.piece // images.MiB} MiB: {counts['random']} random, {counts['text']} "
        f"compressible, {counts['hole']} holes (seed {IMAGE_SEED}); incremental: "
        f"{len(extents)} chunks changed, {written / images.MiB:.1f} MiB written "
        f"(built in {time.perf_counter() - started:.0f} s)"
    )
    return extents


def one_round(
    n: int,
    work: Path,
    results: Results,
    benji_exe: Path | None,
    settings: EngineSettings,
    image_pair: tuple[Path, Path],
    extents: list[Extent],
) -> None:
    base, changed = image_pair
    work.mkdir(parents=True)
    report.measured(results.cp, base, lambda: cp_sparse(base, work / "copy.raw"))
    (work / "copy.raw").unlink()
    if benji_exe is not None:
        try:
            benji = Benji(benji_exe, work / "benji", CHUNK_SIZE)
            benji_round(benji, results, image_pair, extents)
        except PeerError as exc:
            print(f"benji failed in round {n + 1}, its numbers are incomplete: {exc}")
    hamal_round(work / "store", results, settings, image_pair, extents, verify=n == 0)
    sealed_round(work, results, settings, base, verify=n == 0)
    images.remove_tree(work)
    print(results.round_line(n), flush=True)


def benji_round(
    benji: Benji, results: Results, image_pair: tuple[Path, Path], extents: list[Extent]
) -> None:
    base, changed = image_pair
    benji.create()
    report.measured(results.benji_startup, None, benji.startup_seconds)
    report.measured(results.benji_full, base, lambda: benji.backup("V1", base, "disk0"))
    hints = benji.write_hints(extents)
    report.measured(
        results.benji_hinted, changed, lambda: benji.backup("V2", changed, "disk0", "V1", hints)
    )
    benji.remove("V2")  # else the next backup finds the changed blocks already stored
    report.measured(
        results.benji_unhinted, changed, lambda: benji.backup("V3", changed, "disk0", "V1")
    )


def hamal_round(
    store_dir: Path,
    results: Results,
    settings: EngineSettings,
    image_pair: tuple[Path, Path],
    extents: list[Extent],
    verify: bool,
) -> None:
    base, changed = image_pair
    store = MeteredStore(store_dir)
    full_source = ImageSource(base, "t1")
    tracked, untracked = ImageSource(changed, "t2", extents), ImageSource(changed, "t2")

    def seconds(timed: TimedSync) -> float:
        return timed.seconds

    full = report.measured(
        results.hamal_full, base, lambda: timed_sync(store, full_source, settings), seconds
    )
    results.full_sync_barriers.append(full.barrier_seconds)
    commit(store, full_source, full.result.manifest, "p1")
    hinted = report.measured(
        results.hamal_hinted, changed, lambda: timed_sync(store, tracked, settings), seconds
    )
    print_sync("full", full)
    print_sync("hinted incremental", hinted)
    commit(store, tracked, hinted.result.manifest, "p2")
    if verify:
        verify_restore(store, changed, store_dir.parent / "restored.raw")
    # The unhinted incremental starts from the full point alone, as the hinted one did.
    store.delete_point(VM_ID, "p2")
    forget_chunks(store, new_digests(hinted.result.manifest, full.result.manifest))
    unhinted = report.measured(
        results.hamal_unhinted, changed, lambda: timed_sync(store, untracked, settings), seconds
    )
    print_sync("unhinted incremental", unhinted)
    if verify:
        same = unhinted.result.manifest.entries == hinted.result.manifest.entries
        print(f"  unhinted incremental's manifest equals the hinted one's: {same}")


def sealed_round(
    work: Path, results: Results, settings: EngineSettings, base: Path, verify: bool
) -> None:
    """A full sync and its restore into a plain and an encrypted store, for their ratio."""
    out = work / "restored.raw"
    cipher = ChunkCipher(os.urandom(32))
    for store, full, restore in (
        (MeteredStore(work / "plain"), None, results.hamal_restore),
        (MeteredStore(work / "sealed", cipher), results.sealed_full, results.sealed_restore),
    ):
        source = ImageSource(base, "t1")
        if full is None:  # the plain full sync is hamal_round's row already
            commit(store, source, timed_sync(store, source, settings).result.manifest, "p1")
        else:
            timed = report.measured(
                full, base, lambda s=store, src=source: timed_sync(s, src, settings),
                lambda t: t.seconds,
            )  # fmt: skip
            commit(store, source, timed.result.manifest, "p1")
        report.measured(restore, None, lambda s=store: timed_restore(s, out))
        if verify:
            problem = images.same_content(out, base)
            print(f"  restore from the {'encrypted ' if full else ''}store: "
                  + ("byte-identical" if problem is None else f"DIFFERS: {problem}"))  # fmt: skip
        out.unlink()
        images.remove_tree(store.root)


def timed_restore(store: ChunkStore, out: Path) -> float:
    started = time.perf_counter()
    restore_point(store, "p1", out)
    return time.perf_counter() - started


def print_sync(what: str, timed: TimedSync) -> None:
    r = timed.result
    print(
        f"  Hamal {what} ({r.mode}): {r.chunks_read} chunks read ({r.chunks_zero} zero), "
        f"{r.chunks_new} stored, {r.bytes_stored / images.MiB:.0f} MiB written; "
        f"{timed.seconds:.2f} s, of which {timed.barrier_seconds:.2f} s in target.sync(); "
        f"CPU {timed.cpu_user:.2f} s user + {timed.cpu_system:.2f} s system, "
        f"{timed.minor_faults:,} minor page faults"
    )


def verify_restore(store: ChunkStore, changed: Path, out: Path) -> None:
    restore_point(store, "p2", out)
    problem = images.same_content(out, changed)
    out.unlink()
    verdict = "byte-identical to the changed image" if problem is None else f"DIFFERS: {problem}"
    print(f"  restore of Hamal's hinted incremental: {verdict}")


def print_results(results: Results, benji_measured: bool) -> None:
    print("\n" + report.table(results.rows()))
    print("(MB/s: the image's 2 GiB apparent size over the median time, as TESTBEDS.md)\n")
    if not benji_measured:
        print("Targets: not evaluated, benji was not measured (see above).")
        return
    goals = [
        report.throughput_ratio(results.hamal_full, results.benji_full, FULL_TARGET),
        report.time_ratio(results.hamal_hinted, results.benji_hinted, HINTED_TARGET),
    ]
    print("Targets (ratios of medians within this run):")
    for goal in goals:
        print("  " + (goal.line() if goal else "n/a: a tool has no numbers"))
    for sealed, plain in (
        (results.sealed_full, results.hamal_full),
        (results.sealed_restore, results.hamal_restore),
    ):
        cost = report.time_ratio(sealed, plain, 1.0)
        if cost:
            print(f"  (no target) encryption's cost: {cost.name}: {cost.value:.2f}x the time")
    unhinted = report.time_ratio(results.hamal_unhinted, results.benji_unhinted, 1.0)
    if unhinted:
        print(f"  (no target) {unhinted.name}: {unhinted.value:.2f}x")
    print(
        f"  note: benji's times include its start-up "
        f"(median {results.benji_startup.median:.2f} s for `benji ls`); Hamal's are "
        "in-process engine calls."
    )
    barrier = statistics.median(results.full_sync_barriers)
    print(
        f"  note: Hamal's times include its durability barriers (directory fsyncs; median "
        f"{barrier:.2f} s of the full sync); benji writes its blocks without fsync."
    )


def print_step_costs(image: Path, scratch: Path) -> None:
    os.sync()
    costs = stages.step_costs(image, scratch)
    print(
        "\nWhere a full sync's time goes (bench/stages.py: the engine's steps for every "
        "chunk of the full sync, one at a time in one thread; `alt:` rows are the "
        "engine's earlier, costlier ways of doing a step, for comparison):"
    )
    print(stages.format_costs(costs, os.cpu_count() or 1))


if __name__ == "__main__":
    sys.exit(main())
