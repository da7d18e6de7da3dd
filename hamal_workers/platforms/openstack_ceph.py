"""OpenStack instances whose disks are Ceph RBD images: openstacksdk says which, librbd reads.

Which images (`[openstack]`, through Nova and Cinder):
  - each attached Cinder volume, in device order (`/dev/vda`, `/dev/vdb`, ...): the image
    its attachment's connection info names (`driver_volume_type: rbd`, `data.name`
    `pool/image`), or `volume-<id>` in `[ceph] volumes_pool` when the connection info
    cannot be read; a volume on another backend is skipped with the reason, never guessed;
  - the instance's ephemeral root disk `<instance id>_disk` in `[ceph] vms_pool` when it
    boots from an image.
  A disk is named `<device>-<volume id>` (`vda-ephemeral` for the root disk), so a volume
  swapped under the same device starts a chain of its own.

Snapshots (`[ceph]`, through the `rbd` binding), per run, named `hamal-<run id>`:
  1. a user snapshot of every image: the base the next sync's diff_iterate starts from;
  2. then, with `group_snapshots` and several disks, an RBD group `hamal-<run id>` holding
     the images and one group snapshot: the view the sync reads, one instant for every
     disk. Its member snapshots come after the user ones, so a diff from a user snapshot
     to the next run's group view covers every write since this run's view (a superset,
     which is exact: what is read is the view). When the group cannot be made (an image
     already in a group of Cinder's, a cluster without groups) the user snapshots are
     read, and the point says its disks were caught one by one (`consistency`).
  After the commit the group goes (`trim_snapshot`); the user snapshots stay as the base
  until the next point is committed. The proxy deletes only `hamal-<run id>` snapshots
  and groups, and lists them on the cluster, so the sweep finds them after Redis is lost.

Description (`Snapshot.vm`), from the calls that find the disks (`vm`) and one more,
the server's interfaces: the flavor's vcpus and ram (embedded in the server from Nova
2.47 on; null before), one NIC per port (`os-interface`: port id, MAC, fixed IPs; the
network's name and floating IPs from the server's `addresses`), the disks in the order
above with their devices (the root disk at the server's `root_device_name`; Nova's extra
ephemeral disks have none the API tells), the root disk marked as the boot disk. Guest OS
and firmware are Glance image properties the compute API does not give: null.

Change tokens: `rbd:<image id>:<snapshot id>:<snapshot name>`. A token of another image
(a volume re-created), a base snapshot someone deleted, or an invalid object map make
`changed_extents` answer None: the engine reads the allocated extents and stores only
new content. Discarded areas come back from diff_iterate as not existing; they are read
(as zeros) like any changed area, so the point is exact.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms import PlatformSpec
from hamal_workers.platforms.base import (
    DiskFlags,
    DiskReader,
    DiskRef,
    DiskSource,
    Platform,
    PlatformError,
    Snapshot,
    TransientPlatformError,
    VmRef,
    describe_vm,
    run_of_snapshot,
)
from hamal_workers.platforms.shared import process_shared

if TYPE_CHECKING:
    from hamal_workers.config import CephSection, OpenstackSection, Settings

log = logging.getLogger("hamal.ceph")

NAME = "ceph"
TOKEN_PREFIX = "rbd"
EPHEMERAL = "ephemeral"
# librbd's image flags (librbd.h): the object map, or its fast-diff data, cannot be trusted.
RBD_FLAG_OBJECT_MAP_INVALID = 1
RBD_FLAG_FAST_DIFF_INVALID = 2
RBD_FEATURE_FAST_DIFF = 16
RBD_SNAP_NAMESPACE_TYPE_USER = 0
RBD_SNAP_NAMESPACE_TYPE_GROUP = 1
# Nova's extra disks beside `<id>_disk`: swap and the config drive hold nothing to restore.
_NOVA_SKIPPED = {"swap": "swap space", "config": "config drive"}
_DEVICE_ORDER = re.compile(r"^(.*?)(\d*)$")


def locator(pool: str, image: str) -> str:
    return f"{pool}/{image}"


def split_locator(text: str) -> tuple[str, str]:
    pool, _, image = text.partition("/")
    if not pool or not image:
        raise PlatformError(f"ceph: {text!r} does not name an RBD image as pool/image")
    return pool, image


def make_token(image_id: str, snap_id: int, snap_name: str) -> str:
    return f"{TOKEN_PREFIX}:{image_id}:{snap_id}:{snap_name}"


@dataclass(frozen=True)
class BaseToken:
    image_id: str
    snap_id: int
    snap_name: str

    @classmethod
    def parse(cls, token: str) -> BaseToken | None:
        parts = token.split(":", 3)
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not parts[2].isdigit():
            return None
        return cls(parts[1], int(parts[2]), parts[3])


def _device_key(device: str) -> tuple[int, str, int]:
    """`/dev/vdb` before `/dev/vdaa`: shorter names first, then by letters, then partitions."""
    name = device.rsplit("/", 1)[-1]
    stem, digits = _DEVICE_ORDER.match(name).groups()  # type: ignore[union-attr]
    return (len(stem), stem, int(digits or 0))


# --------------------------------------------------------------------------- the cluster


class CephCluster:
    """One connection to the cluster (librados), opened on first use, and its pool handles."""

    def __init__(self, section: CephSection) -> None:
        self.section = section
        self._rados: Any = None
        self._ioctx: dict[str, Any] = {}
        self._lock = threading.Lock()

    def ioctx(self, pool: str) -> Any:
        with self._lock:
            if pool in self._ioctx:
                return self._ioctx[pool]
            rados = self._connect()
            try:
                handle = rados.open_ioctx(pool)
            except Exception as exc:
                raise _rbd_error(f"pool {pool}", exc) from None
            self._ioctx[pool] = handle
            return handle

    def _connect(self) -> Any:
        if self._rados is not None:
            return self._rados
        import rados

        s = self.section
        conf = {"keyring": s.keyring} if s.keyring else {}
        try:
            cluster = rados.Rados(conffile=s.conf, rados_id=s.client_id, conf=conf)
            cluster.connect(timeout=s.connect_timeout)
        except rados.ObjectNotFound as exc:
            raise PlatformError(f"ceph: cannot read {s.conf} or its keyring: {exc}") from None
        except rados.TimedOut as exc:
            raise TransientPlatformError(
                f"ceph: no monitor answered within {s.connect_timeout} s ({s.conf}): {exc}"
            ) from None
        except rados.Error as exc:
            raise PlatformError(
                f"ceph: cannot connect as client.{s.client_id} with {s.conf}: {exc}"
            ) from None
        self._rados = cluster
        return cluster

    @contextlib.contextmanager
    def image(self, pool: str, name: str, *, read_only: bool = False) -> Iterator[Any]:
        import rbd

        try:
            handle = rbd.Image(self.ioctx(pool), name, read_only=read_only)
        except Exception as exc:
            if isinstance(exc, rbd.ConnectionShutdown):
                self.close()  # the next use connects again
            raise _rbd_error(f"image {pool}/{name}", exc) from None
        try:
            yield handle
        finally:
            handle.close()

    def exists(self, pool: str, name: str) -> bool:
        import rbd

        try:
            rbd.Image(self.ioctx(pool), name, read_only=True).close()
        except rbd.ImageNotFound:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            for handle in self._ioctx.values():
                with contextlib.suppress(Exception):
                    handle.close()
            self._ioctx.clear()
            if self._rados is not None:
                with contextlib.suppress(Exception):
                    self._rados.shutdown()
                self._rados = None


def _rbd_error(what: str, exc: BaseException) -> PlatformError:
    import rados
    import rbd

    if isinstance(exc, PlatformError):
        return exc
    if isinstance(exc, rbd.ImageNotFound | rados.ObjectNotFound):
        return PlatformError(f"ceph: {what} does not exist")
    if isinstance(exc, rbd.PermissionError | rados.PermissionError):
        return PlatformError(f"ceph: {what}: permission denied to this client")
    if isinstance(exc, rbd.ConnectionShutdown | rados.TimedOut | rbd.ImageBusy):
        return TransientPlatformError(f"ceph: {what}: {type(exc).__name__}: {exc}")
    return PlatformError(f"ceph: {what}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- OpenStack


class OpenStackApi:
    """Nova and Cinder through openstacksdk, with their errors turned into platform errors.

    The password goes to openstacksdk and nowhere else: no message here quotes it.
    """

    def __init__(self, section: OpenstackSection) -> None:
        self.section = section
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is not None:
            return self._conn
        import openstack
        import openstack.warnings

        # The SDK's notes about its own future releases are for its developers, not for
        # an operator reading the worker's log at 3 a.m.
        for category in (
            openstack.warnings.OpenStackDeprecationWarning,
            openstack.warnings._RemovedInSDKWarning,
        ):
            warnings.filterwarnings("ignore", category=category)
        s = self.section
        verify: bool | str = s.cacert or not s.insecure
        try:
            if s.cloud:
                conn = openstack.connect(cloud=s.cloud, api_timeout=s.api_timeout)
            else:
                conn = openstack.connect(
                    auth_url=s.auth_url,
                    username=s.username,
                    password=s.password,
                    project_name=s.project_name,
                    user_domain_name=s.user_domain_name,
                    project_domain_name=s.project_domain_name,
                    region_name=s.region_name or None,
                    interface=s.interface,
                    verify=verify,
                    cacert=s.cacert or None,
                    api_timeout=s.api_timeout,
                    app_name="hamal",
                )
        except Exception as exc:
            raise _api_error("connecting", exc) from None
        self._conn = conn
        return conn

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(self._connection())
        except Exception as exc:
            raise _api_error(what, exc) from None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _api_error(what: str, exc: BaseException) -> PlatformError:
    """Retry what may pass (timeouts, 5xx, 429); fail at once what will not (401, 403, 404)."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as sdk

    if isinstance(exc, PlatformError):
        return exc
    status = getattr(exc, "status_code", None) or getattr(exc, "http_status", None)
    text = _one_line(exc)
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return PlatformError(
            f"openstack: {what}: the API's certificate is not trusted (CERTIFICATE_VERIFY_FAILED):"
            " set [openstack] cacert to the CA that signed it"
        )
    if isinstance(exc, ksa.Unauthorized) or status == 401:
        return PlatformError(
            f"openstack: {what}: the credentials were refused (401): check [openstack] "
            "username, password, project_name and their domains"
        )
    if status == 403:
        return PlatformError(f"openstack: {what}: forbidden (403): {text}")
    if isinstance(exc, sdk.NotFoundException | sdk.ResourceNotFound) or status == 404:
        return PlatformError(f"openstack: {what}: not found (404)")
    if isinstance(exc, ksa.ConnectTimeout | ksa.ConnectFailure | ksa.RequestTimeout):
        return TransientPlatformError(f"openstack: {what}: no answer: {text}")
    if isinstance(status, int) and (status >= 500 or status == 429):
        return TransientPlatformError(f"openstack: {what}: the API answered {status}: {text}")
    if isinstance(exc, ksa.ClientException | sdk.SDKException):
        return PlatformError(f"openstack: {what}: {text}")
    return PlatformError(f"openstack: {what}: {type(exc).__name__}: {text}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# --------------------------------------------------------------------------- reading


class RbdReader(DiskReader):
    """One open of the image at the snapshot to read, for one reader thread."""

    def __init__(self, cluster: CephCluster, pool: str, image: str, snap_id: int) -> None:
        self._image_cm = cluster.image(pool, image, read_only=True)
        self.image = self._image_cm.__enter__()
        try:
            self.image.set_snap_by_id(snap_id)
        except BaseException as exc:
            self._image_cm.__exit__(None, None, None)
            raise _rbd_error(f"snapshot {snap_id} of {pool}/{image}", exc) from None
        self.where = f"{pool}/{image}"

    def read(self, offset: int, length: int) -> bytes:
        try:
            return bytes(self.image.read(offset, length))
        except Exception as exc:
            raise _rbd_error(f"read of {length} bytes at {offset} from {self.where}", exc) from None

    def readinto(self, offset: int, buf: memoryview) -> int:
        data = self.read(offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._image_cm.__exit__(None, None, None)


class RbdDiskSource(DiskSource):
    def __init__(self, cluster: CephCluster, snapshot: Snapshot, disk: str) -> None:
        super().__init__(snapshot, disk)
        info = snapshot.disks[disk]
        self.cluster = cluster
        self.pool, self.image = str(info["pool"]), str(info["image"])
        self.image_id = str(info["image_id"])
        self.read_snap_id = int(info["read_snap_id"])

    @property
    def where(self) -> str:
        return locator(self.pool, self.image)

    def _diff(self, from_snapshot: str | None) -> list[tuple[int, int, bool]]:
        """diff_iterate over the snapshot read, from `from_snapshot` (None: since creation)."""
        found: list[tuple[int, int, bool]] = []
        with self.cluster.image(self.pool, self.image, read_only=True) as img:
            if img.id() != self.image_id:
                raise PlatformError(f"ceph: image {self.where} was replaced since its snapshot")
            img.set_snap_by_id(self.read_snap_id)
            whole_object = bool(img.features() & RBD_FEATURE_FAST_DIFF) and not (
                img.flags() & (RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID)
            )
            img.diff_iterate(
                0,
                self.size,
                from_snapshot,
                lambda offset, length, exists: found.append((offset, length, bool(exists))),
                include_parent=True,
                whole_object=whole_object,
            )
        return found

    def allocated_extents(self) -> list[Extent]:
        try:
            found = self._diff(None)
        except Exception as exc:
            raise _rbd_error(f"allocated extents of {self.where}", exc) from None
        return [Extent(offset, length) for offset, length, exists in found if exists]

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        base = BaseToken.parse(base_token)
        if base is None or base.image_id != self.image_id:
            return None  # another image, or not a token of ours
        import rbd

        try:
            with self.cluster.image(self.pool, self.image, read_only=True) as img:
                try:
                    if img.snap_get_id(base.snap_name) != base.snap_id:
                        return None  # a snapshot of that name, but not ours
                except rbd.ImageNotFound:
                    log.warning("%s: base snapshot %s is gone", self.where, base.snap_name)
                    return None
                img.set_snap_by_id(base.snap_id)
                if img.flags() & RBD_FLAG_OBJECT_MAP_INVALID:
                    log.warning("%s: object map of %s is invalid", self.where, base.snap_name)
                    return None
                img.set_snap_by_id(self.read_snap_id)
                if img.flags() & RBD_FLAG_OBJECT_MAP_INVALID:
                    log.warning("%s: object map of the new snapshot is invalid", self.where)
                    return None
            found = self._diff(base.snap_name)
        except rbd.ImageNotFound:
            return None
        except PlatformError:
            raise
        except Exception as exc:
            raise _rbd_error(f"changes of {self.where} since {base.snap_name}", exc) from None
        # Discarded areas (exists False) are read too: they read as zeros at the snapshot.
        return [Extent(offset, length) for offset, length, _exists in found]

    def open_reader(self) -> DiskReader:
        return RbdReader(self.cluster, self.pool, self.image, self.read_snap_id)


# --------------------------------------------------------------------------- the platform


class OpenStackCephPlatform(Platform):
    name = NAME
    keeps_base_snapshot = True  # diff_iterate needs the snapshot the token came from
    # Listing leftovers opens every image of both pools: every ten minutes, not every scan.
    # Redis' records find the snapshots of runs the proxy knows at every scan.
    leftover_listing_every_s = 600

    def __init__(
        self, openstack: OpenstackSection, ceph: CephSection, flags: DiskFlags | None = None
    ) -> None:
        self.openstack = openstack
        self.ceph = ceph
        self.flags = flags or DiskFlags()
        self.api: OpenStackApi = process_shared("api", openstack, lambda: OpenStackApi(openstack))
        self.cluster: CephCluster = process_shared("ceph", ceph, lambda: CephCluster(ceph))

    def close(self) -> None:
        """The session ends; the process keeps its cluster connection and API session."""

    # --- VMs ----------------------------------------------------------------------

    def _wanted(self) -> set[str]:
        return {part.strip() for part in self.openstack.servers.split(",") if part.strip()}

    def discover(self) -> list[VmRef]:
        """Every protected instance, from two listings (servers, volumes), whatever their count.

        Disks here are what Cinder says is attached; which image each is, and what is
        skipped, is settled when a sync starts (`vm`).
        """
        servers = self.api.call("listing servers", lambda c: list(c.compute.servers()))
        volumes = self.api.call("listing volumes", lambda c: list(c.block_storage.volumes()))
        wanted = self._wanted()
        attached: dict[str, list[tuple[str, Any]]] = {}
        for volume in volumes:
            for att in volume.attachments or []:
                server_id = att.get("server_id")
                if server_id:
                    attached.setdefault(server_id, []).append((att.get("device") or "", volume))
        vms = []
        for server in servers:
            if wanted and server.id not in wanted and server.name not in wanted:
                continue
            disks = []
            if _boots_from_image(server):
                root = _root_device(server)
                disks.append(DiskRef(f"{root}-{EPHEMERAL}", 0, ""))
            for device, volume in sorted(
                attached.get(server.id, []), key=lambda pair: _device_key(pair[0])
            ):
                name = f"{_short(device)}-{volume.id}"
                disks.append(DiskRef(name, int(volume.size or 0) << 30, ""))
            vms.append(VmRef(server.id, server.name, self.name, tuple(disks)))
        return vms

    def vm(self, vm_id: str) -> VmRef:
        server = self.api.call(f"reading instance {vm_id}", lambda c: c.compute.get_server(vm_id))
        atts = self.api.call(
            f"reading the volume attachments of instance {vm_id}",
            lambda c: list(c.compute.volume_attachments(server)),
        )
        disks: list[DiskRef] = []
        skipped: list[str] = []
        devices: dict[str, str | None] = {}  # disk name -> its device, where the API tells
        if _boots_from_image(server):
            image = f"{server.id}_disk"
            root = _root_device(server)
            devices[f"{root}-{EPHEMERAL}"] = getattr(server, "root_device_name", None)
            try:
                with self.cluster.image(self.ceph.vms_pool, image, read_only=True) as img:
                    size = int(img.size())
                disks.append(
                    DiskRef(f"{root}-{EPHEMERAL}", size, locator(self.ceph.vms_pool, image))
                )
            except PlatformError as exc:
                skipped.append(f"{root} (ephemeral root disk): not on Ceph: {exc}")
        extras, notes = self._nova_extras(server.id)
        disks += extras
        skipped += notes
        for att in sorted(atts, key=lambda a: _device_key(a.device or "")):
            device = _short(att.device or "")
            volume_id = att.volume_id
            where = self._volume_image(att)
            if where.startswith("skip:"):
                skipped.append(f"{device}: volume {volume_id}: {where[5:]}")
                continue
            pool, image = split_locator(where)
            try:
                with self.cluster.image(pool, image, read_only=True) as img:
                    size = int(img.size())
            except PlatformError as exc:
                skipped.append(f"{device}: volume {volume_id}: {exc}")
                continue
            disks.append(DiskRef(f"{device}-{volume_id}", size, where))
            devices[f"{device}-{volume_id}"] = att.device
        if not disks:
            why = "; ".join(skipped) or "no volume attached and no ephemeral disk"
            raise PlatformError(
                f"openstack: instance {server.name} ({vm_id}) has no disk on Ceph: {why}"
            )
        facts = server_facts(server, self._interfaces(server), disks, devices)
        return VmRef(server.id, server.name, self.name, tuple(disks), tuple(skipped), facts)

    def _interfaces(self, server: Any) -> list[Any] | None:
        """The server's ports (`os-interface`); None when the API does not say, and the
        description then takes its NICs from the server's `addresses` alone."""
        try:
            return self.api.call(
                f"reading the interfaces of instance {server.id}",
                lambda c: list(c.compute.server_interfaces(server)),
            )
        except PlatformError as exc:  # a description without ports, never a failed sync
            log.warning("openstack: interfaces of instance %s unreadable: %s", server.id, exc)
            return None

    def _volume_image(self, att: Any) -> str:
        """`pool/image` of an attached volume, or `skip:<why>`."""
        volume_id = att.volume_id
        info = self._connection_info(att)
        if info is not None:
            kind = info.get("driver_volume_type")
            if kind != "rbd":
                return f"skip:not on Ceph (its connection is {kind or 'of no known type'})"
            name = str((info.get("data") or {}).get("name") or "")
            if "/" not in name:
                return f"skip:its rbd connection names no pool/image ({name!r})"
            return name
        # No connection info to read (an older API, a policy): Cinder's RBD driver's name.
        image = f"volume-{volume_id}"
        if self.cluster.exists(self.ceph.volumes_pool, image):
            return locator(self.ceph.volumes_pool, image)
        volume = self.api.call(
            f"reading volume {volume_id}", lambda c: c.block_storage.get_volume(volume_id)
        )
        kind = volume.volume_type or "no volume type"
        return f"skip:not on Ceph (type {kind}; no image {image} in pool {self.ceph.volumes_pool})"

    def _connection_info(self, att: Any) -> dict[str, Any] | None:
        attachment_id = getattr(att, "attachment_id", None)
        if not attachment_id:
            return None
        try:
            found = self.api.call(
                f"reading attachment {attachment_id}",
                lambda c: c.block_storage.get_attachment(attachment_id),
            )
        except TransientPlatformError:
            raise
        except PlatformError as exc:
            log.warning("openstack: connection info of %s unreadable: %s", attachment_id, exc)
            return None
        info = getattr(found, "connection_info", None)
        return info if isinstance(info, dict) else None

    def _nova_extras(self, server_id: str) -> tuple[list[DiskRef], list[str]]:
        """Nova's other disks of the instance, `<id>_disk.<kind>` in the vms pool: the
        flavor's ephemeral disks (`local`, `eph0`, ...) are synced as `ephemeral-<kind>`;
        swap and the config drive hold nothing to restore and are said to be skipped."""
        import rbd

        try:
            names = rbd.RBD().list(self.cluster.ioctx(self.ceph.vms_pool))
        except Exception as exc:
            raise _rbd_error(f"pool {self.ceph.vms_pool}", exc) from None
        prefix = f"{server_id}_disk."
        disks, notes = [], []
        for name in sorted(n for n in names if n.startswith(prefix)):
            kind = name[len(prefix) :]
            if kind in _NOVA_SKIPPED:
                notes.append(f"{name} ({_NOVA_SKIPPED[kind]}): not synced")
                continue
            try:
                with self.cluster.image(self.ceph.vms_pool, name, read_only=True) as img:
                    size = int(img.size())
            except PlatformError as exc:
                notes.append(f"{name}: {exc}")
                continue
            disks.append(DiskRef(f"{EPHEMERAL}-{kind}", size, locator(self.ceph.vms_pool, name)))
        return disks, notes

    # --- snapshots ----------------------------------------------------------------

    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        if run_of_snapshot(snapshot_id) is None:
            raise PlatformError(f"ceph: {snapshot_id!r} is not a name of the proxy's snapshots")
        created = time.time()
        disks: dict[str, dict[str, Any]] = {}
        partial = Snapshot(snapshot_id, vm.vm_id, self.name, created, disks)
        try:
            for disk in vm.disks:
                pool, image = split_locator(disk.locator)
                with self.cluster.image(pool, image) as img:
                    img.create_snap(snapshot_id)
                    snap_id = int(img.snap_get_id(snapshot_id))
                    image_id = str(img.id())
                    img.set_snap_by_id(snap_id)
                    size = int(img.size())
                disks[disk.name] = {
                    "pool": pool,
                    "image": image,
                    "image_id": image_id,
                    "snap_id": snap_id,
                    "read_snap_id": snap_id,
                    "size": size,
                    "token": make_token(image_id, snap_id, snapshot_id),
                }
                if self.flags.applies(size):
                    disks[disk.name]["identity"] = f"ceph:{pool}/{image}#{image_id}"
            consistency, note, details = "disk", "", {}
            if len(disks) == 1:
                consistency = "vm"
            elif not self.ceph.group_snapshots:
                note = "[ceph] group_snapshots is off: each disk was snapshotted on its own"
            else:
                self._between_snapshot_steps(vm)
                try:
                    details = self._group_snapshot(snapshot_id, disks)
                    consistency = "group"
                except PlatformError as exc:
                    note = f"no RBD group snapshot ({exc}): each disk was snapshotted on its own"
                    log.warning("vm %s: %s", vm.name, note)
        except BaseException:
            with contextlib.suppress(Exception):
                self.delete_snapshot(partial)
            raise
        return Snapshot(
            snapshot_id, vm.vm_id, self.name, created, disks, consistency, note, details,
            describe_vm(vm, vm.facts, disks),
        )  # fmt: skip

    def _between_snapshot_steps(self, vm: VmRef) -> None:
        """Guests keep writing between the image snapshots (the next diff's base) and the
        group snapshot (what is read): the order makes those writes part of both the view
        and the next diff. Tests write here to prove it."""

    def _group_snapshot(self, name: str, disks: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """One group snapshot of every image; their member snapshots become the views read."""
        import rbd

        pool = self.ceph.volumes_pool
        ioctx = self.cluster.ioctx(pool)
        try:
            rbd.RBD().group_create(ioctx, name)
        except Exception as exc:
            raise _rbd_error(f"group {pool}/{name}", exc) from None
        try:
            group = rbd.Group(ioctx, name)
            for info in disks.values():
                try:
                    group.add_image(self.cluster.ioctx(info["pool"]), info["image"])
                except (rbd.ImageExists, rbd.ObjectExists):
                    raise PlatformError(
                        f"image {info['pool']}/{info['image']} is already in another group"
                    ) from None
            group.create_snap(name)
            for info in disks.values():
                with self.cluster.image(info["pool"], info["image"], read_only=True) as img:
                    member = _group_member_snap(img, name)
                    if member is None:
                        raise PlatformError(
                            f"group snapshot {name} has no member on {info['pool']}/{info['image']}"
                        )
                    info["read_snap_id"], info["size"] = member
        except BaseException as exc:
            with contextlib.suppress(Exception):
                rbd.RBD().group_remove(ioctx, name)
            if isinstance(exc, PlatformError):
                raise
            if isinstance(exc, Exception):
                raise _rbd_error(f"group snapshot {pool}/{name}", exc) from None
            raise
        return {"group": locator(pool, name)}

    def trim_snapshot(self, snapshot: Snapshot) -> None:
        group = snapshot.details.get("group")
        if group:
            self._remove_group(*split_locator(str(group)))

    def _remove_group(self, pool: str, name: str) -> None:
        import rbd

        if run_of_snapshot(name) is None:
            return  # never a group the proxy did not make
        try:
            rbd.RBD().group_remove(self.cluster.ioctx(pool), name)
        except rbd.ImageNotFound:
            pass
        except Exception as exc:
            raise _rbd_error(f"group {pool}/{name}", exc) from None

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        name = snapshot.snapshot_id
        if run_of_snapshot(name) is None:
            raise PlatformError(f"ceph: {name!r} is not one of the proxy's snapshots: not deleted")
        # The group first: its member snapshots hold the images in it.
        group = snapshot.details.get("group")
        if group:
            self._remove_group(*split_locator(str(group)))
        else:
            self._remove_group(self.ceph.volumes_pool, name)
        images = [(str(i["pool"]), str(i["image"])) for i in snapshot.disks.values()]
        if not images:  # only the identity: find the images that carry it
            images = [where for where, _ in self._our_snapshots().get(name, [])]
        for pool, image in images:
            self._remove_image_snap(pool, image, name)

    def _remove_image_snap(self, pool: str, image: str, name: str) -> None:
        import rbd

        try:
            with self.cluster.image(pool, image) as img, contextlib.suppress(rbd.ImageNotFound):
                img.remove_snap(name)  # ImageNotFound: gone already
        except PlatformError as exc:
            if "does not exist" in str(exc):
                return  # the image itself is gone
            raise
        except Exception as exc:
            raise _rbd_error(f"snapshot {name} of {pool}/{image}", exc) from None

    def _our_snapshots(self) -> dict[str, list[tuple[tuple[str, str], float]]]:
        """snapshot name -> ((pool, image), created) of every `hamal-<run id>` snapshot."""
        import rbd

        found: dict[str, list[tuple[tuple[str, str], float]]] = {}
        for pool in dict.fromkeys((self.ceph.volumes_pool, self.ceph.vms_pool)):
            try:
                names = rbd.RBD().list(self.cluster.ioctx(pool))
            except Exception as exc:
                raise _rbd_error(f"pool {pool}", exc) from None
            for image in names:
                try:
                    with self.cluster.image(pool, image, read_only=True) as img:
                        for snap in img.list_snaps():
                            if snap.get("namespace", 0) != RBD_SNAP_NAMESPACE_TYPE_USER:
                                continue
                            if run_of_snapshot(snap["name"]) is None:
                                continue
                            stamp = img.get_snap_timestamp(snap["id"]).timestamp()
                            found.setdefault(snap["name"], []).append(((pool, image), stamp))
                except PlatformError:
                    continue  # removed while listing
        return found

    def _our_groups(self) -> list[str]:
        import rbd

        try:
            names = rbd.RBD().group_list(self.cluster.ioctx(self.ceph.volumes_pool))
        except Exception as exc:
            raise _rbd_error(f"groups of pool {self.ceph.volumes_pool}", exc) from None
        return [n for n in names if run_of_snapshot(n) is not None]

    def leftover_snapshots(self) -> list[Snapshot]:
        snaps = self._our_snapshots()
        groups = self._our_groups()
        if not snaps and not groups:
            return []
        owners = self._image_owners(snaps)
        found = []
        for name in sorted(set(snaps) | set(groups)):
            images = snaps.get(name, [])
            vm_ids = [owners.get(where, "") for where, _ in images]
            vm_id = next((v for v in vm_ids if v), "")
            created = min((stamp for _, stamp in images), default=time.time())
            disks = {locator(*where): {"pool": where[0], "image": where[1]} for where, _ in images}
            details = {"group": locator(self.ceph.volumes_pool, name)} if name in groups else {}
            found.append(Snapshot(name, vm_id, self.name, created, disks, details=details))
        return found

    def _image_owners(
        self, snaps: dict[str, list[tuple[tuple[str, str], float]]]
    ) -> dict[tuple[str, str], str]:
        """(pool, image) -> the instance it belongs to, as far as the APIs tell."""
        owners: dict[tuple[str, str], str] = {}
        volumes = self.api.call("listing volumes", lambda c: list(c.block_storage.volumes()))
        for volume in volumes:
            for att in volume.attachments or []:
                if att.get("server_id"):
                    image = f"volume-{volume.id}"
                    owners[(self.ceph.volumes_pool, image)] = att["server_id"]
        for pool, image in [where for items in snaps.values() for where, _ in items]:
            if pool == self.ceph.vms_pool and image.endswith("_disk"):
                owners[(pool, image)] = image[: -len("_disk")]
        return owners

    # --- disks --------------------------------------------------------------------

    def open_disk(self, snapshot: Snapshot, disk: str) -> DiskSource:
        if disk not in snapshot.disks:
            raise PlatformError(f"ceph: snapshot {snapshot.snapshot_id} has no disk {disk}")
        return RbdDiskSource(self.cluster, snapshot, disk)


def _group_member_snap(img: Any, group_snap: str) -> tuple[int, int] | None:
    """(snapshot id, size) of this image's member of the group snapshot named `group_snap`."""
    for snap in img.list_snaps():
        if snap.get("namespace") != RBD_SNAP_NAMESPACE_TYPE_GROUP:
            continue
        group = snap.get("group") or {}
        if group.get("name") == group_snap and group.get("snap_name") == group_snap:
            return int(snap["id"]), int(snap["size"])
    return None


def server_facts(
    server: Any,
    interfaces: list[Any] | None,
    disks: list[DiskRef],
    devices: dict[str, str | None],
) -> dict[str, Any]:
    """`describe_vm` facts of a Nova server, its interfaces and its disks (in order)."""
    flavor = getattr(server, "flavor", None)
    root = getattr(server, "root_device_name", None)
    from_image = _boots_from_image(server)
    boot = f"{_root_device(server)}-{EPHEMERAL}" if from_image else None
    described = []
    for disk in disks:
        device = devices.get(disk.name)
        is_boot = disk.name == boot if from_image else bool(root) and device == root
        described.append({"name": disk.name, "device": device, "boot": is_boot})
    return {
        # A flavor before 2.47 is only {id, links}: the SDK's defaults (0) say "unknown".
        "cpus": getattr(flavor, "vcpus", None) or None,
        "memory_mib": getattr(flavor, "ram", None) or None,
        "guest_os": None,
        "firmware": None,
        "nics": server_nics(getattr(server, "addresses", None) or {}, interfaces),
        "disks": described,
    }


def server_nics(addresses: dict[str, Any], interfaces: list[Any] | None) -> list[dict[str, Any]]:
    """One NIC per port: named by its port id, on the network `addresses` names for its MAC
    (else its network id: a port without an IP has no entry there to carry its MAC), with
    its fixed IPs and the floating IPs NATed to it. Without `interfaces`, one NIC per MAC
    that `addresses` lists, named by its MAC."""
    seen: dict[str, dict[str, Any]] = {}  # MAC -> network name, fixed and floating IPs
    for network, entries in addresses.items():
        for entry in entries or []:
            mac = str(entry.get("OS-EXT-IPS-MAC:mac_addr") or "").lower()
            if not mac or not entry.get("addr"):
                continue
            item = seen.setdefault(mac, {"network": network, "fixed": [], "floating": []})
            kind = "floating" if entry.get("OS-EXT-IPS:type") == "floating" else "fixed"
            item[kind].append(str(entry["addr"]))
    if interfaces is None:
        return [
            {"name": mac, "mac": mac, "network": item["network"],
             "addresses": item["fixed"] + item["floating"]}
            for mac, item in seen.items()
        ]  # fmt: skip
    nics = []
    for port in interfaces:
        mac = str(getattr(port, "mac_addr", None) or "").lower()
        item = seen.get(mac, {})
        fixed = [str(ip["ip_address"]) for ip in getattr(port, "fixed_ips", None) or []
                 if isinstance(ip, dict) and ip.get("ip_address")]  # fmt: skip
        nics.append({
            "name": str(port.port_id),
            "mac": mac or None,
            "network": item.get("network") or getattr(port, "net_id", None),
            "addresses": fixed + item.get("floating", []),
        })  # fmt: skip
    return nics


def _boots_from_image(server: Any) -> bool:
    """Nova gives `image` as "" for an instance booted from a volume."""
    image = getattr(server, "image", None)
    if isinstance(image, dict):
        return bool(image.get("id"))
    return bool(getattr(image, "id", None))


def _root_device(server: Any) -> str:
    return _short(getattr(server, "root_device_name", None) or "/dev/vda")


def _short(device: str) -> str:
    return device.rsplit("/", 1)[-1] or "disk"


def _create(settings: Settings) -> Platform:
    section = settings.openstack_ceph
    flags = DiskFlags(section.skip_disk_flag, section.disk_flag_size)
    return OpenStackCephPlatform(settings.openstack, settings.ceph, flags)


SPEC = PlatformSpec(
    name=NAME,
    enabled=lambda settings: bool(settings.openstack.auth_url or settings.openstack.cloud),
    create=_create,
    release_cpu_ms_per_mb=lambda settings: settings.period.openstack_release_cpu_time,
)
