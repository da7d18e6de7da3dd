"""The user's view of the store's options: `hamal sync --wait` and `hamal restore` into a
plain chunk store, an encrypted one, and a raw replica, against cp on the same image.

    .venv/bin/python bench/targets.py [--rounds 3]      (also: make bench)

One LocalFleet (its own redis-server, a `period` and a `local` worker, no beat) and the
2 GiB mixed image of bench/images.py, everything on one filesystem under .bench/. Each
round, for each target, from an empty Redis, new workers and a new target, it times as a
user would type them:

  hamal sync --vm V --wait      full sync
  hamal restore ... --to FILE   of that point

and `cp --sparse=always` of the image, the peer of a replica (a raw copy, as a migration
tool would make). Every restore and the replica itself are checked byte for byte against
the source. Prints medians and the ratios (no targets: the issue sets none for these).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report  # noqa: E402
from bench.fleet import DISK, VM, Shared, check_restore, hamal, start_fleet  # noqa: E402
from bench.peers import cp_sparse  # noqa: E402
from hamal_workers.platforms.local import vm_id_for  # noqa: E402
from hamal_workers.targets.encryption import new_key_file  # noqa: E402

IMAGE_SEED = 20240601  # the same bytes bench/engine.py and bench/fleet.py measure
TARGETS = ("plain", "encrypted", "replica")


class Results(report.Rows):
    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.cp = row("cp --sparse=always", "copy of the image")
        self.sync: dict[str, report.Measured] = {}
        self.restore: dict[str, report.Measured] = {}
        for t in TARGETS:
            # Attributes too: the table and the round lines list the Measured attributes.
            self.sync[t] = row(f"Hamal, {t}", "sync --wait, full")
            self.restore[t] = row(f"Hamal, {t}", "restore --point latest")
            setattr(self, f"sync_{t}", self.sync[t])
            setattr(self, f"restore_{t}", self.restore[t])


def target_env(kind: str, work: Path) -> dict[str, str]:
    if kind == "plain":
        return {"HAMAL_TARGET_PATH": str(work / "store")}
    if kind == "encrypted":
        key = work / "store.key"
        new_key_file(key)
        return {
            "HAMAL_TARGET_PATH": str(work / "store"),
            "HAMAL_TARGET_ENCRYPTION_KEY_FILE": str(key),
        }
    return {"HAMAL_TARGET_TYPE": "replica", "HAMAL_REPLICA_DIRECTORY": str(work / "replica")}


def one_target(shared: Shared, kind: str, work: Path, disk: Path, results: Results) -> None:
    fleet = shared.fleet
    import redis

    redis.Redis.from_url(fleet.redis_url).flushall()
    for name in (
        "HAMAL_TARGET_TYPE",
        "HAMAL_TARGET_ENCRYPTION_KEY_FILE",
        "HAMAL_REPLICA_DIRECTORY",
    ):
        shared.overrides.pop(name, None)
    shared.overrides.update(target_env(kind, work))
    shared.overrides["HAMAL_LOCAL_INVENTORY"] = str(work / "inventory")
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("local", ["local"])
    fleet.wait_worker_ready("period")
    fleet.wait_worker_ready("local")
    try:
        report.measured(
            results.sync[kind], disk, lambda: hamal(fleet, "sync", "--vm", VM, "--wait"),
            lambda r: r.seconds,
        )  # fmt: skip
        if kind == "replica":
            image = work / "replica" / "images" / vm_id_for(VM) / f"{DISK}.raw"
            problem = images.same_content(image, disk)
            print(f"  the replica itself: {'byte-identical' if problem is None else problem}")
        out = work / "restored.raw"
        args = ("restore", "--vm", VM, "--disk", DISK, "--point", "latest", "--to", str(out))
        report.measured(
            results.restore[kind], None, lambda: hamal(fleet, *args), lambda r: r.seconds
        )
        check_restore(f"Hamal ({kind})", out, disk)
    finally:
        fleet.stop("period")
        fleet.stop("local")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root) / "targets"
    images.remove_tree(root)
    print(report.header("bench/targets.py"))
    spec = images.MixedImage()
    base = root / "base.raw"
    base.parent.mkdir(parents=True)
    images.build_image(base, spec, IMAGE_SEED)
    shared = start_fleet(root / "fleet", base, None)
    results = Results(spec.size)
    try:
        for n in range(args.rounds):
            for kind in TARGETS:
                work = root / f"round{n + 1}" / kind
                disk = work / "inventory" / VM / DISK
                disk.parent.mkdir(parents=True)
                images.copy_sparse(base, disk)
                one_target(shared, kind, work, disk, results)
                if kind == "replica":
                    copy = work / "cp.raw"
                    report.measured(results.cp, disk, lambda d=disk, c=copy: cp_sparse(d, c))
                images.remove_tree(work)
            print(results.round_line(n), flush=True)
    finally:
        shared.fleet.stop_all()
    print("\n" + report.table(results.rows()))
    print("(MB/s: the image's 2 GiB apparent size over the median time)\n")
    print("Ratios of medians within this run (no targets):")
    for kind in ("encrypted", "replica"):
        for rows in (results.sync, results.restore):
            ratio = report.time_ratio(rows[kind], rows["plain"], 1.0)
            if ratio:
                print(f"  {ratio.name}: {ratio.value:.2f}x")
    peer = report.time_ratio(results.sync["replica"], results.cp, 1.0)
    if peer:
        print(f"  {peer.name}: {peer.value:.2f}x")
    images.remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
