"""An OpenStack cloud on 127.0.0.1 for tests and the demo: Keystone v3, Nova v2.1 and Cinder v3
over real HTTP, backed by real RBD images in a Ceph test cluster (`hamal_workers.testbeds.ceph`).

    with OpenStackSimulator(str(cluster.conf), str(cluster.keyring), password="secret") as sim:
        vol = sim.create_volume("data", 1 << 30)          # RBD image volumes/volume-<id>
        srv = sim.create_server("web", boot_image_size=1 << 30, volumes=[vol])
        conn = openstack.connect(auth_url=sim.auth_url, username="demo", password="secret",
                                 project_name="demo", user_domain_name="Default",
                                 project_domain_name="Default", region_name="RegionOne")
        conn.compute.get_server(srv)

Contract: openstacksdk (and keystoneauth1) talk to it unchanged, as to a real cloud.

- Keystone v3 under `/identity`: version discovery (`/identity` answers 300 with every version,
  `/identity/v3` the one), `POST /identity/v3/auth/tokens` with the password method (user by
  name and domain, or by id; project scope by name and domain, or by id) answers 201 with the
  token in `X-Subject-Token` and a body whose catalog names `identity`, `compute` (nova,
  `/compute/v2.1`), `volumev3` and `block-storage` (cinder, `/volume/v3/<project id>`), each with
  public, internal and admin endpoints in the region. `GET`/`HEAD` validate a token, `DELETE`
  revokes one. Tokens live `token_ttl` seconds by `clock`; an unknown, revoked or expired token
  gets the 401 keystonemiddleware gives, and keystoneauth authenticates again.
- Nova v2.1 under `/compute`: version discovery; `GET /servers`, `/servers/detail` (filters
  `name` as a regular expression, `status`; `all_tenants` accepted; `limit`/`marker`),
  `GET /servers/{id}`, `GET /servers/{id}/os-volume_attachments[/{volume id}]`,
  `GET /servers/{id}/os-interface[/{port id}]`, with the fields each microversion adds
  (2.3 extended attributes, 2.47 embedded flavor, 2.70 `tag`, 2.79 `delete_on_termination`,
  2.89 `attachment_id` and `bdm_uuid` without `id`, ...). A server's `addresses` (network name
  -> fixed and floating IPs with the port's MAC) and its interfaces come from its ports
  (`Nic`). Microversions 2.1 to 2.100; the project id in the URL is optional, as in Nova.
- Cinder v3 under `/volume`: version discovery; `GET /volumes`, `/volumes/detail`,
  `/volumes/{id}` (filters `name`, `status`; `limit`/`marker`); from microversion 3.27 the
  attachments API: `GET /attachments`, `/attachments/detail`, `/attachments/{id}`, whose
  `connection_info` is what Cinder's RBD driver answers (`driver_volume_type` "rbd", the
  image as `<pool>/<image>`, the monitors' addresses) or, for a volume on another backend,
  what the LVM driver answers (`iscsi`). Microversions 3.0 to 3.71.
- Microversions are read from `OpenStack-API-Version` (and `X-OpenStack-Nova-API-Version`),
  answered in the same headers, and refused with 406 outside the range; errors have the bodies
  of the real services (`itemNotFound`, `computeFault`, Keystone's `error`, ...).

The cloud's content is made with Python methods (`create_volume`, `create_server`,
`attach_volume`, `detach_volume`, `delete_server`, `delete_volume`), which do to Ceph what
Cinder and Nova's libvirt RBD backend do: a Ceph volume is an RBD image `volume-<id>` in the
volumes pool, an instance booted from an image has its root disk `<id>_disk` in the vms pool.
Faults for tests: `fail_next` (an error answer), `delay` (a late answer), `set_password`,
`revoke_tokens`; `calls` records every API request. The same controls, and a read-only view of
the state, are served under `/_sim/` (no token needed; loopback only).

What a real cloud would do and this one does not:
- no write API: servers and volumes are not created, attached, deleted or changed over HTTP
  (only the admin methods do), and no Glance, Neutron or Placement (a server's ports are
  made with it and shown through Nova only; the image and the flavor a server names are not
  served: the flavor is embedded from 2.47 on, as every current client asks);
- one user in one project, every token has the roles admin, member and reader (so admin-only
  fields, such as `os-vol-host-attr:host`, are always shown), no policy checks, no application
  credentials, no multi-factor auth;
- servers are always ACTIVE and volumes `available` or `in-use`: nothing is asynchronous;
- a volume is attached to one server at most (no multiattach); devices are named by the
  simulator (`/dev/vda`, `/dev/vdb`, ... in attach order, first free letter), not by libvirt;
- `delete_server` keeps the ephemeral root image when it cannot be removed (it has
  snapshots, or a client holds it open) and says so, where Nova would log an error and leave
  the image behind as well; `delete_volume` refuses a volume whose image has snapshots
  (Cinder's RBD driver raises VolumeIsBusy) and leaves the volume as it was;
- sizes: a volume's image has exactly the size asked for and `size` is that rounded up to
  GiB (Cinder only makes whole GiB);
- no rate limits, no pagination links (`limit`/`marker` work, `*_links` are not given).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from hamal_workers.simulators.loopback_http import SimulatorHTTPServer, SimulatorRequestHandler

log = logging.getLogger(__name__)

GiB = 1 << 30

NOVA_MIN, NOVA_MAX = (2, 1), (2, 100)
CINDER_MIN, CINDER_MAX = (3, 0), (3, 71)
NOVA_LEGACY_HEADER = "X-OpenStack-Nova-API-Version"
VERSION_HEADER = "OpenStack-API-Version"

# Keystone's answer for an unknown, expired or revoked token, and for wrong credentials.
_AUTH_REQUIRED = "The request you have made requires authentication."
# Messages the real services give with these statuses (webob's, unless the service has its own).
_FAULT_MESSAGES = {
    ("compute", 500): (
        "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ and "
        "attach the Nova API log if possible.\n<class 'oslo_messaging.exceptions.MessagingTimeout'>"
    ),
    ("volume", 500): (
        "The server has either erred or is incapable of performing the requested operation."
    ),
    ("identity", 500): "An unexpected error prevented the server from fulfilling your request.",
}
_WEBOB_MESSAGES = {
    503: "The server is currently unavailable. Please try again at a later time.",
    502: "Bad gateway.",
    504: "The gateway has timed out.",
}
_FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}


class SimulatorError(Exception):
    """An admin method refused: unknown id, a volume in the wrong state, an image in use."""


@dataclass(frozen=True)
class Call:
    """One request the simulator answered (admin requests under /_sim/ excluded)."""

    method: str
    path: str
    status: int
    microversion: str | None = None  # the microversion answered, Nova and Cinder only


@dataclass
class _Rule:
    pattern: re.Pattern[str]
    method: str | None
    remaining: int | None  # None: until clear_faults()
    status: int = 0
    seconds: float = 0.0

    def take(self, method: str, path: str) -> bool:
        if self.remaining == 0 or (self.method and self.method != method):
            return False
        if not self.pattern.search(path):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


@dataclass
class _Attachment:
    id: str  # Cinder's attachment id
    volume_id: str
    server_id: str
    device: str
    bdm_uuid: str
    attached_at: float


@dataclass
class _Volume:
    id: str
    name: str
    size_bytes: int
    image: str | None  # the RBD image in the volumes pool; None: not on Ceph
    created_at: float
    bootable: bool = False
    attachment: _Attachment | None = None
    updated_at: float = 0.0


@dataclass(frozen=True)
class Nic:
    """A port of a server on a network (by name), as Neutron makes it: its fixed IPs, the
    floating IPs NATed to it, and its MAC (Neutron's `fa:16:3e:xx:xx:xx` unless given)."""

    network: str
    fixed_ips: tuple[str, ...] = ()
    floating_ips: tuple[str, ...] = ()
    mac: str | None = None


@dataclass
class _Port:
    id: str
    network: str
    net_id: str
    mac: str
    fixed_ips: list[tuple[str, str]]  # (address, subnet id)
    floating_ips: list[str]


@dataclass
class _Server:
    id: str
    name: str
    created_at: float
    instance_name: str
    reservation_id: str
    image_id: str | None  # Glance image booted from; None: boot from volume
    root_image: str | None  # the ephemeral root disk in the vms pool
    root_gib: int
    volumes: list[str] = field(default_factory=list)  # attached volume ids, in attach order
    vcpus: int = 1
    ram_mib: int = 2048
    ports: list[_Port] = field(default_factory=list)  # in the order the server got them


@dataclass
class _Token:
    id: str
    issued_at: float
    expires_at: float
    audit_id: str


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # http.client.HTTPMessage
    body: bytes
    service: str | None = None  # identity, compute, volume
    version: tuple[int, int] | None = None

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise _HTTPError.of(self.service, 400, "Malformed request body") from exc

    def at_least(self, major: int, minor: int) -> bool:
        return self.version is not None and self.version >= (major, minor)


@dataclass
class _Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _HTTPError(Exception):
    def __init__(self, response: _Response) -> None:
        super().__init__(response.status)
        self.response = response

    @classmethod
    def of(
        cls, service: str | None, status: int, message: str | None = None, **headers: str
    ) -> _HTTPError:
        phrase = HTTPStatus(status).phrase
        text = (
            message
            or _FAULT_MESSAGES.get((service or "identity", status))
            or _WEBOB_MESSAGES.get(status)
            or HTTPStatus(status).description
        )
        if service in ("compute", "volume"):
            body: dict[str, Any] = {
                _FAULT_NAMES.get(status, "computeFault"): {"code": status, "message": text}
            }
        else:
            body = {"error": {"code": status, "title": phrase, "message": text}}
        return cls(_Response(status, body, dict(headers)))


def _stamp_z(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp_us(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _parse_version(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(match[1]), int(match[2])) if match else None


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _devices() -> Iterator[str]:
    for letter in "abcdefghijklmnopqrstuvwxyz":
        yield f"/dev/vd{letter}"


_UUID = r"[0-9a-fA-F-]{32,36}"
_PROJECT = r"(?:/(?P<project>[0-9a-f]{32}))?"
_Handler = Callable[..., _Response]


class OpenStackSimulator:
    """Keystone, Nova and Cinder on 127.0.0.1 over one Ceph cluster; see the module's doc."""

    def __init__(
        self,
        ceph_conf: str,
        ceph_keyring: str,
        ceph_client_id: str = "admin",
        volumes_pool: str = "volumes",
        vms_pool: str = "vms",
        username: str = "demo",
        password: str = "secret",
        project_name: str = "demo",
        user_domain: str = "Default",
        project_domain: str = "Default",
        region: str = "RegionOne",
        tls: tuple[str, str] | None = None,
        *,
        port: int = 0,
        token_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ceph_conf = ceph_conf
        self.ceph_keyring = ceph_keyring
        self.ceph_client_id = ceph_client_id
        self.volumes_pool = volumes_pool
        self.vms_pool = vms_pool
        self.username = username
        self._password = password
        self.project_name = project_name
        self.user_domain = user_domain
        self.project_domain = project_domain
        self.region = region
        self.tls = tls
        self.token_ttl = token_ttl
        self.clock = clock
        self.user_id = uuid.uuid4().hex
        self.project_id = uuid.uuid4().hex
        self.glance_image_id = str(uuid.uuid4())  # what servers booted from an image name
        self.rbd_secret_uuid = str(uuid.uuid4())  # libvirt's secret for the Ceph key
        self._roles = [{"id": uuid.uuid4().hex, "name": n} for n in ("admin", "member", "reader")]
        self._service_ids = {n: uuid.uuid4().hex for n in ("identity", "compute", "volume")}
        self._backend_uuids = {n: str(uuid.uuid4()) for n in ("ceph", "lvm")}

        self._lock = threading.RLock()
        self._tokens: dict[str, _Token] = {}
        self._volumes: dict[str, _Volume] = {}
        self._servers: dict[str, _Server] = {}
        self._attachments: dict[str, _Attachment] = {}
        # network name -> (network id, {IP version: subnet id}), made on first use
        self._networks: dict[str, tuple[str, dict[int, str]]] = {}
        self._macs: set[str] = set()
        self._failures: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._calls: list[Call] = []
        self._instance_seq = 0

        self._requested_port = port
        self._httpd: SimulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._rados: Any = None
        self._rados_lock = threading.Lock()
        self._routes = self._route_table()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Listen on 127.0.0.1 (a free port unless one was given); the base URL."""
        if self._httpd is not None:
            return self.base_url
        self._stopping.clear()
        httpd = SimulatorHTTPServer(("127.0.0.1", self._requested_port), self, _RequestHandler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls[0], self.tls[1])
            # The handshake happens in the connection's thread (_RequestHandler.setup).
            httpd.socket = context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name=f"openstack-sim:{self.port}",
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving: late answers (delay) are dropped, open connections closed."""
        self._stopping.set()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._rados_lock:
            if self._rados is not None:
                self._rados.shutdown()
                self._rados = None

    def __enter__(self) -> OpenStackSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise SimulatorError("the simulator is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/identity/v3"

    @property
    def compute_url(self) -> str:
        return f"{self.base_url}/compute/v2.1"

    @property
    def volume_url(self) -> str:
        return f"{self.base_url}/volume/v3/{self.project_id}"

    def connect_kwargs(self) -> dict[str, Any]:
        """Arguments for openstack.connect() that reach this cloud (add verify/cacert)."""
        return {
            "auth_url": self.auth_url,
            "username": self.username,
            "password": self._password,
            "project_name": self.project_name,
            "user_domain_name": self.user_domain,
            "project_domain_name": self.project_domain,
            "region_name": self.region,
            "interface": "public",
        }

    # -- faults and records ----------------------------------------------------------------------

    def fail_next(
        self, path_regex: str, status: int, count: int = 1, *, method: str | None = None
    ) -> None:
        """The next `count` requests whose path matches get `status` and the service's error
        body, before authentication is checked (as a failing API process or proxy would)."""
        with self._lock:
            self._failures.append(_Rule(re.compile(path_regex), method, count, status=status))

    def delay(
        self,
        path_regex: str,
        seconds: float,
        count: int | None = None,
        *,
        method: str | None = None,
    ) -> None:
        """Answer matching requests `seconds` late (all of them until clear_faults(), or the
        next `count`). A client whose timeout is shorter gives up; the answer is then lost."""
        with self._lock:
            self._delays.append(_Rule(re.compile(path_regex), method, count, seconds=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._failures.clear()
            self._delays.clear()

    def set_password(self, password: str) -> None:
        """Change the user's password; tokens already issued stay valid, as in Keystone."""
        with self._lock:
            self._password = password

    def revoke_tokens(self) -> None:
        """Forget every token issued (Keystone's key rotation or a revocation): the next
        request with one gets 401."""
        with self._lock:
            self._tokens.clear()

    @property
    def calls(self) -> list[Call]:
        """The API requests answered so far, oldest first (a request is recorded when its
        answer is written: a delayed one only after its delay, and not if stop() drops it)."""
        with self._lock:
            return list(self._calls)

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # -- Ceph ------------------------------------------------------------------------------------

    def _cluster(self) -> Any:
        with self._rados_lock:
            if self._rados is None:
                import rados

                cluster = rados.Rados(
                    conffile=self.ceph_conf,
                    rados_id=self.ceph_client_id,
                    conf={"keyring": self.ceph_keyring},
                )
                cluster.connect(timeout=10)
                self._rados = cluster
            return self._rados

    @contextlib.contextmanager
    def _ioctx(self, pool: str) -> Iterator[Any]:
        ioctx = self._cluster().open_ioctx(pool)
        try:
            yield ioctx
        finally:
            ioctx.close()

    @staticmethod
    def _features() -> int:
        import rbd

        return int(
            rbd.RBD_FEATURE_LAYERING
            | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
            | rbd.RBD_FEATURE_OBJECT_MAP
            | rbd.RBD_FEATURE_FAST_DIFF
            | rbd.RBD_FEATURE_DEEP_FLATTEN
        )

    def _monitors(self) -> tuple[list[str], list[str]]:
        """The monitors' hosts and ports, as Cinder's RBD driver puts them in connection info."""
        text = str(self._cluster().conf_get("mon_host"))
        found = re.findall(r"(\d+\.\d+\.\d+\.\d+):(\d+)", text)
        return [h for h, _ in found], [p for _, p in found]

    def _create_image(
        self, pool: str, name: str, size: int, clone_of: tuple[str, str, str] | None = None
    ) -> None:
        import rbd

        with self._ioctx(pool) as ioctx:
            if clone_of is None:
                rbd.RBD().create(ioctx, name, size, old_format=False, features=self._features())
                return
            parent_pool, parent, snap = clone_of
            with self._ioctx(parent_pool) as parent_ioctx:
                with rbd.Image(parent_ioctx, parent, snapshot=snap, read_only=True) as image:
                    parent_size = int(image.size())
                if size < parent_size:
                    raise SimulatorError(
                        f"a clone of {parent_pool}/{parent}@{snap} ({parent_size} bytes) "
                        f"cannot be smaller ({size} bytes)"
                    )
                with rbd.Image(parent_ioctx, parent) as image:
                    if not image.is_protected_snap(snap):
                        image.protect_snap(snap)
                rbd.RBD().clone(parent_ioctx, parent, snap, ioctx, name, features=self._features())
            if size > parent_size:
                with rbd.Image(ioctx, name) as image:
                    image.resize(size)

    def _remove_image(self, pool: str, name: str) -> bool:
        """Remove an image; False when Ceph refuses (snapshots, watchers, clones)."""
        import rbd

        with self._ioctx(pool) as ioctx:
            try:
                rbd.RBD().remove(ioctx, name)
            except rbd.ImageNotFound:
                return True
            except (rbd.ImageHasSnapshots, rbd.ImageBusy):
                return False
        return True

    # -- the cloud's content ---------------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        ceph: bool = True,
        image_name: str | None = None,
        clone_of: tuple[str, str, str] | None = None,
    ) -> str:
        """A volume, `available`; its id. On Ceph (volume_type `ceph`) it is the RBD image
        `volume-<id>` in the volumes pool, or `image_name` there; with `clone_of=(pool, image,
        snap)` a copy-on-write clone of that snapshot (protected first). Otherwise (volume_type
        `lvm`) there is no image and its connection info is iSCSI's."""
        if size_bytes <= 0:
            raise SimulatorError(f"volume size must be positive, not {size_bytes}")
        if not ceph and (image_name or clone_of):
            raise SimulatorError("image_name and clone_of are for Ceph volumes")
        volume_id = str(uuid.uuid4())
        image = (image_name or f"volume-{volume_id}") if ceph else None
        if image is not None:
            self._create_image(self.volumes_pool, image, size_bytes, clone_of)
        now = self.clock()
        with self._lock:
            self._volumes[volume_id] = _Volume(
                volume_id, name, size_bytes, image, now, False, None, now
            )
        return volume_id

    def create_server(
        self,
        name: str,
        *,
        boot_image_size: int | None = None,
        volumes: Sequence[str] = (),
        vcpus: int = 1,
        ram_mib: int = 2048,
        nics: Sequence[Nic] = (),
    ) -> str:
        """An ACTIVE server; its id. With `boot_image_size` it was booted from a Glance image:
        its root disk `/dev/vda` is the RBD image `<id>_disk` in the vms pool, and `volumes`
        are attached from `/dev/vdb` on. Without, it boots from its first volume (`/dev/vda`,
        made bootable) and the others follow. Its flavor has `vcpus` and `ram_mib`; it has
        one port per `nics`, in that order."""
        if boot_image_size is None and not volumes:
            raise SimulatorError("a server boots from an image (boot_image_size) or a volume")
        if boot_image_size is not None and boot_image_size <= 0:
            raise SimulatorError(f"root disk size must be positive, not {boot_image_size}")
        if vcpus <= 0 or ram_mib <= 0:
            raise SimulatorError(f"a flavor has vcpus and ram, not {vcpus} and {ram_mib} MiB")
        for nic in nics:
            _check_nic(nic)
        with self._lock:
            for volume_id in volumes:
                self._available_volume(volume_id)
            if len(set(volumes)) != len(volumes):
                raise SimulatorError("a volume is attached to a server once")
            self._instance_seq += 1
            seq = self._instance_seq
        server_id = str(uuid.uuid4())
        root_image = None
        if boot_image_size is not None:
            root_image = f"{server_id}_disk"
            self._create_image(self.vms_pool, root_image, boot_image_size)
        root_gib = -(-boot_image_size // GiB) if boot_image_size else 0
        server = _Server(
            server_id,
            name,
            self.clock(),
            f"instance-{seq:08x}",
            f"r-{secrets.token_hex(4)}",
            self.glance_image_id if root_image else None,
            root_image,
            root_gib,
            vcpus=vcpus,
            ram_mib=ram_mib,
        )
        try:
            with self._lock:
                server.ports = self._new_ports(nics)
                self._servers[server_id] = server
                try:
                    for volume_id in volumes:
                        self._attach(server, volume_id)
                except BaseException:
                    self._delete_server_locked(server)
                    raise
                if root_image is None:
                    self._volumes[volumes[0]].bootable = True
        except BaseException:
            # A volume was taken meanwhile by another caller: no server, no root disk.
            if root_image:
                self._remove_image(self.vms_pool, root_image)
            raise
        return server_id

    def _new_ports(self, nics: Sequence[Nic]) -> list[_Port]:
        """One port per nic, each MAC unique in the cloud (all made, or none); a network is
        made on first use, with a subnet per IP version. Call it holding the lock."""
        ports: list[_Port] = []
        taken = set(self._macs)
        for nic in nics:
            mac = (nic.mac or "").lower()
            if mac in taken:
                raise SimulatorError(f"MAC address {nic.mac} is in use")
            while not mac or mac in taken:
                mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            taken.add(mac)
            net_id, subnets = self._networks.setdefault(nic.network, (str(uuid.uuid4()), {}))
            fixed = [
                (ip, subnets.setdefault(ipaddress.ip_address(ip).version, str(uuid.uuid4())))
                for ip in nic.fixed_ips
            ]
            ports.append(
                _Port(str(uuid.uuid4()), nic.network, net_id, mac, fixed, list(nic.floating_ips))
            )
        self._macs.update(port.mac for port in ports)
        return ports

    def attach_volume(self, server_id: str, volume_id: str) -> str:
        """Attach an available volume at the server's first free device; the Cinder
        attachment id."""
        with self._lock:
            return self._attach(self._server(server_id), volume_id).id

    def detach_volume(self, server_id: str, volume_id: str) -> None:
        with self._lock:
            server = self._server(server_id)
            volume = self._volume(volume_id)
            if volume.attachment is None or volume.attachment.server_id != server_id:
                raise SimulatorError(f"volume {volume_id} is not attached to server {server_id}")
            if server.root_image is None and server.volumes[0] == volume_id:
                raise SimulatorError(f"volume {volume_id} is the root disk of server {server_id}")
            self._detach(server, volume)

    def delete_server(self, server_id: str) -> str | None:
        """The server is gone (404 from then on) and its volumes are detached (never deleted:
        `delete_on_termination` is false). Its ephemeral root image is removed; when Ceph
        refuses (the image has snapshots or is open) it stays, and its name is returned."""
        with self._lock:
            server = self._server(server_id)
            self._delete_server_locked(server)
        if server.root_image and not self._remove_image(self.vms_pool, server.root_image):
            return server.root_image
        return None

    def delete_volume(self, volume_id: str) -> None:
        """Delete an available volume and its image. A volume whose image has snapshots or
        clones, or is open, stays as it was (SimulatorError), as Cinder's RBD driver does."""
        with self._lock:
            volume = self._volume(volume_id)
            if volume.attachment is not None:
                raise SimulatorError(f"volume {volume_id} is in-use")
            if volume.image and not self._remove_image(self.volumes_pool, volume.image):
                raise SimulatorError(
                    f"volume {volume_id}: image {self.volumes_pool}/{volume.image} is busy "
                    "(it has snapshots or clones, or is open)"
                )
            del self._volumes[volume_id]

    def volume_image(self, volume_id: str) -> str | None:
        """`<pool>/<image>` of a Ceph volume, None for another backend."""
        with self._lock:
            volume = self._volume(volume_id)
            return f"{self.volumes_pool}/{volume.image}" if volume.image else None

    def _server(self, server_id: str) -> _Server:
        try:
            return self._servers[server_id]
        except KeyError:
            raise SimulatorError(f"no server {server_id}") from None

    def _volume(self, volume_id: str) -> _Volume:
        try:
            return self._volumes[volume_id]
        except KeyError:
            raise SimulatorError(f"no volume {volume_id}") from None

    def _available_volume(self, volume_id: str) -> _Volume:
        volume = self._volume(volume_id)
        if volume.attachment is not None:
            raise SimulatorError(
                f"volume {volume_id} is in-use (attached to {volume.attachment.server_id})"
            )
        return volume

    def _attach(self, server: _Server, volume_id: str) -> _Attachment:
        volume = self._available_volume(volume_id)
        attached = (self._volumes[v].attachment for v in server.volumes)
        used = {a.device for a in attached if a is not None}
        if server.root_image:
            used.add("/dev/vda")
        device = next((d for d in _devices() if d not in used), None)
        if device is None:
            raise SimulatorError(f"server {server.id} has no free device")
        now = self.clock()
        attachment = _Attachment(
            str(uuid.uuid4()), volume_id, server.id, device, str(uuid.uuid4()), now
        )
        volume.attachment = attachment
        volume.updated_at = now
        server.volumes.append(volume_id)
        self._attachments[attachment.id] = attachment
        return attachment

    def _detach(self, server: _Server, volume: _Volume) -> None:
        assert volume.attachment is not None
        del self._attachments[volume.attachment.id]
        volume.attachment = None
        volume.updated_at = self.clock()
        server.volumes.remove(volume.id)

    def _delete_server_locked(self, server: _Server) -> None:
        for volume_id in list(server.volumes):
            self._detach(server, self._volumes[volume_id])
        self._macs -= {port.mac for port in server.ports}
        self._servers.pop(server.id, None)

    # -- HTTP ------------------------------------------------------------------------------------

    def _route_table(self) -> list[tuple[str, re.Pattern[str], str | None, bool, _Handler]]:
        """(method, path, service, needs a token, handler)."""
        nova = r"/compute/v2\.1" + _PROJECT
        server = nova + rf"/servers/(?P<server_id>{_UUID})"
        cinder = r"/volume/v3" + _PROJECT
        volume = cinder + rf"/volumes/(?P<volume_id>{_UUID})"
        attachment = cinder + rf"/attachments/(?P<attachment_id>{_UUID})"
        table: list[tuple[str, str, str | None, bool, _Handler]] = [
            ("GET", r"/identity/?", "identity", False, self._identity_versions),
            ("GET", r"/identity/v3/?", "identity", False, self._identity_version),
            ("POST", r"/identity/v3/auth/tokens", "identity", False, self._issue_token),
            ("GET", r"/identity/v3/auth/tokens", "identity", False, self._validate_token),
            ("HEAD", r"/identity/v3/auth/tokens", "identity", False, self._validate_token),
            ("DELETE", r"/identity/v3/auth/tokens", "identity", False, self._revoke_token),
            ("GET", r"/compute/?", "compute", False, self._nova_versions),
            ("GET", r"/compute/v2\.1/?", "compute", False, self._nova_version),
            ("GET", nova + r"/servers", "compute", True, self._list_servers),
            ("GET", nova + r"/servers/detail", "compute", True, self._list_servers_detail),
            ("GET", server, "compute", True, self._show_server),
            ("GET", server + "/os-volume_attachments", "compute", True, self._list_vas),
            ("GET", server + rf"/os-volume_attachments/(?P<volume_id>{_UUID})", "compute",
             True, self._show_va),
            ("GET", server + "/os-interface", "compute", True, self._list_interfaces),
            ("GET", server + rf"/os-interface/(?P<port_id>{_UUID})", "compute", True,
             self._show_interface),
            ("GET", r"/volume/?", "volume", False, self._cinder_versions),
            ("GET", r"/volume/v3/?", "volume", False, self._cinder_versions),
            ("GET", cinder + r"/volumes", "volume", True, self._list_volumes),
            ("GET", cinder + r"/volumes/detail", "volume", True, self._list_volumes_detail),
            ("GET", volume, "volume", True, self._show_volume),
            ("GET", cinder + r"/attachments", "volume", True, self._list_attachments),
            ("GET", cinder + r"/attachments/detail", "volume", True, self._list_attachments_detail),
            ("GET", attachment, "volume", True, self._show_attachment),
        ]  # fmt: skip
        return [(m, re.compile(p), s, auth, h) for m, p, s, auth, h in table]

    def _service_of(self, path: str) -> str | None:
        for service, prefix in (
            ("identity", "/identity"),
            ("compute", "/compute"),
            ("volume", "/volume"),
        ):
            if path == prefix or path.startswith(prefix + "/"):
                return service
        return None

    def _handle(self, handler: _RequestHandler) -> None:
        """One request, from reading its body to writing the answer."""
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        req = _Request(handler.command, url.path, parse_qs(url.query), handler.headers, body)
        req.service = self._service_of(req.path)
        if req.path == "/_sim" or req.path.startswith("/_sim/"):
            try:
                _send(handler, self._admin(req))
            except _HTTPError as exc:
                _send(handler, exc.response)
            return
        with self._lock:
            seconds = sum(r.seconds for r in self._delays if r.take(req.method, req.path))
        if seconds and self._stopping.wait(seconds):
            handler.close_connection = True
            return
        try:
            with self._lock:
                fault = next((r for r in self._failures if r.take(req.method, req.path)), None)
            if fault is not None:
                raise _HTTPError.of(req.service, fault.status)
            response = self._route(req)
        except _HTTPError as exc:
            response = exc.response
        except Exception:
            # A bug here, answered as Nova and Cinder answer theirs.
            log.exception("%s %s failed", req.method, req.path)
            response = _HTTPError.of(req.service, 500).response
        if req.version is not None:
            text = _version_text(req.version)
            if req.service == "compute":
                response.headers[VERSION_HEADER] = f"compute {text}"
                response.headers[NOVA_LEGACY_HEADER] = text
                response.headers["Vary"] = f"{VERSION_HEADER}, {NOVA_LEGACY_HEADER}"
            else:
                response.headers[VERSION_HEADER] = f"volume {text}"
                response.headers["Vary"] = VERSION_HEADER
        with self._lock:
            self._calls.append(
                Call(
                    req.method,
                    req.path,
                    response.status,
                    _version_text(req.version) if req.version else None,
                )
            )
        _send(handler, response)

    def _route(self, req: _Request) -> _Response:
        allowed = False
        for method, pattern, service, needs_token, handler in self._routes:
            match = pattern.fullmatch(req.path)
            if match is None:
                continue
            if method != req.method:
                allowed = True
                continue
            args = {k: v for k, v in match.groupdict().items() if k != "project"}
            if needs_token:
                self._authenticate(req)
                project = match.groupdict().get("project")
                if project is not None and project != self.project_id:
                    raise _HTTPError.of(
                        service,
                        400,
                        f"Malformed request URL: URL's project_id '{project}' doesn't match "
                        f"Context's project_id '{self.project_id}'",
                    )
                self._negotiate(req)
            return handler(req, **args)
        if allowed:
            raise _HTTPError.of(req.service, 405, "The method is not allowed for this resource.")
        raise _HTTPError.of(req.service, 404, "The resource could not be found.")

    def _authenticate(self, req: _Request) -> _Token:
        """keystonemiddleware: a valid token or 401 (which makes keystoneauth re-authenticate)."""
        token_id = req.headers.get("X-Auth-Token") or ""
        with self._lock:
            token = self._tokens.get(token_id)
            if token is not None and token.expires_at <= self.clock():
                del self._tokens[token_id]
                token = None
        if token is None:
            raise _HTTPError(
                _Response(
                    401,
                    {"error": {"code": 401, "title": "Unauthorized", "message": _AUTH_REQUIRED}},
                    {"WWW-Authenticate": f'Keystone uri="{self.base_url}/identity"'},
                )
            )
        return token

    def _negotiate(self, req: _Request) -> None:
        if req.service == "compute":
            name, low, high = "compute", NOVA_MIN, NOVA_MAX
        else:
            name, low, high = "volume", CINDER_MIN, CINDER_MAX
        asked = None
        for value in req.headers.get_all(VERSION_HEADER) or []:
            for item in value.split(","):
                parts = item.split()
                if len(parts) == 2 and parts[0].lower() == name:
                    asked = parts[1]
        if asked is None and name == "compute":
            asked = req.headers.get(NOVA_LEGACY_HEADER)
        if asked is None:
            req.version = low
            return
        if asked.strip().lower() == "latest":
            req.version = high
            return
        version = _parse_version(asked)
        if version is None:
            raise _HTTPError.of(
                req.service,
                400,
                f"API Version String {asked} is of invalid format. Must be of "
                "format MajorNum.MinorNum.",
            )
        if not low <= version <= high:
            raise _HTTPError.of(
                req.service,
                406,
                f"Version {_version_text(version)} is not supported by the API. Minimum is "
                f"{_version_text(low)} and maximum is {_version_text(high)}.",
            )
        req.version = version

    # -- Keystone --------------------------------------------------------------------------------

    def _identity_version_doc(self) -> dict[str, Any]:
        return {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{self.base_url}/identity/v3/"}],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
            ],
        }

    def _identity_versions(self, req: _Request) -> _Response:
        return _Response(
            300,
            {"versions": {"values": [self._identity_version_doc()]}},
            {"Location": f"{self.base_url}/identity/v3/"},
        )

    def _identity_version(self, req: _Request) -> _Response:
        return _Response(200, {"version": self._identity_version_doc()})

    def _issue_token(self, req: _Request) -> _Response:
        body = req.json()
        try:
            auth = body["auth"]
            identity = auth["identity"]
            if "password" not in identity.get("methods", []):
                raise _HTTPError.of("identity", 401, _AUTH_REQUIRED)
            user = identity["password"]["user"]
            password = user["password"]
        except (KeyError, TypeError) as exc:
            raise _HTTPError.of(
                "identity",
                400,
                f"Expecting to find {exc} in request body. The server could not comply with the "
                "request since it is either malformed or otherwise incorrect. The client is "
                "assumed to be in error.",
            ) from None
        with self._lock:
            right = secrets.compare_digest(str(password), self._password)
        if not (right and self._is_user(user)):
            raise _HTTPError.of("identity", 401, _AUTH_REQUIRED)
        scope = auth.get("scope")
        if scope is not None and not self._is_project(scope.get("project") or {}):
            raise _HTTPError.of("identity", 401, _AUTH_REQUIRED)
        now = self.clock()
        token = _Token(
            "gAAAAAB" + secrets.token_urlsafe(96),
            now,
            now + self.token_ttl,
            secrets.token_urlsafe(16)[:22],
        )
        with self._lock:
            self._tokens[token.id] = token
        return _Response(
            201,
            self._token_body(token, scoped=scope is not None),
            {"X-Subject-Token": token.id},
        )

    def _domain_matches(self, domain: Any, name: str) -> bool:
        if not isinstance(domain, dict):
            return False
        domain_id = "default" if name == "Default" else name.lower()
        return domain.get("name") == name or domain.get("id") == domain_id

    def _is_user(self, user: dict[str, Any]) -> bool:
        if "id" in user:
            return bool(user["id"] == self.user_id)
        return bool(
            user.get("name") == self.username
            and self._domain_matches(user.get("domain"), self.user_domain)
        )

    def _is_project(self, project: dict[str, Any]) -> bool:
        if "id" in project:
            return bool(project["id"] == self.project_id)
        return bool(
            project.get("name") == self.project_name
            and self._domain_matches(project.get("domain"), self.project_domain)
        )

    def _domain(self, name: str) -> dict[str, str]:
        return {"id": "default" if name == "Default" else name.lower(), "name": name}

    def _token_body(self, token: _Token, *, scoped: bool, catalog: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "methods": ["password"],
            "user": {
                "domain": self._domain(self.user_domain),
                "id": self.user_id,
                "name": self.username,
                "password_expires_at": None,
            },
            "audit_ids": [token.audit_id],
            "expires_at": _stamp_us(token.expires_at) + "Z",
            "issued_at": _stamp_us(token.issued_at) + "Z",
        }
        if scoped:
            body["project"] = {
                "domain": self._domain(self.project_domain),
                "id": self.project_id,
                "name": self.project_name,
            }
            body["is_domain"] = False
            body["roles"] = self._roles
            if catalog:
                body["catalog"] = self._catalog()
        return {"token": body}

    def _catalog(self) -> list[dict[str, Any]]:
        base = self.base_url
        services = [
            ("identity", "keystone", "identity", f"{base}/identity"),
            ("compute", "nova", "compute", f"{base}/compute/v2.1"),
            ("volumev3", "cinderv3", "volume", f"{base}/volume/v3/{self.project_id}"),
            ("block-storage", "cinder", "volume", f"{base}/volume/v3/{self.project_id}"),
        ]
        catalog = []
        for kind, name, key, url in services:
            service_id = hashlib.md5(f"{self._service_ids[key]}{kind}".encode()).hexdigest()
            endpoints = [
                {
                    "id": hashlib.md5(f"{service_id}{interface}".encode()).hexdigest(),
                    "interface": interface,
                    "region_id": self.region,
                    "url": url,
                    "region": self.region,
                }
                for interface in ("public", "internal", "admin")
            ]
            catalog.append({"endpoints": endpoints, "id": service_id, "type": kind, "name": name})
        return catalog

    def _validate_token(self, req: _Request) -> _Response:
        self._authenticate(req)
        subject = req.headers.get("X-Subject-Token") or ""
        with self._lock:
            token = self._tokens.get(subject)
        if token is None or token.expires_at <= self.clock():
            raise _HTTPError.of("identity", 404, f"Could not find token: {subject}.")
        nocatalog = req.param("nocatalog") is not None
        body = self._token_body(token, scoped=True, catalog=not nocatalog)
        return _Response(200, None if req.method == "HEAD" else body, {"X-Subject-Token": subject})

    def _revoke_token(self, req: _Request) -> _Response:
        self._authenticate(req)
        subject = req.headers.get("X-Subject-Token") or ""
        with self._lock:
            if self._tokens.pop(subject, None) is None:
                raise _HTTPError.of("identity", 404, f"Could not find token: {subject}.")
        return _Response(204)

    # -- Nova ------------------------------------------------------------------------------------

    def _nova_version_doc(self, version: str) -> dict[str, Any]:
        current = version == "v2.1"
        return {
            "id": version,
            "status": "CURRENT" if current else "SUPPORTED",
            "version": _version_text(NOVA_MAX) if current else "",
            "min_version": _version_text(NOVA_MIN) if current else "",
            "updated": "2013-07-23T11:33:21Z" if current else "2011-01-21T11:33:21Z",
            "links": [{"rel": "self", "href": f"{self.base_url}/compute/{version[:4]}/"}],
        }

    def _nova_versions(self, req: _Request) -> _Response:
        return _Response(
            200, {"versions": [self._nova_version_doc("v2.0"), self._nova_version_doc("v2.1")]}
        )

    def _nova_version(self, req: _Request) -> _Response:
        doc = self._nova_version_doc("v2.1")
        doc["links"].append(
            {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"}
        )
        doc["media-types"] = [
            {
                "base": "application/json",
                "type": "application/vnd.openstack.compute+json;version=2.1",
            }
        ]
        return _Response(200, {"version": doc})

    def _found_server(self, server_id: str) -> _Server:
        server = self._servers.get(server_id)
        if server is None:
            raise _HTTPError.of("compute", 404, f"Instance {server_id} could not be found.")
        return server

    def _filtered_servers(self, req: _Request) -> list[_Server]:
        servers = sorted(self._servers.values(), key=lambda s: s.created_at, reverse=True)
        name = req.param("name")
        if name is not None:
            try:
                pattern = re.compile(name)
            except re.error:
                pattern = re.compile(re.escape(name))
            servers = [s for s in servers if pattern.search(s.name)]
        status = req.param("status")
        if status is not None and status.upper() != "ACTIVE":
            servers = []
        return _paginate(req, servers, "compute")

    def _server_links(self, kind: str, item_id: str) -> list[dict[str, str]]:
        return [
            {"rel": "self", "href": f"{self.compute_url}/{kind}/{item_id}"},
            {"rel": "bookmark", "href": f"{self.base_url}/compute/{kind}/{item_id}"},
        ]

    def _list_servers(self, req: _Request) -> _Response:
        with self._lock:
            servers = self._filtered_servers(req)
            body = [
                {"id": s.id, "name": s.name, "links": self._server_links("servers", s.id)}
                for s in servers
            ]
        return _Response(200, {"servers": body})

    def _list_servers_detail(self, req: _Request) -> _Response:
        with self._lock:
            servers = self._filtered_servers(req)
            body = [self._server_view(req, s, detail=True) for s in servers]
        return _Response(200, {"servers": body})

    def _show_server(self, req: _Request, server_id: str) -> _Response:
        with self._lock:
            return _Response(200, {"server": self._server_view(req, self._found_server(server_id))})

    def _server_view(self, req: _Request, s: _Server, *, detail: bool = False) -> dict[str, Any]:
        flavor_name = "m1.small" if s.root_image else "m1.bfv"
        if req.at_least(2, 47):
            flavor: dict[str, Any] = {
                "vcpus": s.vcpus,
                "ram": s.ram_mib,
                "disk": s.root_gib,
                "ephemeral": 0,
                "swap": 0,
                "original_name": flavor_name,
                "extra_specs": {},
            }
        else:
            flavor = {
                "id": "2" if s.root_image else "6",
                "links": [
                    {
                        "rel": "bookmark",
                        "href": f"{self.base_url}/compute/flavors/{2 if s.root_image else 6}",
                    }
                ],
            }
        image: Any = ""
        if s.image_id:
            image = {
                "id": s.image_id,
                "links": [
                    {"rel": "bookmark", "href": f"{self.base_url}/compute/images/{s.image_id}"}
                ],
            }
            if req.at_least(2, 98):
                image["properties"] = {}
        created = _stamp_z(s.created_at)
        host = "compute-0"
        view: dict[str, Any] = {
            "accessIPv4": "",
            "accessIPv6": "",
            "addresses": _addresses(s),
            "created": created,
            "flavor": flavor,
            "hostId": hashlib.sha224(f"{self.project_id}{host}".encode()).hexdigest(),
            "id": s.id,
            "image": image,
            "links": self._server_links("servers", s.id),
            "metadata": {},
            "name": s.name,
            "status": "ACTIVE",
            "tenant_id": self.project_id,
            "user_id": self.user_id,
            "updated": created,
            "OS-DCF:diskConfig": "MANUAL",
            "progress": 0,
            "OS-EXT-AZ:availability_zone": "nova",
            "config_drive": "",
            "key_name": None,
            "OS-SRV-USG:launched_at": _stamp_us(s.created_at),
            "OS-SRV-USG:terminated_at": None,
            "security_groups": [{"name": "default"}],
            "OS-EXT-SRV-ATTR:host": host,
            "OS-EXT-SRV-ATTR:instance_name": s.instance_name,
            "OS-EXT-SRV-ATTR:hypervisor_hostname": host,
            "OS-EXT-STS:task_state": None,
            "OS-EXT-STS:vm_state": "active",
            "OS-EXT-STS:power_state": 1,
            "os-extended-volumes:volumes_attached": [
                {"id": v, "delete_on_termination": False} if req.at_least(2, 3) else {"id": v}
                for v in s.volumes
            ],
        }
        if req.at_least(2, 3):
            view.update(
                {
                    "OS-EXT-SRV-ATTR:hostname": re.sub(r"[^a-z0-9-]", "-", s.name.lower())
                    or "server",
                    "OS-EXT-SRV-ATTR:kernel_id": "",
                    "OS-EXT-SRV-ATTR:launch_index": 0,
                    "OS-EXT-SRV-ATTR:ramdisk_id": "",
                    "OS-EXT-SRV-ATTR:reservation_id": s.reservation_id,
                    "OS-EXT-SRV-ATTR:root_device_name": "/dev/vda",
                    "OS-EXT-SRV-ATTR:user_data": None,
                }
            )
        if req.at_least(2, 9):
            view["locked"] = False
        if req.at_least(2, 16):
            view["host_status"] = "UP"
        if req.at_least(2, 19):
            view["description"] = None
        if req.at_least(2, 26):
            view["tags"] = []
        if req.at_least(2, 63):
            view["trusted_image_certificates"] = None
        if req.at_least(2, 71) and not detail:
            view["server_groups"] = []
        if req.at_least(2, 73):
            view["locked_reason"] = None
        if req.at_least(2, 96):
            view["pinned_availability_zone"] = None
        if req.at_least(2, 100):
            view["scheduler_hints"] = {}
        return view

    def _volume_attachment_view(self, req: _Request, a: _Attachment) -> dict[str, Any]:
        view: dict[str, Any] = {}
        if not req.at_least(2, 89):
            view["id"] = a.volume_id
        view.update({"volumeId": a.volume_id, "serverId": a.server_id, "device": a.device})
        if req.at_least(2, 70):
            view["tag"] = None
        if req.at_least(2, 79):
            view["delete_on_termination"] = False
        if req.at_least(2, 89):
            view["attachment_id"] = a.id
            view["bdm_uuid"] = a.bdm_uuid
        return view

    def _list_vas(self, req: _Request, server_id: str) -> _Response:
        with self._lock:
            server = self._found_server(server_id)
            attachments = [self._volumes[v].attachment for v in server.volumes]
            body = [self._volume_attachment_view(req, a) for a in attachments if a is not None]
        return _Response(200, {"volumeAttachments": _paginate(req, body, "compute", key=None)})

    def _show_va(self, req: _Request, server_id: str, volume_id: str) -> _Response:
        with self._lock:
            server = self._found_server(server_id)
            if volume_id not in server.volumes:
                raise _HTTPError.of(
                    "compute", 404, f"Instance {server_id} is not attached to volume {volume_id}"
                )
            attachment = self._volumes[volume_id].attachment
            assert attachment is not None
            return _Response(
                200, {"volumeAttachment": self._volume_attachment_view(req, attachment)}
            )

    def _interface_view(self, req: _Request, port: _Port) -> dict[str, Any]:
        view: dict[str, Any] = {
            "fixed_ips": [{"ip_address": ip, "subnet_id": subnet} for ip, subnet in port.fixed_ips],
            "mac_addr": port.mac,
            "net_id": port.net_id,
            "port_id": port.id,
            "port_state": "ACTIVE",
        }
        if req.at_least(2, 70):
            view["tag"] = None
        return view

    def _list_interfaces(self, req: _Request, server_id: str) -> _Response:
        with self._lock:
            server = self._found_server(server_id)
            body = [self._interface_view(req, port) for port in server.ports]
        return _Response(200, {"interfaceAttachments": body})

    def _show_interface(self, req: _Request, server_id: str, port_id: str) -> _Response:
        with self._lock:
            server = self._found_server(server_id)
            for port in server.ports:
                if port.id == port_id:
                    return _Response(200, {"interfaceAttachment": self._interface_view(req, port)})
        raise _HTTPError.of(
            "compute", 404, f"Instance {server_id} does not have a port with id {port_id}"
        )

    # -- Cinder ----------------------------------------------------------------------------------

    def _cinder_versions(self, req: _Request) -> _Response:
        doc = {
            "id": "v3.0",
            "status": "CURRENT",
            "version": _version_text(CINDER_MAX),
            "min_version": _version_text(CINDER_MIN),
            "updated": "2023-08-31T00:00:00Z",
            "links": [
                {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
                {"rel": "self", "href": f"{self.base_url}/volume/v3/"},
            ],
            "media-types": [
                {
                    "base": "application/json",
                    "type": "application/vnd.openstack.volume+json;version=3",
                }
            ],
        }
        versioned = req.path.rstrip("/").endswith("/v3")
        return _Response(200 if versioned else 300, {"versions": [doc]})

    def _found_volume(self, volume_id: str) -> _Volume:
        volume = self._volumes.get(volume_id)
        if volume is None:
            raise _HTTPError.of("volume", 404, f"Volume {volume_id} could not be found.")
        return volume

    def _filtered_volumes(self, req: _Request) -> list[_Volume]:
        volumes = sorted(self._volumes.values(), key=lambda v: v.created_at, reverse=True)
        name = req.param("name")
        if name is not None:
            volumes = [v for v in volumes if v.name == name]
        status = req.param("status")
        if status is not None:
            volumes = [v for v in volumes if _volume_status(v) == status]
        return _paginate(req, volumes, "volume")

    def _volume_links(self, kind: str, item_id: str) -> list[dict[str, str]]:
        return [
            {"rel": "self", "href": f"{self.volume_url}/{kind}/{item_id}"},
            {
                "rel": "bookmark",
                "href": f"{self.base_url}/volume/{self.project_id}/{kind}/{item_id}",
            },
        ]

    def _list_volumes(self, req: _Request) -> _Response:
        with self._lock:
            body = [
                {"id": v.id, "name": v.name, "links": self._volume_links("volumes", v.id)}
                for v in self._filtered_volumes(req)
            ]
        return _Response(200, {"volumes": body})

    def _list_volumes_detail(self, req: _Request) -> _Response:
        with self._lock:
            body = [self._volume_view(req, v) for v in self._filtered_volumes(req)]
        return _Response(200, {"volumes": body})

    def _show_volume(self, req: _Request, volume_id: str) -> _Response:
        with self._lock:
            return _Response(200, {"volume": self._volume_view(req, self._found_volume(volume_id))})

    def _volume_view(self, req: _Request, v: _Volume) -> dict[str, Any]:
        backend = "ceph" if v.image else "lvm"
        attachments = []
        if v.attachment is not None:
            a = v.attachment
            attachments.append(
                {
                    "id": v.id,
                    "attachment_id": a.id,
                    "volume_id": v.id,
                    "server_id": a.server_id,
                    "host_name": "compute-0",
                    "device": a.device,
                    "attached_at": _stamp_us(a.attached_at),
                }
            )
        view: dict[str, Any] = {
            "id": v.id,
            "status": _volume_status(v),
            "size": -(-v.size_bytes // GiB),
            "availability_zone": "nova",
            "created_at": _stamp_us(v.created_at),
            "updated_at": _stamp_us(v.updated_at),
            "name": v.name,
            "description": None,
            "volume_type": backend,
            "snapshot_id": None,
            "source_volid": None,
            "metadata": {},
            "links": self._volume_links("volumes", v.id),
            "user_id": self.user_id,
            "bootable": "true" if v.bootable else "false",
            "encrypted": False,
            "replication_status": None,
            "consistencygroup_id": None,
            "multiattach": False,
            "attachments": attachments,
            "migration_status": None,
            "os-vol-host-attr:host": f"host@{backend}#{backend}",
            "os-vol-tenant-attr:tenant_id": self.project_id,
            "os-vol-mig-status-attr:migstat": None,
            "os-vol-mig-status-attr:name_id": None,
        }
        if req.at_least(3, 13):
            view["group_id"] = None
        if req.at_least(3, 21):
            view["provider_id"] = None
        if req.at_least(3, 48):
            view["shared_targets"] = False
            view["service_uuid"] = self._backend_uuids[backend]
        if req.at_least(3, 61):
            view["cluster_name"] = None
        if req.at_least(3, 63):
            view["volume_type_id"] = str(uuid.uuid5(uuid.NAMESPACE_OID, backend))
        if req.at_least(3, 65):
            view["consumes_quota"] = True
        return view

    def _need_new_attach(self, req: _Request) -> None:
        if not req.at_least(3, 27):
            raise _HTTPError.of(
                "volume",
                404,
                f"API version {_version_text(req.version or CINDER_MIN)} is not supported on "
                "this method.",
            )

    def _attachment_view(self, a: _Attachment, *, detail: bool) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": a.id,
            "status": "attached",
            "instance": a.server_id,
            "volume_id": a.volume_id,
        }
        if detail:
            view.update(
                {
                    "attached_at": _stamp_us(a.attached_at),
                    "detached_at": "",
                    "attach_mode": "rw",
                    "connection_info": self._connection_info(self._volumes[a.volume_id]),
                }
            )
        return view

    def _connection_info(self, v: _Volume) -> dict[str, Any]:
        if v.image:
            hosts, ports = self._monitors()
            return {
                "driver_volume_type": "rbd",
                "data": {
                    "name": f"{self.volumes_pool}/{v.image}",
                    "hosts": hosts,
                    "ports": ports,
                    "cluster_name": "ceph",
                    "auth_enabled": True,
                    "auth_username": self.ceph_client_id,
                    "secret_type": "ceph",
                    "secret_uuid": self.rbd_secret_uuid,
                    "volume_id": v.id,
                    "discard": True,
                    "keyring": None,
                    "qos_specs": None,
                    "access_mode": "rw",
                    "encrypted": False,
                },
            }
        return {
            "driver_volume_type": "iscsi",
            "data": {
                "target_discovered": False,
                "target_portal": "127.0.0.1:3260",
                "target_iqn": f"iqn.2010-10.org.openstack:volume-{v.id}",
                "target_lun": 1,
                "volume_id": v.id,
                "auth_method": "CHAP",
                "auth_username": hashlib.md5(f"user{v.id}".encode()).hexdigest()[:20],
                "auth_password": hashlib.md5(f"pass{v.id}".encode()).hexdigest()[:16],
                "qos_specs": None,
                "access_mode": "rw",
                "encrypted": False,
                "discard": False,
                "cacheable": False,
            },
        }

    def _filtered_attachments(self, req: _Request) -> list[_Attachment]:
        attachments = sorted(self._attachments.values(), key=lambda a: a.attached_at, reverse=True)
        for param, attr in (("volume_id", "volume_id"), ("instance_id", "server_id"), ("id", "id")):
            wanted = req.param(param)
            if wanted is not None:
                attachments = [a for a in attachments if getattr(a, attr) == wanted]
        status = req.param("status")
        if status is not None and status != "attached":
            attachments = []
        return _paginate(req, attachments, "volume")

    def _list_attachments(self, req: _Request) -> _Response:
        self._need_new_attach(req)
        with self._lock:
            body = [self._attachment_view(a, detail=False) for a in self._filtered_attachments(req)]
        return _Response(200, {"attachments": body})

    def _list_attachments_detail(self, req: _Request) -> _Response:
        self._need_new_attach(req)
        with self._lock:
            attachments = self._filtered_attachments(req)
        return _Response(
            200, {"attachments": [self._attachment_view(a, detail=True) for a in attachments]}
        )

    def _show_attachment(self, req: _Request, attachment_id: str) -> _Response:
        self._need_new_attach(req)
        with self._lock:
            attachment = self._attachments.get(attachment_id)
            if attachment is None:
                raise _HTTPError.of(
                    "volume",
                    404,
                    f"Volume attachment could not be found with filter: attachment_id = "
                    f"{attachment_id}.",
                )
        return _Response(200, {"attachment": self._attachment_view(attachment, detail=True)})

    # -- /_sim/ ----------------------------------------------------------------------------------

    def _admin(self, req: _Request) -> _Response:
        """The fault controls and a view of the state over HTTP, for a client in another
        process: GET calls, GET state, POST fail_next {path, status, count?, method?},
        POST delay {path, seconds, count?, method?}, POST clear_faults, POST revoke_tokens."""
        action = req.path.removeprefix("/_sim").strip("/")
        try:
            if req.method == "GET" and action == "calls":
                return _Response(200, {"calls": [asdict(c) for c in self.calls]})
            if req.method == "GET" and action == "state":
                return _Response(200, self.state())
            if req.method == "POST":
                args = req.json() or {}
                if action == "fail_next":
                    self.fail_next(
                        args["path"],
                        int(args["status"]),
                        int(args.get("count", 1)),
                        method=args.get("method"),
                    )
                    return _Response(204)
                if action == "delay":
                    count = args.get("count")
                    self.delay(
                        args["path"],
                        float(args["seconds"]),
                        None if count is None else int(count),
                        method=args.get("method"),
                    )
                    return _Response(204)
                if action == "clear_faults":
                    self.clear_faults()
                    return _Response(204)
                if action == "revoke_tokens":
                    self.revoke_tokens()
                    return _Response(204)
        except (KeyError, TypeError, ValueError, re.error) as exc:
            return _Response(400, {"error": {"code": 400, "message": f"bad arguments: {exc}"}})
        return _Response(404, {"error": {"code": 404, "message": f"no admin action {action!r}"}})

    def state(self) -> dict[str, Any]:
        """The servers and volumes as the simulator holds them (for debugging and /_sim/state)."""
        with self._lock:
            return {
                "project_id": self.project_id,
                "servers": [
                    {
                        "id": s.id,
                        "name": s.name,
                        "image_id": s.image_id,
                        "root_image": f"{self.vms_pool}/{s.root_image}" if s.root_image else None,
                        "volumes": list(s.volumes),
                        "vcpus": s.vcpus,
                        "ram_mib": s.ram_mib,
                        "ports": [asdict(port) for port in s.ports],
                    }
                    for s in self._servers.values()
                ],
                "volumes": [
                    {
                        "id": v.id,
                        "name": v.name,
                        "size_bytes": v.size_bytes,
                        "image": f"{self.volumes_pool}/{v.image}" if v.image else None,
                        "status": _volume_status(v),
                        "bootable": v.bootable,
                        "attachment": asdict(v.attachment) if v.attachment else None,
                    }
                    for v in self._volumes.values()
                ],
            }


def _check_nic(nic: Nic) -> None:
    if not nic.network:
        raise SimulatorError("a port is on a named network")
    for text in (*nic.fixed_ips, *nic.floating_ips):
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise SimulatorError(f"{text!r} is not an IP address") from None
    if nic.mac and not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", nic.mac):
        raise SimulatorError(f"{nic.mac!r} is not a MAC address")


def _addresses(server: _Server) -> dict[str, list[dict[str, Any]]]:
    """Nova's `addresses`: network name -> the fixed IPs of its ports, then their floating
    IPs, each with its port's MAC; a port without an IP leaves its network's list empty."""
    fixed: dict[str, list[dict[str, Any]]] = {}
    floating: dict[str, list[dict[str, Any]]] = {}
    for port in server.ports:
        for kind, ips, into in (
            ("fixed", [ip for ip, _ in port.fixed_ips], fixed),
            ("floating", port.floating_ips, floating),
        ):
            entries = into.setdefault(port.network, [])
            for ip in ips:
                entries.append({
                    "OS-EXT-IPS-MAC:mac_addr": port.mac,
                    "version": ipaddress.ip_address(ip).version,
                    "addr": ip,
                    "OS-EXT-IPS:type": kind,
                })  # fmt: skip
    return {network: entries + floating[network] for network, entries in fixed.items()}


def _volume_status(volume: _Volume) -> str:
    return "in-use" if volume.attachment is not None else "available"


def _paginate(req: _Request, items: list[Any], service: str, key: str | None = "id") -> list[Any]:
    """`marker` (the last id seen) then `limit`, as Nova and Cinder apply them."""
    marker = req.param("marker")
    if marker is not None and key is not None:
        ids = [getattr(item, key) for item in items]
        if marker not in ids:
            raise _HTTPError.of(service, 400, f"marker [{marker}] not found")
        items = items[ids.index(marker) + 1 :]
    limit = req.param("limit")
    if limit is not None:
        if not limit.isdigit():
            raise _HTTPError.of(service, 400, f"limit param must be an integer, not {limit!r}")
        items = items[: int(limit)]
    return items


def _send(handler: _RequestHandler, response: _Response) -> None:
    body = b"" if response.body is None else json.dumps(response.body).encode()
    try:
        handler.send_response(response.status)
        if response.body is not None:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("x-openstack-request-id", f"req-{uuid.uuid4()}")
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
        handler.wfile.flush()
    except (ConnectionError, TimeoutError, ssl.SSLError):
        handler.close_connection = True  # the client gave up (a timeout shorter than a delay)


class _RequestHandler(SimulatorRequestHandler):
    server_version = "Apache/2.4.58 (Ubuntu)"
