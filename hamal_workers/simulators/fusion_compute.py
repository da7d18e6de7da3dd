"""A Huawei FusionCompute on 127.0.0.1 for tests and the demo: the VRM's REST API over HTTPS
and, for every CNA host, the backup socket that serves snapshot data ("backup interface for
eBackup CBT").

    with FusionComputeSimulator(tmp_path) as sim:
        vm = sim.add_vm("web", [8 << 30, 1 << 30])   # sparse files under tmp_path
        sim.write(vm, 0, 0, b"boot")                 # a guest write, tracked by CBT
        requests.get(f"{sim.base_url}/service/versions", verify=str(sim.ca_file))

Contract: a client written from `FUSIONCOMPUTE_API.md` and `platforms/fusion_wire.py` talks to
it as to a VRM and its CNA hosts.

- REST under `/service`, JSON, `{errorCode, errorDes}` with every non-200: versions, login
  (`X-Auth-Key` sha256(password) hex, or the password with `X-ENCRIPT-ALGORITHM: 1`; a token
  lives `session_ttl` seconds from login, then 401 10000002), logout, sites, VMs (paged,
  `limit` at most 100; `detail=2` adds vmConfig), volumes, tasks, snapshots (one snapshot task
  per VM at a time, 10300112; at most `snapshot_limit` backup and CBTbackup ones, 10300111),
  the VM's CBT state, `getcbt`, backup resources (at most 8 live in the system, 10300412).
- Asynchronous work (snapshot tasks, a backup resource getting ready) takes `task_seconds` on
  the monotonic clock, settled whenever state is looked at: nothing sleeps.
- A snapshot freezes each normal, non-independent volume at its POST (a sparse copy of the
  volume's file); shared and independent disks are not in it.
- CBT: a write marks its blocks (`block_sectors` * 512 bytes) in the volume's current version;
  a CBTbackup snapshot takes that version as its ChgID and starts the next. `getcbt` with a
  chgID answers the blocks written between the two snapshots, without one the blocks the
  snapshot holds data in (SEEK_DATA). The bitmap is encoded here, first hex digit's high bit
  = startBlock, not with fusion_wire's encoder, so that the client's decoder meets another
  implementation. Disabling CBT (`DELETE action/CBTbackup`, `reset_cbt`) voids every ChgID;
  the next CBTbackup snapshot starts a new volCBTCreateTime.
- Every CNA host serves fusion_wire's frames on a plain and a TLS port (a resource's hostPort
  is the TLS one for transMode lanssl): open by targetFile and token, read, close; at most
  `max_connections_per_host` sockets at once per host, the next is accepted and closed. A
  backup resource expires `delay` seconds after its POST or last PUT; expiry or DELETE voids
  its token and closes the sockets that opened it.

Extensions: a volume's GET also gives `size`, its exact size in bytes (test disks are not
whole GiB; `quantityGB` is that rounded up); the admin surface under `/_sim/` (no token):
`POST /_sim/vms {name, disk_sizes}`, `POST /_sim/write {vm, index, offset, data_hex}`,
`GET /_sim/state`. Faults: `fail_next`, `expire_sessions`, `fail_next_task`, `hang_next_task`,
`drop_socket_after`, `expire_backup_resources`; records: `calls`, `logins`, `logouts`,
`backup_resources`, socket statistics.

What a real FusionCompute would do and this one does not:
- one user, VMs always `running`, one cluster and one datastore per site, no API to make VMs
  or disks (`add_vm` does), no volume listing, memory snapshots, quiescing or reverting;
- a snapshot whose creation fails is gone when its task fails (a VRM may show it `failed`
  first); a snapshot that a backup resource reads can be deleted (open handles go on reading
  the frozen copy, new opens get result 2);
- freezing copies the volume's data ranges (reflinks where the filesystem has them): a full
  disk takes about as long as writing it, and the simulator answers nothing meanwhile;
- the backup socket only reads (open flags 1, write and write-zeros are refused); a drop
  (`drop_socket_after`) ends the stream mid-frame with a FIN, not a reset; `stop()` is final;
- no rate limit (a VRM wants about 300 calls a minute), no password expiry or lockout.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from hamal_workers.platforms import fusion_wire as wire
from hamal_workers.simulators.loopback_http import (
    JsonResponse as _Response,
)
from hamal_workers.simulators.loopback_http import (
    SimulatorHTTPServer,
    SimulatorRequestHandler,
    send_json,
)
from hamal_workers.testbeds.certs import make_certificate

log = logging.getLogger(__name__)

GiB = 1 << 30
BAD_PARAMETER = "10000001"
MAX_BACKUP_RESOURCES = 8
SNAPSHOT_TYPES = ("normal", "backup", "CBTbackup")
LIMITED_TYPES = ("backup", "CBTbackup")  # the ones snapshot_limit counts
TASK_KINDS = ("create_snapshot", "delete_snapshot")
# A read reply's frame header and (result, dataLen) sit before its data in one buffer.
_PREFIX = wire.HEADER.size + wire.READ_REPLY.size
_IDLE_SECONDS = 600.0  # a backup socket idle this long is closed


class SimulatorError(Exception):
    """An admin method refused: unknown VM or disk, a write beyond the disk's end."""


@dataclass(frozen=True)
class Call:
    """One REST request answered (admin requests under /_sim/ are not recorded)."""

    method: str
    path: str
    status: int
    time: float  # time.monotonic() when it was answered
    code: str | None  # the errorCode of a failed answer
    token: bool  # the request carried X-Auth-Token
    version: str | None = None  # the version its Accept header named, if any


class _Fault(Exception):
    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(f"{status} {code} {text}")
        self.status, self.code, self.text = status, code, text


def _error(status: int, code: str, text: str) -> _Response:
    return _Response(status, {"errorCode": code, "errorDes": text})


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # http.client.HTTPMessage
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise _Fault(400, BAD_PARAMETER, "the body is not a JSON object")
        return value


@dataclass
class _Rule:
    pattern: re.Pattern[str]
    method: str | None
    code: str
    status: int
    remaining: int


@dataclass(eq=False)
class _Host:
    id: str
    site: str
    name: str
    listeners: list[socket.socket] = field(default_factory=list)  # plain, then TLS
    open: int = 0
    max_open: int = 0

    @property
    def urn(self) -> str:
        return f"urn:sites:{self.site}:hosts:{self.id}"

    def port(self, tls: bool) -> int:
        return int(self.listeners[1 if tls else 0].getsockname()[1])


@dataclass(eq=False)
class _Volume:
    id: str
    site: str
    vm_id: str
    uuid: str
    name: str
    size: int
    path: Path
    shared: bool
    independent: bool
    version: int = 1  # the CBT version writes land in now
    dirty: dict[int, set[int]] = field(default_factory=dict)  # version -> blocks written

    @property
    def urn(self) -> str:
        return f"urn:sites:{self.site}:volumes:{self.id}"


@dataclass(eq=False)
class _VolSnap:
    """A volume as one snapshot froze it."""

    volume: _Volume
    snap_uuid: str
    path: Path
    epoch: str  # volCBTCreateTime; "" unless the snapshot is CBTbackup
    chg_id: str  # ChgID; "" likewise
    version: int  # the volume's version the snapshot closed; 0 likewise


@dataclass(eq=False)
class _Task:
    id: str
    site: str
    kind: str
    vm: _VM
    started: float  # monotonic
    started_wall: float
    seconds: float
    fate: str  # success, failed, hang
    reason: str
    on_success: Callable[[], None]
    on_failure: Callable[[], None]
    status: str = "running"
    progress: int = 0  # once finished
    finished_wall: float | None = None

    @property
    def urn(self) -> str:
        return f"urn:sites:{self.site}:tasks:{self.id}"


