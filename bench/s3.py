"""S3: `hamal sync --wait` of a 2 GiB disk into a bucket and `hamal restore` from it, against
boto3's `upload_file` and `download_file` of the same image, on one loopback S3 server.

    .venv/bin/python bench/s3.py [--rounds 3]      (also: make bench)

moto's S3 server (hamal_workers/testbeds/s3.py) on 127.0.0.1; the local platform's VM
with the 2 GiB mixed image of bench/images.py (40% random, 30% compressible, 30% holes);
a LocalFleet (period and local workers, no beat) whose `[target] type = s3`. Each round,
into a new prefix and from an empty Redis:

  hamal sync --vm V --wait              full: holes skipped, chunks compressed, uploaded
                                        by the writer threads, manifests and record last
  boto3 upload_file                     the image as one object (managed multipart,
                                        boto3's default concurrency)
  hamal restore --point latest          every chunk fetched and written to a file
  boto3 download_file                   the object back to a file

Both restores are compared with the image. A benchmark, not a test: it exits 0 on a MISS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report  # noqa: E402
from bench.peers import PeerError  # noqa: E402
from bench.runs import hamal, last_disk, seconds_of  # noqa: E402
from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.testbeds import s3 as testbed  # noqa: E402

GiB = images.GiB
IMAGE_SEED = 20240601
VM = "bench-vm"
DISK = "disk0.raw"
SYNC_TARGET = 1.5  # Hamal's full throughput / upload_file's, at least
RESTORE_TARGET = 1.0  # Hamal's restore throughput / download_file's, at least


class Results(report.Rows):
    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.hamal_sync = row("Hamal", "sync --wait, full, into S3")
        self.hamal_engine = row("Hamal", "  of which the disk task's engine")
        self.upload = row("boto3", "upload_file (multipart, default)")
        self.upload_one = row("boto3", "upload_file (one request)")
        self.hamal_restore = row("Hamal", "restore --point latest")
        self.download = row("boto3", "download_file (ranged, default)")
        self.download_one = row("boto3", "download_file (one request)")


def timed(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - started


def engine_seconds(fleet: LocalFleet) -> float:
    from hamal_workers.platforms.local import vm_id_for

    _, _, fields = last_disk(fleet, vm_id_for(VM))
    return float(fields.get("seconds") or 0)


def check(tool: str, out: Path, source: Path) -> None:
    problem = images.same_content(out, source)
    out.unlink()
    print(f"  {tool} restore: {'byte-identical to the image' if problem is None else problem}")


def one_round(
    n: int, work: Path, fleet: LocalFleet, overrides: dict[str, str], server: testbed.S3Server,
    image: Path, results: Results, args_ranged: bool,
) -> None:  # fmt: skip
    redis.Redis.from_url(fleet.redis_url).flushall()
    overrides["HAMAL_S3_PREFIX"] = f"round-{n + 1}"
    client = server.client()
    work.mkdir(parents=True, exist_ok=True)
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("local", ["local"])
    try:
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("local")
        report.measured(results.hamal_sync, image,
                        lambda: hamal(fleet, "sync", "--vm", VM, "--wait"), seconds_of)  # fmt: skip
        results.hamal_engine.seconds.append(engine_seconds(fleet))
        from boto3.s3.transfer import TransferConfig

        # Its default (multipart, ranged, threads) and one request each way: the peer's
        # figure is the faster of the two, since moto serves many ranges of one object slowly.
        whole = TransferConfig(multipart_threshold=8 * GiB)
        key, key_one = f"peer/round-{n + 1}.raw", f"peer/round-{n + 1}-one.raw"
        report.measured(results.upload, image,
                        lambda: timed(lambda: client.upload_file(str(image), "hamal", key)))  # type: ignore[attr-defined]  # fmt: skip
        report.measured(results.upload_one, image, lambda: timed(
            lambda: client.upload_file(str(image), "hamal", key_one, Config=whole)))  # type: ignore[attr-defined]  # fmt: skip

        out = work / "hamal.raw"
        args = ("restore", "--vm", VM, "--disk", DISK, "--point", "latest", "--to", str(out))
        report.measured(results.hamal_restore, None, lambda: hamal(fleet, *args), seconds_of)
        check("Hamal", out, image)
        peer_out = work / "boto3.raw"
        report.measured(results.download_one, None, lambda: timed(
            lambda: client.download_file("hamal", key_one, str(peer_out), Config=whole)))  # type: ignore[attr-defined]  # fmt: skip
        check("boto3 (one request)", peer_out, image)
        if args_ranged:
            report.measured(results.download, None, lambda: timed(
                lambda: client.download_file("hamal", key, str(peer_out))))  # type: ignore[attr-defined]  # fmt: skip
            check("boto3 (ranged)", peer_out, image)
        client.delete_object(Bucket="hamal", Key=key)  # type: ignore[attr-defined]
        client.delete_object(Bucket="hamal", Key=key_one)  # type: ignore[attr-defined]
    except (PeerError, FleetError) as exc:
        print(f"round {n + 1} stopped, its numbers are incomplete: {exc}")
    finally:
        fleet.stop("period")
        fleet.stop("local")
        images.remove_tree(work)
    print(results.round_line(n), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=int, default=2)
    parser.add_argument(
        "--ranged-download", action="store_true",
        help="also time download_file's default ranged download (minutes against moto)",
    )  # fmt: skip
    args = parser.parse_args()
    root = Path(args.root) / "s3-bench"
    images.remove_tree(root)
    print(report.header("bench/s3.py"))
    spec = images.MixedImage(size=args.size_gib * GiB)
    image = root / "inventory" / VM / DISK
    counts = images.build_image(image, spec, IMAGE_SEED)
    os.sync()
    images.read_through(image)
    print(f"image {spec.size // GiB} GiB: {counts['random']} random, {counts['text']} "
          f"compressible, {counts['hole']} holes in 4 MiB pieces\n", flush=True)  # fmt: skip
    server = testbed.start(root / "s3")
    fleet: LocalFleet | None = None
    try:
        server.create_bucket("hamal")
        overrides = {
            "HAMAL_PERIOD_INTERVAL": "3600",
            "HAMAL_LOCAL_INVENTORY": str(root / "inventory"),
            "HAMAL_TARGET_TYPE": "s3",
            "HAMAL_S3_ENDPOINT_URL": server.endpoint_url,
            "HAMAL_S3_BUCKET": "hamal",
            "HAMAL_S3_ACCESS_KEY": server.access_key,
            "HAMAL_S3_SECRET_KEY": server.secret_key,
        }
        fleet = LocalFleet(root / "fleet", overrides)
        fleet.start_redis()
        fleet.apply_env()
        results = Results(spec.size)
        for n in range(args.rounds):
            one_round(n, root / f"round{n + 1}", fleet, overrides, server, image, results,
                      args.ranged_download)  # fmt: skip
        print("\n" + report.table(results.rows()))
        print("(MB/s: the image's apparent size over the median time)\n")
        print("Targets (ratios of medians within this run):")

        def faster(*rows: report.Measured) -> report.Measured:
            return min((r for r in rows if r.seconds), key=lambda r: r.median, default=rows[0])

        upload = faster(results.upload, results.upload_one)
        download = faster(results.download_one, results.download)
        for ours, peer, wanted in ((results.hamal_sync, upload, SYNC_TARGET),
                                   (results.hamal_restore, download, RESTORE_TARGET)):  # fmt: skip
            goal = report.throughput_ratio(ours, peer, wanted)
            print("  " + (goal.line() if goal else "n/a: a tool has no numbers"))
        engine = report.throughput_ratio(results.hamal_engine, upload, 1.0)
        if engine:
            print(f"  (engine only) full sync throughput / upload_file: {engine.value:.2f}x")
        print("  note: the server is moto's, in one Python process on the same two cores; "
              "Hamal uploads the 70% that is not holes, compressed where that pays.")  # fmt: skip
    finally:
        if fleet is not None:
            fleet.stop_all()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
