"""A real one-monitor, one-OSD Ceph cluster on 127.0.0.1, in one directory, for tests and benches.

    python -m hamal_workers.testbeds.ceph up DIR [--pools volumes,vms] [--memstore-mib N]
    python -m hamal_workers.testbeds.ceph down DIR

Everything lives under DIR: ceph.conf, keyrings, the monitor's store, the OSD (memstore:
its data is in its RAM, so the cluster costs no disk), pid, log and admin socket files.
The monitor listens on a free port, so clusters of several runs can live side by side.
No systemd and no mgr (RBD I/O does not need one; the health warning is muted).

Ceph comes from Debian's packages (ceph-mon, ceph-osd, ceph-common); `scripts/setup-ceph.sh`
installs them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph-authtool", "ceph", "rbd")


class CephTestbedError(Exception):
    pass


@dataclass(frozen=True)
class CephCluster:
    """A running test cluster: what a client needs to reach it."""

    directory: Path
    port: int

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def keyring(self) -> Path:
        return self.directory / "client.admin.keyring"

    client_id = "admin"

    def env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf), "CEPH_ARGS": f"--id {self.client_id}"}

    def cli(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run `ceph` or `rbd` against this cluster; the output, or a CephTestbedError."""
        cmd = [*args, "--conf", str(self.conf), "--keyring", str(self.keyring)]
        return _run(cmd, timeout, check)


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None]


def _run(cmd: list[str], timeout: float = 60, check: bool = True) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CephTestbedError(f"{' '.join(cmd)}: no answer within {timeout:g} s") from exc
    if check and done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise CephTestbedError(f"{' '.join(cmd)} exited {done.returncode}: {tail}")
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf(
    directory: Path, port: int, fsid: str, memstore_bytes: int, propose_interval: float
) -> str:
    d = directory
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port}]
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
ms bind ipv6 = false

[mon]
mon data = {d}/mon/ceph-$id
# A snapshot id is allocated through the monitor's next map, proposed every second by
# default: every snapshot created or removed would wait that long. One client, one OSD:
# proposing at once costs nothing here.
paxos propose interval = {propose_interval}
admin socket = {d}/run/$cluster-$name.asok

[osd]
osd data = {d}/osd/ceph-$id
admin socket = {d}/run/$cluster-$name.asok
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd max object name len = 256
osd max object namespace len = 64
"""


def up(
    directory: Path,
    *,
    pools: tuple[str, ...] = ("volumes", "vms"),
    memstore_mib: int = 6144,
    propose_interval: float = 0.02,
) -> CephCluster:
    """Create and start a cluster in `directory` (which must be empty or absent)."""
    missing = missing_tools()
    if missing:
        raise CephTestbedError(
            f"Ceph tools not found: {', '.join(missing)} (scripts/setup-ceph.sh installs them)"
        )
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise CephTestbedError(f"{d} is not empty")
    for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
        (d / sub).mkdir(parents=True)
    port = _free_port()
    fsid = str(uuid.uuid4())
    (d / "ceph.conf").write_text(_conf(d, port, fsid, memstore_mib << 20, propose_interval))
    conf = ["--conf", str(d / "ceph.conf")]
    mon_keyring, admin_keyring = d / "mon.keyring", d / "client.admin.keyring"
    _run(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"])  # fmt: skip
    _run(["ceph-authtool", "--create-keyring", str(admin_keyring), "--gen-key",
          "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
          "--cap", "mds", "allow *", "--cap", "mgr", "allow *"])  # fmt: skip
    _run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(admin_keyring)])
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{port}]",
          str(d / "monmap")])  # fmt: skip
    _run(["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
          "--keyring", str(mon_keyring)])  # fmt: skip
    _run(["ceph-mon", *conf, "-i", "a"])
    cluster = CephCluster(d, port)
    try:
        cluster.cli("ceph", "health", "mute", "MGR_DOWN", "--sticky", timeout=30)
        osd_uuid = str(uuid.uuid4())
        osd_id = cluster.cli("ceph", "osd", "new", osd_uuid).strip()
        osd_keyring = d / "osd" / f"ceph-{osd_id}" / "keyring"
        (d / "osd" / f"ceph-{osd_id}").mkdir(parents=True, exist_ok=True)
        _run(["ceph-authtool", "--create-keyring", str(osd_keyring), "--gen-key",
              "-n", f"osd.{osd_id}"])  # fmt: skip
        cluster.cli("ceph", "auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon",
                    "allow profile osd", "-i", str(osd_keyring))  # fmt: skip
        _run(["ceph-osd", *conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid,
              "--keyring", str(osd_keyring)])  # fmt: skip
        _run(["ceph-osd", *conf, "-i", osd_id, "--keyring", str(osd_keyring)])
        for pool in pools:
            cluster.cli("ceph", "osd", "pool", "create", pool, "8", "8")
            cluster.cli("rbd", "pool", "init", pool, timeout=120)
    except BaseException:
        down(d)
        raise
    return cluster


def attach(directory: Path) -> CephCluster:
    """The cluster already running in `directory`."""
    d = Path(directory).resolve()
    for line in (d / "ceph.conf").read_text().splitlines():
        if line.startswith("mon host"):
            return CephCluster(d, int(line.rsplit(":", 1)[1].rstrip("]")))
    raise CephTestbedError(f"{d}/ceph.conf names no monitor")


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def down(directory: Path, *, remove: bool = True) -> None:
    """Stop the daemons (OSDs before the monitor) and remove the directory."""
    d = Path(directory).resolve()
    run = d / "run"
    if run.is_dir():
        for pid_file in sorted(run.glob("osd.*.pid")):
            _stop(pid_file)
        _stop(run / "mon.a.pid")
    if remove:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamal_workers.testbeds.ceph")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="create and start a cluster in DIR")
    start.add_argument("directory", type=Path)
    start.add_argument("--pools", default="volumes,vms")
    start.add_argument("--memstore-mib", type=int, default=6144)
    stop = sub.add_parser("down", help="stop the cluster in DIR and remove DIR")
    stop.add_argument("directory", type=Path)
    stop.add_argument("--keep", action="store_true", help="keep DIR (its logs)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            started = time.monotonic()
            pools = tuple(p for p in args.pools.split(",") if p)
            cluster = up(args.directory, pools=pools, memstore_mib=args.memstore_mib)
            print(f"ceph up in {time.monotonic() - started:.1f} s: conf {cluster.conf}, "
                  f"keyring {cluster.keyring}, monitor 127.0.0.1:{cluster.port}")  # fmt: skip
        else:
            down(args.directory, remove=not args.keep)
    except CephTestbedError as exc:
        print(f"ceph testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
