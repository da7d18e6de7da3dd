"""FusionCompute: `hamal sync --wait` of a 2 GiB VM disk through the backup socket against a
plain read of the same snapshot file through the same simulator socket, in one run.

    .venv/bin/python bench/fusion.py [--rounds 3]      (also: make bench)

The project's FusionCompute simulator (a VRM over HTTPS and a CNA host's backup sockets, in
this process's threads) serves one VM whose disk is a 2 GiB sparse file with the mixed
content of bench/images.py (40% random, 30% compressible, 30% never written). A LocalFleet
(period and fusion workers, no beat, hamal.conf's defaults otherwise) syncs it. Each round,
from an empty Redis and a new chunk store each time:

  hamal sync --vm V --wait   (transport lanssl)   CBTbackup snapshot, getcbt, a backup
                                                  resource, socket reads (TLS), store
  one socket, OP_READ 4 MiB from 0 to the end     the snapshot Hamal just made, through a
                                                  backup resource of its own over the same
                                                  host's TLS port: open, read every byte,
                                                  CRC checked, discarded, close
  hamal sync --vm V --wait   (transport lan)      the same over the plain port
  one socket, OP_READ 4 MiB ... (plain)           the same over the plain port

and each point is restored with `hamal restore` and compared with the disk. The peer reads
every byte of the 2 GiB over one connection, one request at a time; Hamal reads the
allocated 70% (getcbt marks it) over several connections, and also hashes, compresses and
writes what it reads. The engine's own seconds are printed beside the whole path, which
also holds the CLI, the VRM calls, the snapshot -- in this simulator a sparse copy of the
disk's file, where a CNA host only starts a delta -- and Celery's hops. A benchmark, not a
test: it exits 0 on a MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import images, report  # noqa: E402
from bench.peers import PeerError, Ran  # noqa: E402
from bench.runs import hamal, last_disk, phases, seconds_of  # noqa: E402
from hamal_workers.localfleet import FleetError, LocalFleet  # noqa: E402
from hamal_workers.platforms import fusion_wire as wire  # noqa: E402
from hamal_workers.simulators.fusion_compute import FusionComputeSimulator  # noqa: E402

GiB = images.GiB
MiB = images.MiB
IMAGE_SEED = 20240601
VM = "bench-vm"
TARGET = 1.5  # Hamal's full throughput / the one-connection read's, at least
MODES = ("lanssl", "lan")
POLL_S = 0.05


class Results(report.Rows):
    def __init__(self, image_bytes: int) -> None:
        super().__init__(image_bytes)
        row = self.row
        self.lanssl = row("Hamal", "sync --wait, full, lanssl")
        self.lanssl_engine = row("Hamal", "  of which the disk task's engine")
        self.lanssl_peer = row("socket", "OP_READ 4 MiB, 1 connection, TLS")
        self.lan = row("Hamal", "sync --wait, full, lan")
        self.lan_engine = row("Hamal", "  of which the disk task's engine")
        self.lan_peer = row("socket", "OP_READ 4 MiB, 1 connection, plain")
        self.restore = row("Hamal", "restore --point latest")
        self.details: list[str] = []
        self.sockets: dict[str, list[tuple[int, int]]] = {m: [] for m in MODES}
        self.phases: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}

    def of(self, mode: str) -> tuple[report.Measured, report.Measured, report.Measured]:
        """(Hamal's sync, its engine, the peer) of a transport mode."""
        if mode == "lanssl":
            return self.lanssl, self.lanssl_engine, self.lanssl_peer
        return self.lan, self.lan_engine, self.lan_peer


PHASES = (
    ("until_run", "CLI start -> run `started` (CLI, vm.sync, VRM lookup)"),
    ("snapshot", "run `started` -> disk `dispatched_at` (CBTbackup snapshot: a sparse copy here)"),
    ("until_disk_task", "disk `dispatched_at` -> `started_at` (queue, fusion worker)"),
    ("engine", "disk `seconds` (getcbt, backup resource, socket reads, hash, compress, store)"),
    ("until_finished", "the rest -> run `finished` (stage, finalize, resource released)"),
    ("until_cli_exit", "run `finished` -> CLI exit (its poll)"),
)


# --- the peer: a plain read over the backup socket ---------------------------------------


class Vrm:
    """Just enough of the VRM's REST API for the peer: a session, the VM, its snapshots,
    a backup resource."""

    def __init__(self, sim: FusionComputeSimulator) -> None:
        self.base = sim.base_url
        self.http = requests.Session()
        self.http.trust_env = False  # REQUESTS_CA_BUNDLE would win over `verify`
        self.http.verify = str(sim.ca_file)
        self.http.headers["Accept"] = wire.ACCEPT.format(version="8.0")
        self.http.headers["Content-Type"] = "application/json;charset=UTF-8"
        answer = self.http.post(
            self.base + wire.API_PREFIX + "/session",
            headers={
                "X-Auth-User": sim.user,
                "X-Auth-Key": hashlib.sha256(sim.password.encode()).hexdigest(),
                "X-Auth-UserType": "2",
                "X-ENCRIPT-ALGORITHM": wire.KEY_ALGORITHM_SHA256,
            },
            json={},
            timeout=30,
        )
        if answer.status_code != 200 or not answer.headers.get("X-Auth-Token"):
            raise PeerError(f"login to the VRM: HTTP {answer.status_code} {answer.text[:200]}")
        self.http.headers["X-Auth-Token"] = answer.headers["X-Auth-Token"]

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        answer = self.http.request(method, self.base + path, json=body, timeout=60)
        if answer.status_code != 200:
            raise PeerError(f"{method} {path}: HTTP {answer.status_code} {answer.text[:300]}")
        found = answer.json()
        return found if isinstance(found, dict) else {}

    def logout(self) -> None:
        with contextlib.suppress(requests.RequestException):
            self.http.delete(self.base + wire.API_PREFIX + "/session", timeout=10)
        self.http.close()

    def site_uri(self) -> str:
        return str(self.call("GET", wire.API_PREFIX + "/sites")["sites"][0]["uri"])

    def vm_uri(self, vm_uuid: str) -> str:
        page = self.call("GET", f"{self.site_uri()}/vms?uuid={vm_uuid}&limit=1&offset=0")
        return str(page["vms"][0]["uri"])

    def snapshots(self, vm_uri: str) -> list[dict[str, Any]]:
        todo = list(self.call("GET", f"{vm_uri}/snapshots").get("rootSnapshots") or [])
        found = []
        while todo:
            item = todo.pop()
            found.append(item)
            todo.extend(item.get("childSnapshots") or [])
        return found

    def wait_task(self, task_uri: str) -> None:
        deadline = time.monotonic() + 600
        while True:
            status = self.call("GET", task_uri).get("status")
            if status == "success":
                return
            if status != "running" or time.monotonic() > deadline:
                raise PeerError(f"the task {task_uri} is {status}")
            time.sleep(POLL_S)

    def delete_snapshots(self, vm_uri: str) -> int:
        """Every snapshot of the VM gone (Hamal keeps its newest as the next sync's base)."""
        snapshots = self.snapshots(vm_uri)
        for snap in snapshots:
            self.wait_task(str(self.call("DELETE", str(snap["uri"]))["taskUri"]))
        return len(snapshots)


def open_resource(vrm: Vrm, snap: dict[str, Any], mode: str) -> tuple[str, dict[str, Any]]:
    """A backup resource of the snapshot's one volume, ready: (its uri, its answer)."""
    (vol,) = vrm.call("GET", str(snap["uri"]))["volsnapshots"]
    volume_uri = str(vol["volumeUri"])
    site_uri, volume_id = volume_uri.rsplit("/volumes/", 1)
    body = {"delay": 600, "taskType": "CBTBackup", "ip": "127.0.0.1", "snapUrn2": snap["urn"],
            "volCBTCreateTime": vol["volCBTCreateTime"], "transMode": mode}  # fmt: skip
    uri = str(vrm.call("POST", f"{site_uri}/volumes/{volume_id}/backupresources", body)["uri"])
    deadline = time.monotonic() + 60
    while True:
        info = vrm.call("GET", uri)
        if info.get("status") == "success":
            info["size"] = int(vrm.call("GET", volume_uri)["size"])
            return uri, info
        if time.monotonic() > deadline:
            vrm.call("DELETE", uri)
            raise PeerError(f"the backup resource {uri} is still {info.get('status')}")
        time.sleep(POLL_S)


def plain_read(info: dict[str, Any], tls: bool) -> float:
    """Read the whole file behind a backup resource over one socket, 4 MiB at a time, each
    answer's CRC checked and its data discarded; seconds from connect to close."""
    size = int(info["size"])
    buffer = memoryview(bytearray(wire.READ_REPLY.size + wire.ASSUMED_MAX_READ))
    started = time.perf_counter()
    sock = socket.create_connection((str(info["hostIP"]), int(info["hostPort"])), timeout=60)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            context = ssl.create_default_context(cadata=str(info["caCert"]))
            sock = context.wrap_socket(sock, server_hostname=str(info["hostIP"]))
        sequence = 1

        def call(operation: int, body: bytes) -> memoryview:
            nonlocal sequence
            sequence += 1
            sock.sendall(wire.frame(operation, sequence, body))
            header = wire.recv_header(sock)
            if header.operation != operation or header.sequence != sequence:
                raise PeerError(f"an answer to {header.operation} #{header.sequence}")
            return wire.recv_body(sock, header, buffer)  # the CRC is checked here

        name, token = str(info["targetFile"]).encode(), str(info["token"]).encode()
        result, handle = wire.OPEN_REPLY.unpack(call(wire.OP_OPEN, wire.OPEN_REQUEST.pack(
            name, token, 0)))  # fmt: skip
        if result != wire.OK:
            raise PeerError(f"OP_OPEN: {wire.result_text(result)}")
        offset = 0
        while offset < size:
            want = min(wire.ASSUMED_MAX_READ, size - offset)
            body = call(wire.OP_READ, wire.READ_REQUEST.pack(handle, offset, want))
            result, length = wire.READ_REPLY.unpack_from(body)
            if result != wire.OK or length != want or len(body) != wire.READ_REPLY.size + want:
                raise PeerError(f"OP_READ at {offset}: {wire.result_text(result)}, {length} bytes")
            offset += length
        (result,) = wire.CLOSE_REPLY.unpack(call(wire.OP_CLOSE, wire.CLOSE_REQUEST.pack(handle)))
        if result != wire.OK:
            raise PeerError(f"OP_CLOSE: {wire.result_text(result)}")
    except (OSError, wire.WireError) as exc:
        raise PeerError(f"the plain read: {exc}") from None
    finally:
        sock.close()
    return time.perf_counter() - started


def peer_read(vrm: Vrm, ctx: dict[str, Any], mode: str, row: report.Measured) -> None:
    """The peer over `mode`, from the snapshot Hamal just left as its base."""
    (snap,) = vrm.snapshots(ctx["vm_uri"])
    uri, info = open_resource(vrm, snap, mode)
    try:
        snap_id = str(snap["urn"]).rsplit(":", 1)[-1]
        frozen = next((ctx["sim"].directory / "snapshots" / snap_id).glob("*.img"), None)
        report.measured(row, frozen, lambda: plain_read(info, mode == "lanssl"))
    finally:
        vrm.call("DELETE", uri)


# --- Hamal --------------------------------------------------------------------------------


def sync(fleet: LocalFleet) -> Ran:
    return hamal(fleet, "sync", "--vm", VM, "--wait")


def one_mode(
    fleet: LocalFleet, overrides: dict[str, str], mode: str, ctx: dict[str, Any],
    results: Results, work: Path,
) -> None:  # fmt: skip
    """A full sync from nothing over one transport mode, the peer, and the restore checked."""
    sim: FusionComputeSimulator = ctx["sim"]
    row, engine_row, peer_row = results.of(mode)
    redis.Redis.from_url(fleet.redis_url).flushall()
    overrides["HAMAL_FUSION_COMPUTE_TRANSPORT_MODE"] = mode
    overrides["HAMAL_TARGET_PATH"] = str(work / f"store-{mode}")
    fleet.start_worker("period", ["period"], concurrency=2)
    fleet.start_worker("fusion", ["fusion"])
    vrm = Vrm(sim)
    try:
        fleet.wait_worker_ready("period")
        fleet.wait_worker_ready("fusion")
        sim.reset_connection_stats()
        ran = report.measured(row, ctx["disk"], lambda: sync(fleet), seconds_of)
        results.sockets[mode].append((sim.max_open_connections(), sim.bytes_served))
        results.phases[mode].append(phases(fleet, ctx["vm_id"], ran))
        _, disk, fields = last_disk(fleet, ctx["vm_id"])
        engine_row.seconds.append(float(fields.get("seconds") or 0))
        results.details.append(
            f"{mode}: {fields.get('mode')}, {int(fields.get('chunks_read') or 0)} chunks read, "
            f"{int(fields.get('chunks_new') or 0)} stored, "
            f"{int(fields.get('bytes_stored') or 0) / MiB:.0f} MiB written"
        )

        sim.reset_connection_stats()
        peer_read(vrm, ctx, mode, peer_row)
        if sim.bytes_served != ctx["size"]:
            raise PeerError(f"the plain read got {sim.bytes_served} bytes of {ctx['size']}")

        out = work / "restored.raw"
        args = ("restore", "--vm", VM, "--disk", disk, "--point", "latest", "--to", str(out))
        report.measured(results.restore, None, lambda: hamal(fleet, *args), seconds_of)
        differs = images.same_content(out, ctx["disk"])
        out.unlink()
        verdict = "byte-identical to the disk" if differs is None else f"DIFFERS: {differs}"
        print(f"    {mode}: Hamal's restore: {verdict}", flush=True)
    finally:
        fleet.stop("period")
        fleet.stop("fusion")
        # The next sync starts from nothing: no base snapshot, no resource left.
        with contextlib.suppress(PeerError, requests.RequestException):
            vrm.delete_snapshots(ctx["vm_uri"])
        vrm.logout()
        images.remove_tree(work / f"store-{mode}")


def one_round(
    n: int, work: Path, fleet: LocalFleet, overrides: dict[str, str], ctx: dict[str, Any],
    results: Results,
) -> None:  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    try:
        for mode in MODES:
            one_mode(fleet, overrides, mode, ctx, results, work)
    except (PeerError, FleetError) as exc:
        print(f"round {n + 1} stopped, its numbers are incomplete: {exc}")
    finally:
        images.remove_tree(work)
    print(results.round_line(n), flush=True)


def print_results(results: Results) -> None:
    print("\n" + report.table(results.rows()))
    print("(MB/s: the disk's 2 GiB apparent size over the median time)\n")
    print("Targets (ratios of medians within this run):")
    for mode in MODES:
        ours, engine, peer = results.of(mode)
        goal = report.throughput_ratio(ours, peer, TARGET)
        print(f"  {mode}: " + (goal.line() if goal else "n/a: a tool has no numbers"))
    for mode in MODES:
        ours, engine, peer = results.of(mode)
        goal = report.throughput_ratio(engine, peer, 1.0)
        if goal:
            print(f"  (engine only) {mode} throughput / its peer's: {goal.value:.2f}x")
    print(
        "  note: Hamal's figures are end to end (CLI, VRM calls, the snapshot -- a sparse copy "
        "of the disk's file in this simulator -- Celery, commit); the peer's are the socket "
        "read alone, one request at a time. Hamal reads the allocated 70% over several "
        "connections and hashes, compresses and writes it; the peer reads all 2 GiB over one "
        "and writes nothing."
    )
    for mode, seen in results.sockets.items():
        if seen:
            most = ", ".join(str(m) for m, _ in seen)
            served = ", ".join(f"{b / MiB:.0f}" for _, b in seen)
            print(f"  {mode}: Hamal's sockets open at once at most: {most}; "
                  f"MiB the host served it: {served}")  # fmt: skip
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
    root = Path(args.root) / "fusion-bench"
    images.remove_tree(root)
    print(report.header("bench/fusion.py"))
    spec = images.MixedImage(size=args.size_gib * GiB)
    sim = FusionComputeSimulator(root / "fusion")
    fleet: LocalFleet | None = None
    try:
        sim.start()
        vm_id = sim.add_vm(VM, [spec.size])
        disk = sim.disk_path(vm_id, 0)
        started = time.perf_counter()
        # Written straight into the volume's file before any snapshot: the first sync reads
        # every allocated block of its snapshot, whatever CBT marked.
        counts = images.build_image(disk, spec, IMAGE_SEED)
        print(
            f"disk {spec.size // GiB} GiB ({disk.name}): {counts['random']} random, "
            f"{counts['text']} compressible, {counts['hole']} unwritten pieces of 4 MiB, "
            f"written in {time.perf_counter() - started:.1f} s\n",
            flush=True,
        )
        os.sync()  # written back and cached, as a disk at rest is: no round pays for it
        images.read_through(disk)
        overrides = {
            "HAMAL_PERIOD_INTERVAL": "3600",
            "HAMAL_LOCAL_INVENTORY": "",
            "HAMAL_FUSION_COMPUTE_VRM_HOST": "127.0.0.1",
            "HAMAL_FUSION_COMPUTE_VRM_PORT": str(sim.port),
            "HAMAL_FUSION_COMPUTE_USER": sim.user,
            "HAMAL_FUSION_COMPUTE_PASSWORD": sim.password,
            "HAMAL_FUSION_COMPUTE_CA_FILE": str(sim.ca_file),
            "HAMAL_FUSION_COMPUTE_LOCAL_HOST_IP": "127.0.0.1",
        }
        fleet = LocalFleet(root / "fleet", overrides)
        fleet.start_redis()
        fleet.apply_env()
        vrm = Vrm(sim)
        try:
            vm_uri = vrm.vm_uri(vm_id)
        finally:
            vrm.logout()
        ctx = {"sim": sim, "vm_id": vm_id, "vm_uri": vm_uri, "disk": disk, "size": spec.size}
        results = Results(spec.size)
        for n in range(args.rounds):
            one_round(n, root / f"round{n + 1}", fleet, overrides, ctx, results)
        print_results(results)
    finally:
        if fleet is not None:
            fleet.stop_all()
        sim.stop()
        images.remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