@dataclass(eq=False)
class _Snapshot:
    id: str
    vm: _VM
    name: str
    description: str
    type: str
    created_wall: float
    parent: str | None
    vols: list[_VolSnap]
    status: str = "creating"
    task: _Task | None = None  # its creation or deletion task, while that runs

    @property
    def urn(self) -> str:
        return f"{self.vm.urn}:snapshots:{self.id}"


@dataclass(eq=False)
class _VM:
    id: str
    uuid: str
    name: str
    site: str
    host: _Host
    disks: list[_Volume]
    config: dict[str, Any]  # vmConfig but its disks
    os_options: dict[str, str]
    created_wall: float
    snapshots: dict[str, _Snapshot] = field(default_factory=dict)  # in creation order
    current: str | None = None
    cbt_epoch: str | None = None  # None: CBT off (never on, or disabled since)

    @property
    def urn(self) -> str:
        return f"urn:sites:{self.site}:vms:{self.id}"


@dataclass(eq=False)
class _Resource:
    id: str
    site: str
    snapshot: _Snapshot
    vol_snap: _VolSnap
    host: _Host
    trans_mode: str
    token: str
    target_file: str
    delay: int | float
    created: float  # monotonic
    expires: float  # monotonic
    state: str = "live"  # live, expired, released
    conns: set[_Conn] = field(default_factory=set)  # sockets that opened it

    @property
    def urn(self) -> str:
        return f"urn:sites:{self.site}:backupresources:{self.id}"


@dataclass(eq=False)
class _Conn:
    host: _Host
    sock: socket.socket
    handles: dict[int, tuple[_Resource, int]] = field(default_factory=dict)  # -> (res, fd)
    drop_checked: bool = False
    drop_at: int | None = None  # close once this many data bytes are sent
    sent: int = 0
    opened: float = field(default_factory=time.monotonic)


def _uri(urn: str) -> str:
    return wire.urn_to_uri(urn)


def _stamp(wall: float | None) -> str | None:
    return None if wall is None else f"{datetime.fromtimestamp(wall, UTC):%Y-%m-%d %H:%M:%S}"


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The ranges of [start, end) that hold data in a sparse file."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if data >= end:
            return
        position = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(position, end)


def _freeze(source: Path, target: Path) -> None:
    """A sparse copy: only the data ranges, in the kernel (a reflink where it can)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        for offset, end in _data_ranges(src.fileno(), 0, size):
            while offset < end:
                try:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), end - offset, offset, offset)
                except OSError:
                    n = 0  # not on this filesystem: by hand
                if n <= 0:
                    chunk = os.pread(src.fileno(), min(end - offset, 8 << 20), offset)
                    n = os.pwrite(dst.fileno(), chunk, offset) if chunk else end - offset
                offset += n


def _bitmap(marked: Collection[int], start: int, count: int) -> str:
    """`count` bits from block `start`, the first hex digit's high bit first; upper-case hex
    (the case is not documented: a client reads either)."""
    raw = bytearray((count + 7) // 8)
    for block in marked:
        bit = block - start
        if 0 <= bit < count:
            raw[bit >> 3] |= 0x80 >> (bit & 7)
    return raw.hex().upper()


def _number(args: dict[str, Any], name: str, low: float, high: float) -> int | float:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _Fault(400, BAD_PARAMETER, f"{name} must be a number from {low} to {high}")
    return value


def _abort(conn: _Conn) -> None:
    """Close a backup socket under its reader: the thread serving it sees the stream end."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)


