"""VMware: `hamal sync --wait` of a 2 GiB VM disk over each transport against the plain copy
of the same bytes from the same vCenter simulator, in one run.

    .venv/bin/python bench/vmware.py [--rounds 3]      (also: make bench)

The project's vCenter simulator serves one VM whose disk is a 2 GiB flat file with the
mixed content of bench/images.py (40% random, 30% compressible, 30% never written). A
LocalFleet (period and vmware workers, no beat) syncs it. Each round, from an empty Redis
and a new chunk store each time:

  hamal sync --vm V --wait   (transport https)  snapshot, CBT `*`, range reads, store
  curl of the disk's flat file                   the same file over the same /folder
                                                 interface with a session cookie, to
                                                 /dev/null
  hamal sync --vm V --wait   (transport nbd)    snapshot, CBT `*`, nbdkit + libnbd
  nbdcopy -- [ nbdkit -r file ... ] null:        the same file served by nbdkit, copied
                                                 by libnbd's own copier to nothing

and each point is restored with `hamal restore` and compared with the disk. The peers copy
every byte of the 2 GiB; Hamal reads the allocated 70%, and also hashes, compresses and
writes what it reads. The engine's own seconds are printed beside the whole path, which
also holds the CLI, vCenter calls, the snapshot -- in this simulator a full copy of the
disk's file, where vSphere only starts a delta -- and Celery's hops. A benchmark, not a
test: it exits 0 on a MISS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import statistics
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
from hamal_workers.platforms.vmware_transport import folder_url  # noqa: E402
from hamal_workers.testbeds import vcenter as testbed  # noqa: E402

GiB = images.GiB
MiB = images.MiB
IMAGE_SEED = 20240601
VM = "DC0_H0_VM0"
TARGET = 0.8  # Hamal's full throughput / the plain copy's, at least, over each transport


class Results(report.Rows):
    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.https = row("Hamal", "sync --wait, full, https")
        self.https_engine = row("Hamal", "  of which the disk task's engine")
        self.curl = row("curl", "GET /folder (cookie) > /dev/null")
        self.nbd = row("Hamal", "sync --wait, full, nbd")
        self.nbd_engine = row("Hamal", "  of which the disk task's engine")
        self.nbdcopy = row("nbdcopy", "-- [ nbdkit -r file ] null:")
        self.restore = row("Hamal", "restore --point latest")
        self.details: list[str] = []
        self.phases: dict[str, list[dict[str, float]]] = {"https": [], "nbd": []}


PHASES = (
    ("until_run", "CLI start -> run `started` (CLI, vm.sync, vCenter lookup)"),
    ("snapshot", "run `started` -> disk `dispatched_at` (CBT check, snapshot: a 2 GiB copy here)"),
    ("until_disk_task", "disk `dispatched_at` -> `started_at` (queue, vmware worker)"),
    ("engine", "disk `seconds` (plan, QueryChangedDiskAreas, read, hash, compress, store)"),
    ("until_finished", "the rest -> run `finished` (stage, finalize, snapshot removed)"),
    ("until_cli_exit", "run `finished` -> CLI exit (its poll)"),
)


def sync(fleet: LocalFleet) -> Ran:
    return hamal(fleet, "sync", "--vm", VM, "--wait")


def session_cookie(vc: testbed.VCenter) -> str:
    from pyVim.connect import SmartConnect

    context = ssl.create_default_context(cafile=str(vc.ca_file))
    si = SmartConnect(host=vc.host, port=vc.port, user=vc.user, pwd=vc.password,
                      sslContext=context)  # fmt: skip
    return str(si._stub.cookie).split(";", 1)[0]


def one_sync(
    fleet: LocalFleet, overrides: dict[str, str], transport: dict[str, str], ctx: dict[str, Any],
    row: report.Measured, engine_row: report.Measured, name: str, results: Results, work: Path,
) -> None:  # fmt: skip
    """A full sync from nothing over one transport, and its restore checked."""
    redis.Redis.from_url(fleet.redis_url).flushall()
    overrides.update(transport)
    overrides["HAMAL_TARGET_PATH"] = str(work / f"store-{name}")
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("vmware", ["vmware"])
    try:
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("vmware")
        ran = report.measured(row, None, lambda: sync(fleet), seconds_of)
        results.phases[name].append(phases(fleet, ctx["vm_id"], ran))
        _, disk, fields = last_disk(fleet, ctx["vm_id"])
        engine_row.seconds.append(float(fields.get("seconds") or 0))
        results.details.append(
            f"{name}: {fields.get('mode')}, {int(fields.get('chunks_read') or 0)} chunks read, "
            f"{int(fields.get('chunks_new') or 0)} stored, "
            f"{int(fields.get('bytes_stored') or 0) / MiB:.0f} MiB written"
        )
        out = work / "restored.raw"
        args = ("restore", "--vm", VM, "--disk", disk, "--point", "latest", "--to", str(out))
        report.measured(results.restore, None, lambda: hamal(fleet, *args), seconds_of)
        differs = images.same_content(out, ctx["flat"])
        out.unlink()
        verdict = "byte-identical to the disk" if differs is None else f"DIFFERS: {differs}"
        print(f"    {name}: Hamal's restore: {verdict}", flush=True)
    finally:
        fleet.stop("period")
        fleet.stop("vmware")
        shutil.rmtree(work / f"store-{name}", ignore_errors=True)


def one_round(
    n: int, work: Path, fleet: LocalFleet, overrides: dict[str, str], ctx: dict[str, Any],
    results: Results,
) -> None:  # fmt: skip
    vc: testbed.VCenter = ctx["vc"]
    work.mkdir(parents=True, exist_ok=True)
    try:
        https = {"HAMAL_VMWARE_TRANSPORT": "https"}
        one_sync(fleet, overrides, https, ctx, results.https, results.https_engine, "https",
                 results, work)  # fmt: skip
        cookie = session_cookie(vc)
        url = folder_url(vc.host, vc.port, ctx["file"], "DC0")
        curl = ["curl", "-sS", "--fail", "--cacert", str(vc.ca_file), "-b", cookie, "-o",
                "/dev/null", url]  # fmt: skip
        report.measured(results.curl, None, lambda: to_null(curl))

        mounts = ",".join(f"{name}={path}" for name, path in vc.datastores.items())
        nbd = {"HAMAL_VMWARE_TRANSPORT": "nbd", "HAMAL_VMWARE_NBD_PLUGIN": "file",
               "HAMAL_VMWARE_DATASTORE_MOUNTS": mounts}  # fmt: skip
        one_sync(fleet, overrides, nbd, ctx, results.nbd, results.nbd_engine, "nbd", results,
                 work)  # fmt: skip
        nbdcopy = ["nbdcopy", "--", "[", "nbdkit", "-r", "file", f"file={ctx['flat']}", "]",
                   "null:"]  # fmt: skip
        report.measured(results.nbdcopy, None, lambda: to_null(nbdcopy))
    except (PeerError, FleetError) as exc:
        print(f"round {n + 1} stopped, its numbers are incomplete: {exc}")
    finally:
        images.remove_tree(work)
    print(results.round_line(n), flush=True)


def print_results(results: Results) -> None:
    print("\n" + report.table(results.rows()))
    print("(MB/s: the disk's 2 GiB apparent size over the median time)\n")
    print("Targets (ratios of medians within this run):")
    for ours, peer, what in ((results.https, results.curl, "https"),
                             (results.nbd, results.nbdcopy, "nbd")):  # fmt: skip
        goal = report.throughput_ratio(ours, peer, TARGET)
        print(f"  {what}: " + (goal.line() if goal else "n/a: a tool has no numbers"))
    for engine, peer, what in ((results.https_engine, results.curl, "https"),
                               (results.nbd_engine, results.nbdcopy, "nbd")):  # fmt: skip
        goal = report.throughput_ratio(engine, peer, 1.0)
        if goal:
            print(f"  (engine only) {what} throughput / its peer's: {goal.value:.2f}x")
    print(
        "  note: Hamal's figures are end to end (CLI, vCenter calls, the snapshot -- a full "
        "copy of the disk's file in this simulator -- Celery, commit, snapshot removal); the "
        "peers' are the copy alone. Hamal reads the allocated 70% and hashes, compresses and "
        "writes it; the peers read all 2 GiB and write nothing."
    )
    for line in dict.fromkeys(results.details):
        print(f"  {line}")
    for what, runs in results.phases.items():
        if not runs:
            continue
        print(f"\nWhere `hamal sync --wait` spends its time, {what} (medians of {len(runs)}):")
        for name, label in PHASES:
            print(f"  {label:<86} {statistics.median(r[name] for r in runs):6.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO / ".bench"), help="working directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=int, default=2)
    args = parser.parse_args()
    root = Path(args.root) / "vmware-bench"
    images.remove_tree(root)
    print(report.header("bench/vmware.py"))
    missing = testbed.missing_tools() + [t for t in ("curl", "nbdcopy", "nbdkit")
                                         if shutil.which(t) is None]  # fmt: skip
    if missing:
        print(f"VMware: NOT MEASURED, tools missing ({', '.join(missing)}): "
              "run scripts/setup-vmware.sh")  # fmt: skip
        return 0
    spec = images.MixedImage(size=args.size_gib * GiB)
    vc = testbed.start(root / "vcenter", vms=1, disk_mib=args.size_gib * 1024)
    fleet: LocalFleet | None = None
    try:
        from pyVim.connect import SmartConnect
        from pyVmomi import vim

        context = ssl.create_default_context(cafile=str(vc.ca_file))
        si = SmartConnect(host=vc.host, port=vc.port, user=vc.user, pwd=vc.password,
                          sslContext=context)  # fmt: skip
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        (vm,) = [v for v in view.view if v.name == VM]
        (disk,) = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        file_name = disk.backing.fileName
        store, rel = file_name[1:].split("] ", 1)
        flat = vc.datastores[store] / (rel[: -len(".vmdk")] + "-flat.vmdk")
        started = time.perf_counter()
        counts = images.build_image(flat, spec, IMAGE_SEED)
        print(
            f"disk {spec.size // GiB} GiB ({flat.name}): {counts['random']} random, "
            f"{counts['text']} compressible, {counts['hole']} unwritten pieces of 4 MiB, "
            f"written in {time.perf_counter() - started:.1f} s\n",
            flush=True,
        )
        os.sync()  # written back and cached, as a disk at rest is: no round pays for it
        images.read_through(flat)
        overrides = {
            "HAMAL_PERIOD_INTERVAL": "3600",
            "HAMAL_LOCAL_INVENTORY": "",
            "HAMAL_VMWARE_HOST": vc.host,
            "HAMAL_VMWARE_PORT": str(vc.port),
            "HAMAL_VMWARE_USER": vc.user,
            "HAMAL_VMWARE_PASSWORD": vc.password,
            "HAMAL_VMWARE_CA_FILE": str(vc.ca_file),
        }
        fleet = LocalFleet(root / "fleet", overrides)
        fleet.start_redis()
        fleet.apply_env()
        ctx = {"vc": vc, "vm_id": vm.config.instanceUuid, "file": file_name, "flat": flat}
        results = Results(spec.size)
        for n in range(args.rounds):
            one_round(n, root / f"round{n + 1}", fleet, overrides, ctx, results)
        print_results(results)
    finally:
        if fleet is not None:
            fleet.stop_all()
        vc.stop()
        images.remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