class FusionComputeSimulator:
    """A VRM and its CNA hosts on 127.0.0.1; see the module's doc."""

    def __init__(
        self,
        directory: Path,
        *,
        user: str = "hamal",
        password: str = "secret",
        user_type: str = "2",
        session_ttl: float = 600.0,
        task_seconds: float = 0.05,
        block_sectors: int = 128,
        max_connections_per_host: int = 8,
        snapshot_limit: int = 32,
        tls: bool = True,
        port: int = 0,
        stream_bytes_per_s: float | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.user, self.password, self.user_type = user, password, user_type
        self.session_ttl = session_ttl
        self.task_seconds = task_seconds
        self.block_sectors = block_sectors
        self.block_bytes = block_sectors * wire.ASSUMED_SECTOR_SIZE
        self.max_connections_per_host = max_connections_per_host
        self.snapshot_limit = snapshot_limit
        # A model of a host whose every backup stream is bounded (its disks, its NIC, its
        # CPU): each connection sends at most this many bytes a second; None = as fast as
        # this machine goes.
        self.stream_bytes_per_s = stream_bytes_per_s
        self.tls = tls
        self._requested_port = port
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file, key_file = make_certificate(self.directory / "tls", "fusion")
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.ca_file, key_file)

        self._lock = threading.RLock()
        self._ids: dict[str, int] = {}
        self._sites: dict[str, str] = {}  # id -> name
        self._hosts: dict[str, _Host] = {}  # by urn
        self._vms: dict[str, _VM] = {}  # by id
        self._volumes: dict[str, _Volume] = {}
        self._tasks: dict[str, _Task] = {}
        self._pending: list[_Task] = []  # unfinished, oldest first
        self._resources: dict[str, _Resource] = {}
        self._tokens: dict[str, float] = {}  # -> monotonic expiry
        self._conns: set[_Conn] = set()
        self._last_epoch = 0
        self._failures: list[_Rule] = []
        self._task_faults: list[list[Any]] = []  # [kind, fate, reason, remaining]
        self._drops: list[list[int]] = []  # [nbytes, remaining]
        self._io_errors = 0  # the next reads answered with result 8 (I/O error)
        self._calls: list[Call] = []
        self.logins = self.logouts = 0
        self._refused = self._bytes_served = self._max_total = 0
        self._blocks_read: dict[str, set[int]] = {}  # volume id -> blocks sockets read

        self._httpd: SimulatorHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._routes = self._route_table()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve the REST API on 127.0.0.1 (a free port unless one was given); the base URL."""
        if self._httpd is not None:
            return self.base_url
        httpd = SimulatorHTTPServer(("127.0.0.1", self._requested_port), self, _RequestHandler)
        if self.tls:
            # The handshake happens in the connection's thread (_RequestHandler.setup).
            httpd.socket = self._context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd = httpd
        self._spawn(lambda: httpd.serve_forever(poll_interval=0.1), f"fusion-vrm:{self.port}")
        self._spawn(self._expiry_loop, "fusion-expiry")
        return self.base_url

    def stop(self) -> None:
        """Stop the REST server and every host's sockets; open connections are closed."""
        self._stopping.set()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.stop()
        with self._lock:
            listeners = [s for h in self._hosts.values() for s in h.listeners]
            conns = list(self._conns)
        for listener in listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes its accept()
            listener.close()
        for conn in conns:
            _abort(conn)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    def __enter__(self) -> FusionComputeSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise SimulatorError("the simulator is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def connection(self, *, ca_cert: bool = False) -> dict[str, Any]:
        """The [fusion_compute] keys that reach this VRM (a Mass task's `source`); with
        `ca_cert`, its CA as the PEM text a task carries."""
        found: dict[str, Any] = {
            "vrm_host": "127.0.0.1", "vrm_port": self.port, "user": self.user,
            "password": self.password, "local_host_ip": "127.0.0.1",
        }  # fmt: skip
        if ca_cert:
            found["ca_cert"] = self.ca_file.read_text()
        return found

    def hamal_env(self) -> dict[str, str]:
        """HAMAL_FUSION_COMPUTE_* that point a proxy at this VRM, trusting its certificate."""
        env = {f"HAMAL_FUSION_COMPUTE_{k.upper()}": str(v) for k, v in self.connection().items()}
        return {**env, "HAMAL_FUSION_COMPUTE_CA_FILE": str(self.ca_file)}

    # -- content ---------------------------------------------------------------------------------

    def _next_id(self, kind: str) -> int:
        self._ids[kind] = self._ids.get(kind, 0) + 1
        return self._ids[kind]

    def add_site(self, name: str = "site1") -> str:
        """A site; its id (eight hex digits, as a VRM makes them)."""
        with self._lock:
            site_id = f"{secrets.randbits(32):08X}"
            self._sites[site_id] = name
            return site_id

    def add_host(self, name: str, site: str | None = None) -> str:
        """A CNA host in the site (the first if not given) with its own backup socket ports,
        one plain and one TLS; its urn."""
        with self._lock:
            host = _Host(str(self._next_id("host")), self._site_id(site), name)
            for context in (None, self._context):
                listener = socket.create_server(("127.0.0.1", 0), backlog=64)
                host.listeners.append(listener)
                self._spawn(
                    lambda ls=listener, ctx=context: self._accept(host, ls, ctx),
                    f"fusion-cna:{name}:{listener.getsockname()[1]}",
                )
            self._hosts[host.urn] = host
            return host.urn

    def add_vm(
        self,
        name: str,
        disk_sizes: list[int],
        *,
        site: str | None = None,
        host: str | None = None,
        shared: Collection[int] = (),
        independent: Collection[int] = (),
        cpus: int = 2,
        memory_mb: int = 2048,
        os_type: str = "Linux",
        os_version: str = "Ubuntu 22.04",
        firmware: str = "BIOS",
        nics: list[dict[str, Any]] | None = None,
    ) -> str:
        """A running VM with a sparse file of exactly `disk_sizes[i]` bytes per disk (those in
        `shared` and `independent` are such disks); its uuid. Its host is `host` (urn or
        name), else the site's first, made if there is none."""
        if not disk_sizes or any(size <= 0 for size in disk_sizes):
            raise SimulatorError(f"a VM needs disks of positive sizes, not {disk_sizes}")
        with self._lock:
            site_id = self._site_id(site)
            host_obj = self._host_of(site_id, host)
            n = self._next_id("vm")
            vm_id = f"i-{n:08d}"
            disks = []
            for index, size in enumerate(disk_sizes):
                volume_id = str(self._next_id("volume"))
                path = self.directory / "volumes" / f"{volume_id}.img"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    f.truncate(size)
                disks.append(
                    _Volume(volume_id, site_id, vm_id, str(uuid.uuid4()), f"{name}-disk{index}",
                            size, path, index in shared, index in independent)
                )  # fmt: skip
                self._volumes[volume_id] = disks[-1]
            wanted = nics if nics is not None else [{"ip": f"192.168.{n // 250}.{n % 250 + 2}"}]
            vm_nics = [
                {
                    "name": nic.get("name", f"nic{i + 1}"),
                    "mac": nic.get("mac", f"28:6e:d4:{n >> 8 & 255:02x}:{n & 255:02x}:{i:02x}"),
                    "portGroupUrn": f"urn:sites:{site_id}:dvswitchs:1:portgroups:1",
                    "portGroupName": nic.get("portGroupName", "managePortgroup"),
                    "ip": nic.get("ip", "0.0.0.0"),
                    "ips6": list(nic.get("ips6", [])),
                }
                for i, nic in enumerate(wanted)
            ]
            config = {
                "cpu": {"quantity": cpus},
                "memory": {"quantityMB": memory_mb},
                "nics": vm_nics,
                "properties": {"bootFirmware": firmware},
            }
            os_options = {"osType": os_type, "osVersion": os_version}
            vm = _VM(vm_id, str(uuid.uuid4()), name, site_id, host_obj, disks, config, os_options,
                     time.time())  # fmt: skip
            self._vms[vm_id] = vm
            return vm.uuid

    def _site_id(self, site: str | None) -> str:
        if site is None:
            return next(iter(self._sites), None) or self.add_site()
        for site_id, name in self._sites.items():
            if site in (site_id, name, f"urn:sites:{site_id}"):
                return site_id
        raise SimulatorError(f"no site {site!r}")

    def _host_of(self, site_id: str, host: str | None) -> _Host:
        hosts = [h for h in self._hosts.values() if h.site == site_id]
        if host is None:
            return hosts[0] if hosts else self._hosts[self.add_host("cna01", site_id)]
        for candidate in hosts:
            if host in (candidate.urn, candidate.name):
                return candidate
        raise SimulatorError(f"no host {host!r} in site {site_id}")

    def _vm(self, vm: str) -> _VM:
        """By uuid, id or urn, else by name (which must be unique)."""
        found = [v for v in self._vms.values() if vm in (v.uuid, v.id, v.urn)]
        found = found or [v for v in self._vms.values() if v.name == vm]
        if len(found) != 1:
            raise SimulatorError(f"{len(found)} VMs are {vm!r}")
        return found[0]

    def _disk(self, vm: str, index: int) -> _Volume:
        disks = self._vm(vm).disks
        if not 0 <= index < len(disks):
            raise SimulatorError(f"VM {vm!r} has {len(disks)} disks, not a disk {index}")
        return disks[index]

    def vm_uuid(self, name: str) -> str:
        with self._lock:
            return self._vm(name).uuid

    def admin_vms(self) -> list[dict[str, Any]]:
        """Every VM as the VM listing shows it (urn, uri, uuid, name, ...)."""
        with self._lock:
            return [self._vm_view(vm, detail=False) for vm in self._vms.values()]

    def disk_path(self, vm: str, index: int) -> Path:
        """The live disk's file (writing to it directly bypasses CBT: use `write`)."""
        with self._lock:
            return self._disk(vm, index).path

    def write(self, vm: str, index: int, offset: int, data: bytes) -> None:
        """A guest write: into the disk's file, its blocks marked in the current CBT version."""
        with self._lock:
            volume = self._disk(vm, index)
            if offset < 0 or offset + len(data) > volume.size:
                raise SimulatorError(f"{len(data)} bytes at {offset} end beyond {volume.size}")
            if not data:
                return
            with open(volume.path, "r+b") as f:
                f.seek(offset)
                f.write(data)
            first, last = offset // self.block_bytes, (offset + len(data) - 1) // self.block_bytes
            volume.dirty.setdefault(volume.version, set()).update(range(first, last + 1))

    def content(self, vm: str, index: int) -> bytes:
        with self._lock:
            return self._disk(vm, index).path.read_bytes()

    def snapshot_content(self, vm: str, snapshot_name: str, index: int) -> bytes:
        """A disk as the newest snapshot of that name froze it."""
        with self._lock:
            self._settle()
            volume = self._disk(vm, index)
            for snapshot in reversed(self._vm(vm).snapshots.values()):
                if snapshot.name == snapshot_name:
                    for vol_snap in snapshot.vols:
                        if vol_snap.volume is volume:
                            return vol_snap.path.read_bytes()
                    raise SimulatorError(f"disk {index} is not in snapshot {snapshot_name!r}")
            raise SimulatorError(f"VM {vm!r} has no snapshot {snapshot_name!r}")

    def snapshot_names(self, vm: str) -> list[str]:
        with self._lock:
            self._settle()
            return [s.name for s in self._vm(vm).snapshots.values()]

    def reset_cbt(self, vm: str) -> None:
        """As `DELETE action/CBTbackup`: every ChgID so far is void."""
        with self._lock:
            self._vm(vm).cbt_epoch = None

    def blocks_read(self, vm: str, index: int) -> set[int]:
        """The blocks of a disk that sockets have read from any of its snapshots."""
        with self._lock:
            return set(self._blocks_read.get(self._disk(vm, index).id, ()))

    # -- faults and records ----------------------------------------------------------------------

    def fail_next(
        self,
        method: str | None,
        path_regex: str,
        error_code: str,
        status: int = 500,
        count: int = 1,
    ) -> None:
        """The next `count` requests (of `method`; any when None) whose path, without the
        query, matches get `status` and `error_code`, before authentication."""
        with self._lock:
            self._failures.append(_Rule(re.compile(path_regex), method, error_code, status, count))

    def expire_sessions(self) -> None:
        """Every token issued so far is void: the next call with one gets 401 10000002."""
        with self._lock:
            self._tokens.clear()

    def fail_next_task(self, kind: str, reason: str = "injected failure", count: int = 1) -> None:
        """The next `count` tasks of `kind` (create_snapshot, delete_snapshot) end `failed`."""
        self._task_fault(kind, "failed", reason, count)

    def hang_next_task(self, kind: str, count: int = 1) -> None:
        """The next `count` tasks of `kind` stay `running` (a creation until its snapshot is
        deleted)."""
        self._task_fault(kind, "hang", "", count)

    def _task_fault(self, kind: str, fate: str, reason: str, count: int) -> None:
        if kind not in TASK_KINDS:
            raise SimulatorError(f"no task kind {kind!r}; {TASK_KINDS}")
        with self._lock:
            self._task_faults.append([kind, fate, reason, count])

    def drop_socket_after(self, nbytes: int, count: int = 1) -> None:
        """The next `count` connections that serve reads are closed, mid-frame, once they
        have sent `nbytes` bytes of read data."""
        with self._lock:
            self._drops.append([nbytes, count])

    def fail_reads(self, count: int = 1) -> None:
        """The next `count` reads (on any host) answer result 8: the host's disk failed them."""
        with self._lock:
            self._io_errors += count

    def expire_backup_resources(self) -> None:
        """Every live backup resource expires now: tokens void, their sockets closed."""
        with self._lock:
            for resource in self._resources.values():
                if resource.state == "live":
                    self._end_resource(resource, "expired")

    def clear_faults(self) -> None:
        with self._lock:
            self._failures.clear()
            self._task_faults.clear()
            self._drops.clear()
            self._io_errors = 0

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def backup_resources(self, live_only: bool = True) -> list[dict[str, Any]]:
        """The backup resources made (the live ones): urn, volume, snapshot, status (creating,
        success, expired, released), expires (time.monotonic()), transMode, host."""
        with self._lock:
            self._expire_due()
            return [
                {"urn": r.urn, "volume": r.vol_snap.volume.urn, "snapshot": r.snapshot.urn,
                 "status": self._resource_status(r), "expires": r.expires,
                 "transMode": r.trans_mode, "host": r.host.urn}
                for r in self._resources.values()
                if r.state == "live" or not live_only
            ]  # fmt: skip

    def max_open_connections(self, host_urn: str | None = None) -> int:
        """The most backup sockets ever open at once to a host (to all hosts together when
        None) since the start or reset_connection_stats()."""
        with self._lock:
            return self._hosts[host_urn].max_open if host_urn else self._max_total

    def open_connections(self, host_urn: str | None = None) -> int:
        with self._lock:
            hosts = [self._hosts[host_urn]] if host_urn else self._hosts.values()
            return sum(h.open for h in hosts)

    def reset_connection_stats(self) -> None:
        """Maxima start again from the sockets open now; refused and bytes_served from 0."""
        with self._lock:
            for host in self._hosts.values():
                host.max_open = host.open
            self._max_total = self.open_connections()
            self._refused = self._bytes_served = 0

    @property
    def refused_connections(self) -> int:
        with self._lock:
            return self._refused

    @property
    def bytes_served(self) -> int:
        with self._lock:
            return self._bytes_served

    # -- clocks: tasks and backup resources ------------------------------------------------------

    def _settle(self) -> None:
        """Finish every task whose time is up (holding the lock)."""
        now = time.monotonic()
        for task in list(self._pending):
            if task.fate != "hang" and now >= task.started + task.seconds:
                self._finish(task, task.fate == "success")

    def _finish(self, task: _Task, ok: bool, reason: str = "", callback: bool = True) -> None:
        self._pending.remove(task)
        task.progress = 100 if ok else self._progress(task)
        task.status, task.reason = ("success" if ok else "failed"), reason or task.reason
        task.finished_wall = time.time()
        if callback:
            (task.on_success if ok else task.on_failure)()

    def _progress(self, task: _Task) -> int:
        if task.status != "running":
            return task.progress
        elapsed = time.monotonic() - task.started
        done = int(100 * elapsed / task.seconds) if task.seconds > 0 else 99
        return min(50 if task.fate == "hang" else 99, done)

    def _new_task(
        self, kind: str, vm: _VM, on_success: Callable[[], None], on_failure: Callable[[], None]
    ) -> _Task:
        fate, reason = "success", ""
        for rule in self._task_faults:
            if rule[0] == kind and rule[3] > 0:
                rule[3] -= 1
                fate, reason = rule[1], rule[2]
                break
        task = _Task(str(self._next_id("task")), vm.site, kind, vm, time.monotonic(), time.time(),
                     self.task_seconds, fate, reason, on_success, on_failure)  # fmt: skip
        self._tasks[task.id] = task
        self._pending.append(task)
        return task

    def _expiry_loop(self) -> None:
        """Backup resources expire on time even when nobody asks: their sockets close then."""
        while not self._stopping.wait(0.05):
            with self._lock:
                self._expire_due()

    def _expire_due(self) -> None:
        now = time.monotonic()
        for resource in self._resources.values():
            if resource.state == "live" and resource.expires <= now:
                self._end_resource(resource, "expired")

    def _end_resource(self, resource: _Resource, state: str) -> None:
        resource.state = state
        for conn in resource.conns:
            _abort(conn)
        resource.conns.clear()

    def _resource_status(self, resource: _Resource) -> str:
        if resource.state != "live":
            return resource.state
        ready = time.monotonic() >= resource.created + self.task_seconds
        return "success" if ready else "creating"

    def _new_epoch(self) -> str:
        """A volCBTCreateTime: the time CBT (re)started, never the same twice."""
        now = max(time.time_ns() // 1000, self._last_epoch + 1)
        self._last_epoch = now
        return datetime.fromtimestamp(now / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    # -- HTTP ------------------------------------------------------------------------------------

    def _route_table(self) -> list[tuple[str, re.Pattern[str], bool, Callable[..., _Response]]]:
        """(method, path, needs a token, handler)."""
        site = r"/service/sites/(?P<site>[^/]+)"
        vm = site + r"/vms/(?P<vm_id>[^/]+)"
        snapshot = vm + r"/snapshots/(?P<snap_id>[^/]+)"
        volume = site + r"/volumes/(?P<volume_id>[^/]+)"
        resource = site + r"/backupresources/(?P<resource_id>[^/]+)"
        table: list[tuple[str, str, bool, Callable[..., _Response]]] = [
            ("GET", r"/service/versions", False, self._versions),
            ("POST", r"/service/session", False, self._login),
            ("DELETE", r"/service/session", True, self._logout),
            ("GET", r"/service/sites", True, self._list_sites),
            ("GET", site + r"/vms", True, self._list_vms),
            ("GET", vm, True, self._show_vm),
            ("GET", vm + r"/snapshots", True, self._list_snapshots),
            ("POST", vm + r"/snapshots", True, self._create_snapshot),
            ("GET", snapshot, True, self._show_snapshot),
            ("DELETE", snapshot, True, self._delete_snapshot),
            ("GET", vm + r"/action/CBTbackup", True, self._show_cbt),
            ("DELETE", vm + r"/action/CBTbackup", True, self._disable_cbt),
            ("GET", volume, True, self._show_volume),
            ("POST", volume + r"/getcbt", True, self._getcbt),
            ("POST", volume + r"/backupresources", True, self._create_resource),
            ("GET", resource, True, self._show_resource),
            ("PUT", resource, True, self._keep_resource),
            ("DELETE", resource, True, self._release_resource),
            ("GET", site + r"/tasks/(?P<task_id>[^/]+)", True, self._show_task),
        ]
        return [(m, re.compile(p), auth, h) for m, p, auth, h in table]

    def _handle(self, handler: _RequestHandler) -> None:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        req = _Request(handler.command, url.path, parse_qs(url.query), handler.headers, body)
        if req.path == "/_sim" or req.path.startswith("/_sim/"):
            _send(handler, self._admin(req))
            return
        try:
            with self._lock:
                for rule in self._failures:
                    wanted = rule.remaining > 0 and rule.method in (None, req.method)
                    if wanted and rule.pattern.search(req.path):
                        rule.remaining -= 1
                        raise _Fault(rule.status, rule.code, "injected fault")
            response = self._route(req)
        except _Fault as exc:
            response = _error(exc.status, exc.code, exc.text)
        except Exception:
            log.exception("%s %s failed", req.method, req.path)
            response = _error(500, "10000000", "internal error")
        failed = response.status != 200 and isinstance(response.body, dict)
        accept = re.search(r"version=([0-9.]+)", req.headers.get("Accept") or "")
        code = str(response.body.get("errorCode")) if failed else None
        token = bool(req.headers.get("X-Auth-Token"))
        call = Call(req.method, req.path, response.status, time.monotonic(), code, token,
                    accept[1] if accept else None)  # fmt: skip
        with self._lock:
            self._calls.append(call)
        _send(handler, response)

    def _route(self, req: _Request) -> _Response:
        allowed = False
        for method, pattern, needs_token, handler in self._routes:
            match = pattern.fullmatch(req.path)
            if match is None:
                continue
            if method != req.method:
                allowed = True
                continue
            with self._lock:
                if needs_token:
                    self._authenticate(req)
                self._settle()
                self._expire_due()
                args = match.groupdict()
                if "site" in args and args["site"] not in self._sites:
                    raise _Fault(404, wire.NO_SUCH_OBJECT, f"no site {args['site']}")
                return handler(req, **args)
        if allowed:
            raise _Fault(405, BAD_PARAMETER, f"{req.method} is not allowed on {req.path}")
        raise _Fault(404, wire.NO_SUCH_OBJECT, f"no resource {req.path}")

    def _authenticate(self, req: _Request) -> None:
        token = req.headers.get("X-Auth-Token") or ""
        if self._tokens.get(token, 0.0) <= time.monotonic():
            self._tokens.pop(token, None)
            raise _Fault(401, wire.NOT_LOGGED_IN, "the user is not logged in or the session ended")

    # -- session and inventory -------------------------------------------------------------------

    def _versions(self, req: _Request) -> _Response:
        return _Response(200, {"versions": [{"version": "8.0", "loginUri": "/service/session"}]})

    def _login(self, req: _Request) -> _Response:
        key = req.headers.get("X-Auth-Key") or ""
        algorithm = req.headers.get("X-ENCRIPT-ALGORITHM") or wire.KEY_ALGORITHM_SHA256
        if algorithm == wire.KEY_ALGORITHM_SHA256:
            key, expected = key.lower(), hashlib.sha256(self.password.encode()).hexdigest()
        elif algorithm == "1":
            expected = self.password
        else:
            raise _Fault(400, BAD_PARAMETER, f"X-ENCRIPT-ALGORITHM {algorithm!r}")
        if (
            req.headers.get("X-Auth-User") != self.user
            or req.headers.get("X-Auth-UserType") != self.user_type
            or not hmac.compare_digest(key.encode(), expected.encode())
        ):
            raise _Fault(400, wire.BAD_CREDENTIALS, "the user name or password is wrong")
        token = secrets.token_urlsafe(32)
        self._tokens[token] = time.monotonic() + self.session_ttl
        self.logins += 1
        body = {"validity": int(self.session_ttl * 1000), "userId": "1", "userName": self.user,
                "roleList": ["sysadmin"]}  # fmt: skip
        return _Response(200, body, {"X-Auth-Token": token})

    def _logout(self, req: _Request) -> _Response:
        self._tokens.pop(req.headers.get("X-Auth-Token") or "", None)
        self.logouts += 1
        return _Response(200, {})

    def _list_sites(self, req: _Request) -> _Response:
        sites = [
            {"urn": f"urn:sites:{site_id}", "uri": f"/service/sites/{site_id}", "name": name,
             "ip": "127.0.0.1", "status": "normal"}
            for site_id, name in self._sites.items()
        ]  # fmt: skip
        return _Response(200, {"sites": sites})

    def _int_param(self, req: _Request, name: str, default: int, low: int, high: int) -> int:
        text = req.param(name)
        if text is None:
            return default
        if not text.isdigit() or not low <= int(text) <= high:
            raise _Fault(400, BAD_PARAMETER, f"{name} must be from {low} to {high}, not {text}")
        return int(text)

    def _list_vms(self, req: _Request, site: str) -> _Response:
        limit = self._int_param(req, "limit", 20, 1, wire.PAGE_LIMIT)
        offset = self._int_param(req, "offset", 0, 0, 1 << 31)
        vms = [v for v in self._vms.values() if v.site == site]
        if req.param("uuid"):
            vms = [v for v in vms if v.uuid == req.param("uuid")]
        if req.param("name"):
            # A VRM matches names fuzzily: a client keeps the exact ones itself.
            vms = [v for v in vms if (req.param("name") or "") in v.name]
        page = [self._vm_view(v, req.param("detail") == "2") for v in vms[offset : offset + limit]]
        return _Response(200, {"total": len(vms), "vms": page})

    def _site_vm(self, site: str, vm_id: str) -> _VM:
        vm = self._vms.get(vm_id)
        if vm is None or vm.site != site:
            raise _Fault(404, wire.NO_SUCH_OBJECT, f"no VM {vm_id}")
        return vm

    def _show_vm(self, req: _Request, site: str, vm_id: str) -> _Response:
        return _Response(200, self._vm_view(self._site_vm(site, vm_id), detail=True))

    def _vm_view(self, vm: _VM, detail: bool) -> dict[str, Any]:
        view: dict[str, Any] = {
            "urn": vm.urn, "uri": _uri(vm.urn), "uuid": vm.uuid, "name": vm.name,
            "description": "", "status": "running", "hostUrn": vm.host.urn,
            "hostName": vm.host.name, "clusterUrn": f"urn:sites:{vm.site}:clusters:1",
            "clusterName": "ManagementCluster", "isTemplate": False,
            "createTime": _stamp(vm.created_wall),
        }  # fmt: skip
        if detail:
            disks = [
                {"pciType": "VIRTIO", "sequenceNum": number, "volumeUrn": d.urn,
                 "volumeUri": _uri(d.urn), "volumeUuid": d.uuid, "quantityGB": -(-d.size // GiB),
                 "isThin": True, "datastoreUrn": self._datastore(d.site),
                 "indepDisk": d.independent, "persistentDisk": True,
                 "type": "share" if d.shared else "normal", "systemVolume": number == 1}
                for number, d in enumerate(vm.disks, 1)
            ]  # fmt: skip
            view["vmConfig"] = {**vm.config, "disks": disks}
            view["osOptions"] = vm.os_options
        return view

    @staticmethod
    def _datastore(site: str) -> str:
        return f"urn:sites:{site}:datastores:1"

    def _site_volume(self, site: str, volume_id: str) -> _Volume:
        volume = self._volumes.get(volume_id)
        if volume is None or volume.site != site:
            raise _Fault(404, wire.DISK_MISSING, f"no volume {volume_id}")
        return volume

    def _show_volume(self, req: _Request, site: str, volume_id: str) -> _Response:
        v = self._site_volume(site, volume_id)
        return _Response(200, {
            "urn": v.urn, "uri": _uri(v.urn), "uuid": v.uuid, "name": v.name,
            "quantityGB": -(-v.size // GiB), "status": "USE", "isThin": True,
            "type": "share" if v.shared else "normal", "datastoreUrn": self._datastore(v.site),
            "volumeUrl": f"/vol/datastore1/{v.uuid}.img",
            "size": v.size,  # an extension: the exact size in bytes
        })  # fmt: skip

    def _show_task(self, req: _Request, site: str, task_id: str) -> _Response:
        task = self._tasks.get(task_id)
        if task is None or task.site != site:
            raise _Fault(404, wire.NO_SUCH_OBJECT, f"no task {task_id}")
        reason = task.reason if task.status == "failed" else ""
        return _Response(200, {
            "urn": task.urn, "uri": _uri(task.urn), "status": task.status,
            "progress": self._progress(task), "reason": reason, "reasonDes": reason,
            "entityUrn": task.vm.urn, "createTime": _stamp(task.started_wall),
            "startTime": _stamp(task.started_wall), "finishTime": _stamp(task.finished_wall),
        })  # fmt: skip

    # -- snapshots and CBT -----------------------------------------------------------------------

    def _summary(self, s: _Snapshot) -> dict[str, Any]:
        return {
            "urn": s.urn, "uri": _uri(s.urn), "name": s.name, "description": s.description,
            "type": s.type, "status": s.status, "createTime": _stamp(s.created_wall),
        }  # fmt: skip

    def _list_snapshots(self, req: _Request, site: str, vm_id: str) -> _Response:
        vm = self._site_vm(site, vm_id)

        def tree(parent: str | None) -> list[dict[str, Any]]:
            return [
                {**self._summary(s), "childSnapshots": tree(s.id)}
                for s in vm.snapshots.values()
                if s.parent == parent
            ]

        current = vm.snapshots.get(vm.current or "")
        return _Response(200, {
            "currentSnapshot": self._summary(current) if current else None,
            "rootSnapshots": tree(None),
        })  # fmt: skip

    def _vm_snapshot(self, site: str, vm_id: str, snap_id: str) -> _Snapshot:
        snapshot = self._site_vm(site, vm_id).snapshots.get(snap_id)
        if snapshot is None:
            raise _Fault(404, wire.SNAPSHOT_MISSING, f"no snapshot {snap_id}")
        return snapshot

    def _show_snapshot(self, req: _Request, site: str, vm_id: str, snap_id: str) -> _Response:
        s = self._vm_snapshot(site, vm_id, snap_id)
        vols = [
            {"volumeUrn": vs.volume.urn, "volumeUri": _uri(vs.volume.urn),
             "snapUuid": vs.snap_uuid, "datastoreUrn": self._datastore(vs.volume.site),
             "volCBTCreateTime": vs.epoch, "ChgID": vs.chg_id}
            for vs in s.vols
        ]  # fmt: skip
        return _Response(200, {**self._summary(s), "volsnapshots": vols})

    def _busy(self, vm: _VM, allowed: _Task | None = None) -> bool:
        return any(t.vm is vm and t is not allowed for t in self._pending)

    def _create_snapshot(self, req: _Request, site: str, vm_id: str) -> _Response:
        vm = self._site_vm(site, vm_id)
        args = req.json()
        name, kind = args.get("name"), args.get("type", "normal")
        if not isinstance(name, str) or not name or kind not in SNAPSHOT_TYPES:
            raise _Fault(400, BAD_PARAMETER, f"a snapshot needs a name and a type {SNAPSHOT_TYPES}")
        if self._busy(vm):
            raise _Fault(409, wire.SNAPSHOT_TASK_RUNNING, "a snapshot task of the VM is running")
        limited = sum(s.type in LIMITED_TYPES for s in vm.snapshots.values())
        if kind in LIMITED_TYPES and limited >= self.snapshot_limit:
            raise _Fault(400, wire.SNAPSHOT_LIMIT, f"the VM has {limited} backup snapshots")
        snap_id = str(self._next_id("snapshot"))
        epoch = ""
        if kind == "CBTbackup":
            # The first CBT snapshot since CBT was off starts tracking: a new epoch.
            vm.cbt_epoch = epoch = vm.cbt_epoch or self._new_epoch()
        vols = []
        for disk in vm.disks:
            if disk.shared or disk.independent:
                continue
            path = self.directory / "snapshots" / snap_id / f"{disk.id}.img"
            _freeze(disk.path, path)
            version = disk.version if epoch else 0
            vols.append(_VolSnap(disk, str(uuid.uuid4()), path, epoch, str(version or ""), version))
            if epoch:
                disk.version += 1  # writes from now on belong to the next ChgID
        snapshot = _Snapshot(snap_id, vm, name, str(args.get("description") or ""), kind,
                             time.time(), vm.current, vols)  # fmt: skip
        vm.snapshots[snap_id] = snapshot
        vm.current = snap_id

        def ready() -> None:
            snapshot.status, snapshot.task = "ready", None

        # A failed creation leaves nothing behind.
        snapshot.task = task = self._new_task(
            "create_snapshot", vm, ready, lambda: self._remove_snapshot(snapshot)
        )
        return _Response(200, {"urn": snapshot.urn, "uri": _uri(snapshot.urn),
                               "taskUrn": task.urn, "taskUri": _uri(task.urn)})  # fmt: skip

    def _remove_snapshot(self, snapshot: _Snapshot) -> None:
        """The snapshot is gone: its children hang from its parent, its files are removed."""
        vm = snapshot.vm
        for child in vm.snapshots.values():
            if child.parent == snapshot.id:
                child.parent = snapshot.parent
        if vm.current == snapshot.id:
            vm.current = snapshot.parent
        vm.snapshots.pop(snapshot.id, None)
        for vol_snap in snapshot.vols:
            vol_snap.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.directory / "snapshots" / snapshot.id).rmdir()

    def _delete_snapshot(self, req: _Request, site: str, vm_id: str, snap_id: str) -> _Response:
        snapshot = self._vm_snapshot(site, vm_id, snap_id)
        hung = snapshot.task
        if not (hung and hung.kind == "create_snapshot" and hung.fate == "hang"):
            hung = None
        if self._busy(snapshot.vm, allowed=hung):
            raise _Fault(409, wire.SNAPSHOT_TASK_RUNNING, "a snapshot task of the VM is running")
        if hung is not None:  # deleting a snapshot whose creation hangs cancels that
            self._finish(hung, False, "cancelled: the snapshot was deleted", callback=False)
        restored = "failed" if hung else "ready"
        snapshot.status = "deleting"

        def undo() -> None:
            snapshot.status, snapshot.task = restored, None

        snapshot.task = task = self._new_task(
            "delete_snapshot", snapshot.vm, lambda: self._remove_snapshot(snapshot), undo
        )
        return _Response(200, {"taskUrn": task.urn, "taskUri": _uri(task.urn)})

    def _show_cbt(self, req: _Request, site: str, vm_id: str) -> _Response:
        epoch = self._site_vm(site, vm_id).cbt_epoch
        return _Response(200, {"CBTflag": epoch is not None, "CBTCeateTime": epoch or ""})

    def _disable_cbt(self, req: _Request, site: str, vm_id: str) -> _Response:
        self._site_vm(site, vm_id).cbt_epoch = None
        return _Response(200, {})

    def _getcbt(self, req: _Request, site: str, volume_id: str) -> _Response:
        volume = self._site_volume(site, volume_id)
        vm = self._vms[volume.vm_id]
        args = req.json()
        if args.get("type") != "DiffBitmapAndBit1Num":
            raise _Fault(400, BAD_PARAMETER, "type must be DiffBitmapAndBit1Num")
        mine = [vs for s in vm.snapshots.values() for vs in s.vols if vs.volume is volume]
        target = next((vs for vs in mine if vs.snap_uuid == args.get("snapUuid")), None)
        if target is None:
            raise _Fault(404, wire.SNAPSHOT_MISSING, f"no snapshot {args.get('snapUuid')}")
        total = -(-volume.size // self.block_bytes)
        start, count = args.get("startBlock"), args.get("blockNum")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (start, count)) or (
            start % 8 or not 0 <= start < total or count <= 0
        ):
            raise _Fault(400, BAD_PARAMETER, "startBlock (a multiple of 8) or blockNum is wrong")
        if not target.epoch or args.get("volCBTCreateTime") != target.epoch:
            raise _Fault(400, wire.NOT_ON_ONE_CHAIN, "volCBTCreateTime is not the snapshot's")
        bit_num = min(count, total - start)
        marked: set[int] = set()
        if args.get("chgID"):
            base = next((vs for vs in mine if vs.chg_id == args["chgID"]), None)
            if (
                target.epoch != vm.cbt_epoch  # CBT was disabled since: every ChgID is void
                or base is None
                or base.epoch != target.epoch
                or base.version >= target.version
            ):
                raise _Fault(400, wire.NOT_ON_ONE_CHAIN, "the two snapshots are not on one chain")
            for version in range(base.version + 1, target.version + 1):
                marked |= volume.dirty.get(version, set())
        else:
            bs = self.block_bytes
            fd = os.open(target.path, os.O_RDONLY)
            try:
                for low, high in _data_ranges(fd, start * bs, (start + bit_num) * bs):
                    marked.update(range(low // bs, -(-high // bs)))
            finally:
                os.close(fd)
        marked = {b for b in marked if start <= b < start + bit_num}
        return _Response(200, {
            "sectorOfBlock": self.block_sectors, "bitNum": bit_num, "bit1Num": len(marked),
            "bitMap": _bitmap(marked, start, bit_num),
        })  # fmt: skip

    # -- backup resources ------------------------------------------------------------------------

    def _create_resource(self, req: _Request, site: str, volume_id: str) -> _Response:
        volume = self._site_volume(site, volume_id)
        args = req.json()
        delay = _number(args, "delay", 60, 7200)
        mode = args.get("transMode")
        if args.get("taskType") != "CBTBackup" or mode not in ("lan", "lanssl"):
            raise _Fault(400, BAD_PARAMETER, "taskType must be CBTBackup, transMode lan|lanssl")
        vm = self._vms[volume.vm_id]
        by_urn = {s.urn: s for s in vm.snapshots.values()}
        snapshot, base = by_urn.get(args.get("snapUrn2") or ""), args.get("snapUrn1")
        if snapshot is None or (base and base not in by_urn):
            raise _Fault(404, wire.SNAPSHOT_MISSING, "snapUrn1 or snapUrn2 is not a snapshot")
        if snapshot.status != "ready":
            raise _Fault(400, wire.SNAPSHOT_NOT_READY, f"the snapshot is {snapshot.status}")
        vol_snap = next((vs for vs in snapshot.vols if vs.volume is volume), None)
        if vol_snap is None:
            raise _Fault(404, wire.DISK_MISSING, "the volume is not in the snapshot")
        epoch = args.get("volCBTCreateTime")
        if epoch and vol_snap.epoch and epoch != vol_snap.epoch:
            raise _Fault(400, wire.NOT_ON_ONE_CHAIN, "volCBTCreateTime is not the snapshot's")
        live = sum(r.state == "live" for r in self._resources.values())
        if live >= MAX_BACKUP_RESOURCES:
            raise _Fault(400, wire.BACKUP_TASKS_FULL, f"{live} backup tasks are running")
        now = time.monotonic()
        resource = _Resource(str(self._next_id("resource")), site, snapshot, vol_snap, vm.host,
                             mode, secrets.token_hex(32), f"/var/run/cbt/{vol_snap.snap_uuid}.snap",
                             delay, now, now + delay)  # fmt: skip
        self._resources[resource.id] = resource
        return _Response(200, {"urn": resource.urn, "uri": _uri(resource.urn)})

    def _live_resource(self, site: str, resource_id: str) -> _Resource:
        resource = self._resources.get(resource_id)
        if resource is None or resource.site != site or resource.state != "live":
            raise _Fault(404, wire.NO_SUCH_OBJECT, f"no backup resource {resource_id}")
        return resource

    def _show_resource(self, req: _Request, site: str, resource_id: str) -> _Response:
        r = self._live_resource(site, resource_id)
        status = self._resource_status(r)
        ready, lanssl = status == "success", r.trans_mode == "lanssl"
        # Where to connect is known once the CNA host has the snapshot ready.
        return _Response(200, {
            "urn": r.urn, "uri": _uri(r.urn), "status": status,
            "hostIP": "127.0.0.1" if ready else "", "hostPort": r.host.port(lanssl) if ready else 0,
            "targetFile": r.target_file if ready else "", "token": r.token if ready else "",
            "caCert": self.ca_file.read_text() if ready and lanssl else "", "delay": r.delay,
            "expireTime": _stamp(time.time() + r.expires - time.monotonic()),
        })  # fmt: skip

    def _keep_resource(self, req: _Request, site: str, resource_id: str) -> _Response:
        r = self._live_resource(site, resource_id)
        # Shorter than a POST's 60 s minimum is taken: tests make resources expire so.
        r.delay = _number(req.json(), "delay", 0.001, 7200)
        r.expires = time.monotonic() + r.delay
        return _Response(200, {})

    def _release_resource(self, req: _Request, site: str, resource_id: str) -> _Response:
        self._end_resource(self._live_resource(site, resource_id), "released")
        return _Response(200, {})

    # -- CNA backup sockets ----------------------------------------------------------------------

    def _accept(self, host: _Host, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # stop() closed the listener
            conn: _Conn | None = None
            with self._lock:
                if host.open < self.max_connections_per_host:
                    conn = _Conn(host, sock)
                    self._conns.add(conn)
                    host.open += 1
                    host.max_open = max(host.max_open, host.open)
                    self._max_total = max(self._max_total, self.open_connections())
                else:
                    self._refused += 1
            if conn is None:
                sock.close()  # over the limit: accepted, then closed at once
                continue
            threading.Thread(target=self._serve, args=(conn, context), daemon=True).start()

    def _serve(self, conn: _Conn, context: ssl.SSLContext | None) -> None:
        try:
            # A reply is one send: its tail need not wait for an ACK (Nagle).
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock.settimeout(10)
            if context is not None:
                conn.sock = context.wrap_socket(conn.sock, server_side=True)
            conn.sock.settimeout(_IDLE_SECONDS)
            self._serve_frames(conn)
        except OSError:
            pass  # the peer went away, the stream was not ours (WireError), or we closed it
        finally:
            with self._lock:
                self._conns.discard(conn)
                conn.host.open -= 1
                fds = [fd for _, fd in conn.handles.values()]
                conn.handles.clear()
            for fd in fds:
                os.close(fd)
            conn.sock.close()

    def _serve_frames(self, conn: _Conn) -> None:
        buffer: bytearray | None = None
        while True:
            header = wire.recv_header(conn.sock)
            body = bytes(wire.recv_body(conn.sock, header))
            op = header.operation
            if op == wire.OP_READ and len(body) == wire.READ_REQUEST.size:
                buffer = buffer or bytearray(_PREFIX + wire.ASSUMED_MAX_READ)
                if not self._read(conn, header.sequence, body, buffer):
                    return
                continue
            if op == wire.OP_OPEN and len(body) == wire.OPEN_REQUEST.size:
                reply = self._open(conn, body)
            elif op == wire.OP_CLOSE and len(body) == wire.CLOSE_REQUEST.size:
                with self._lock:
                    handle = conn.handles.pop(wire.CLOSE_REQUEST.unpack(body)[0], None)
                if handle is not None:
                    os.close(handle[1])
                reply = wire.CLOSE_REPLY.pack(5 if handle is None else wire.OK)
            elif op in (wire.OP_OPEN, wire.OP_CLOSE, wire.OP_READ):
                return  # a body of the wrong size: the stream is out of step
            else:
                reply = wire.READ_REPLY.pack(1, 0)  # writes and unknown operations
            conn.sock.sendall(wire.frame(op, header.sequence, reply))

    def _open(self, conn: _Conn, body: bytes) -> bytes:
        raw_file, raw_token, flags = wire.OPEN_REQUEST.unpack(body)
        name, token = wire.c_string(raw_file), wire.c_string(raw_token)
        with self._lock:
            self._expire_due()
            named = [r for r in self._resources.values() if r.target_file == name]
            named = [r for r in named if r.host is conn.host]
            resource = next((r for r in named if r.token == token and r.state == "live"), None)
            if resource is None or flags != 0:
                result = wire.BAD_TOKEN if named else wire.NO_FILE
                return wire.OPEN_REPLY.pack(4 if resource else result, 0)
            try:
                fd = os.open(resource.vol_snap.path, os.O_RDONLY)
            except FileNotFoundError:  # its snapshot was deleted meanwhile
                return wire.OPEN_REPLY.pack(wire.NO_FILE, 0)
            handle = self._next_id("handle")  # unique in the system: a stray one is caught
            conn.handles[handle] = (resource, fd)
            resource.conns.add(conn)
            return wire.OPEN_REPLY.pack(wire.OK, handle)

    def _read(self, conn: _Conn, sequence: int, body: bytes, buffer: bytearray) -> bool:
        """Serve one read; False when the connection is to be dropped."""
        number, offset, length = wire.READ_REQUEST.unpack(body)
        with self._lock:
            resource, fd = conn.handles.get(number, (None, -1))
            size = resource.vol_snap.volume.size if resource else 0
            if resource is None:
                result = 5
            elif resource.state != "live" or resource.expires <= time.monotonic():
                result = wire.BAD_TOKEN
            elif length == 0 or length > wire.ASSUMED_MAX_READ:
                result = 7
            else:
                result = 9 if offset >= size else wire.OK
            if not result and self._io_errors > 0:
                self._io_errors -= 1
                result = 8
            if not result and not conn.drop_checked:
                conn.drop_checked = True
                rule = next((r for r in self._drops if r[1] > 0), None)
                if rule is not None:
                    rule[1] -= 1
                    conn.drop_at = rule[0]
        if result or resource is None:
            conn.sock.sendall(wire.frame(wire.OP_READ, sequence, wire.READ_REPLY.pack(result, 0)))
            return True
        # Header, reply head and data in one buffer and one send: no copies of the data.
        view = memoryview(buffer)
        want, n = min(length, size - offset), 0
        while n < want:
            got = os.preadv(fd, [view[_PREFIX + n : _PREFIX + want]], offset + n)
            if got <= 0:
                break
            n += got
        wire.READ_REPLY.pack_into(buffer, wire.HEADER.size, wire.OK, n)
        reply = view[wire.HEADER.size : _PREFIX + n]
        wire.HEADER.pack_into(buffer, 0, wire.MAGIC, wire.ASSUMED_WIRE_VERSION, wire.OP_READ,
                              sequence, len(reply), wire.crc(reply))  # fmt: skip
        cut = n if conn.drop_at is None else max(0, min(n, conn.drop_at - conn.sent))
        conn.sock.sendall(view[: _PREFIX + cut])
        conn.sent += cut
        if self.stream_bytes_per_s:
            ahead = conn.sent / self.stream_bytes_per_s - (time.monotonic() - conn.opened)
            if ahead > 0:
                time.sleep(ahead)
        with self._lock:
            self._bytes_served += cut
            bs = self.block_bytes
            blocks = self._blocks_read.setdefault(resource.vol_snap.volume.id, set())
            blocks.update(range(offset // bs, -(-(offset + cut) // bs)))
        return conn.drop_at is None or conn.sent < conn.drop_at

    # -- /_sim/ ----------------------------------------------------------------------------------

    def _admin(self, req: _Request) -> _Response:
        """For a demo in another process: POST vms {name, disk_sizes} -> {uuid},
        POST write {vm, index, offset, data_hex}, GET state."""
        action = req.path.removeprefix("/_sim").strip("/")
        try:
            if req.method == "GET" and action == "state":
                return _Response(200, self.state())
            if req.method == "POST" and action == "vms":
                args = req.json()
                sizes = [int(size) for size in args["disk_sizes"]]
                return _Response(200, {"uuid": self.add_vm(str(args["name"]), sizes)})
            if req.method == "POST" and action == "write":
                args = req.json()
                data = bytes.fromhex(args["data_hex"])
                self.write(str(args["vm"]), int(args["index"]), int(args["offset"]), data)
                return _Response(200, {})
        except _Fault as exc:
            return _error(exc.status, exc.code, exc.text)
        except (KeyError, TypeError, ValueError, SimulatorError) as exc:
            return _error(400, BAD_PARAMETER, f"bad arguments: {exc}")
        return _error(404, wire.NO_SUCH_OBJECT, f"no admin action {action!r}")

    def state(self) -> dict[str, Any]:
        """VMs, snapshots, live backup resources, hosts and socket statistics."""
        with self._lock:
            self._settle()
            vms = [
                {"uuid": vm.uuid, "name": vm.name, "urn": vm.urn, "host": vm.host.urn,
                 "cbt": vm.cbt_epoch,
                 "disks": [{"urn": d.urn, "size": d.size, "path": str(d.path)} for d in vm.disks],
                 "snapshots": [{"name": s.name, "urn": s.urn, "status": s.status, "type": s.type}
                               for s in vm.snapshots.values()]}
                for vm in self._vms.values()
            ]  # fmt: skip
            hosts = {
                h.urn: {"name": h.name, "ports": [h.port(False), h.port(True)], "open": h.open,
                        "max_open": h.max_open}
                for h in self._hosts.values()
            }  # fmt: skip
            return {
                "sites": self._sites, "vms": vms, "hosts": hosts,
                "backup_resources": self.backup_resources(), "refused_connections": self._refused,
                "bytes_served": self._bytes_served, "logins": self.logins, "logouts": self.logouts,
            }  # fmt: skip


def _send(handler: _RequestHandler, response: _Response) -> None:
    send_json(handler, response, "application/json;charset=UTF-8")


class _RequestHandler(SimulatorRequestHandler):
    server_version = "VRM"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamal_workers.simulators.fusion_compute")
    parser.add_argument("--directory", type=Path, required=True, help="disks, snapshots, certs")
    parser.add_argument("--port", type=int, default=0, help="the REST port (default: a free one)")
    parser.add_argument("--state-file", type=Path, help="write {url, ca_file, user, password}")
    parser.add_argument("--user", default="hamal")
    parser.add_argument("--password", default="secret")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sim = FusionComputeSimulator(args.directory, user=args.user, password=args.password,
                                 port=args.port)  # fmt: skip
    with sim:
        state = {"url": sim.base_url, "ca_file": str(sim.ca_file), "user": args.user,
                 "password": args.password}  # fmt: skip
        if args.state_file is not None:
            partial = args.state_file.with_name(args.state_file.name + ".tmp")
            partial.write_text(json.dumps(state))
            partial.replace(args.state_file)  # a reader never sees half of it
        print(json.dumps(state), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
