"""VMware vCenter VMs through pyvmomi, read where Changed Block Tracking says they changed.

- **Session** (`VSphereSession`): one per worker process, verified TLS by default
  (`[vmware] ca_file`, else the system's CAs; `insecure` only when set), logged in again
  when vCenter expired it (`NotAuthenticated`), logged out at exit.
- **Discovery**: every VM (templates aside), or those `[vmware] vms` names by instance
  UUID, managed object id or name, from one property collection; each disk (named by its
  device key) with its capacity, backing file and datastore. Disks a snapshot cannot
  cover -- independent disks and physical-mode RDMs -- are skipped and named.
- **Snapshots**: CBT is turned on where it is off and the VM has no snapshot (otherwise a
  clear error says what the operator must do); then one snapshot `hamal-<run id>`, without
  memory, quiesced when `[vmware] quiesce` is set (crash-consistent, and said so, when the
  guest cannot be quiesced): every disk at one instant. It is
  removed once its point is committed, on every failure, and by the sweep when left over;
  never a snapshot of another name.
- **Change tokens** are the disks' change ids at the snapshot. The next sync asks
  `QueryChangedDiskAreas` from the recorded id, page by page over the whole capacity; the
  first asks with `*` (allocated areas). A change id of another tracking epoch (CBT was
  reset) or one vCenter refuses makes `changed_extents` answer None: the engine reads the
  allocated areas and stores only new content, so the point is exact either way.
- **Reads**: `vmware_transport.py` (https range reads, or nbd through nbdkit).
- **Description** (`Snapshot.vm`): from the snapshot's own config, which the snapshot's
  disks are read from anyway -- CPUs, memory, guestId, firmware, the disks in controller
  and unit order (`scsi0:1`) with the one `bootOptions.bootOrder` boots from, the network
  adapters -- and one property collection of the VM's `guest.net` (IPs, which VMware
  Tools reports) and its networks' names (distributed port groups are named there).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
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
from hamal_workers.platforms.shared import at_process_exit, process_shared
from hamal_workers.platforms.vmware_transport import SECTOR, HttpsReader, NbdExport, folder_url

if TYPE_CHECKING:
    from hamal_workers.config import Settings, VmwareSection

log = logging.getLogger("hamal.vmware")
NAME = "vmware"
# Disk modes a snapshot does not cover: their writes go straight to the base disk.
INDEPENDENT_MODES = {"independent_persistent", "independent_nonpersistent"}


def ssl_context(section: VmwareSection) -> ssl.SSLContext:
    if section.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    # Always a context: without one pyvmomi skips the check for 127.0.0.1 and localhost.
    return ssl.create_default_context(cafile=section.ca_file or None)


class VSphereSession:
    """A logged-in vCenter session, shared by a worker process's tasks."""

    def __init__(self, section: VmwareSection) -> None:
        self.section = section
        self._si: Any = None
        self._lock = threading.Lock()
        self.logins = 0
        at_process_exit(self.logout)

    def _login(self) -> Any:
        from pyVim.connect import SmartConnect
        from pyVmomi import vim

        s = self.section
        try:
            si = SmartConnect(
                host=s.host, port=s.port, user=s.user, pwd=s.password, sslContext=ssl_context(s)
            )
        except vim.fault.InvalidLogin:
            raise PlatformError(
                f"vmware: vCenter {s.host} refused the login of {s.user!r}: check [vmware] user "
                "and password"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise PlatformError(
                f"vmware: vCenter {s.host}'s certificate is not trusted ({exc.verify_message}): "
                "set [vmware] ca_file to the CA that signed it"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise TransientPlatformError(
                f"vmware: cannot reach vCenter {s.host}:{s.port}: {exc}"
            ) from None
        self.logins += 1
        return si

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """fn(service instance), logging in first, and again once if the session expired."""
        from pyVmomi import vim

        for attempt in (1, 2):
            with self._lock:
                if self._si is None:
                    self._si = self._login()
                si = self._si
            try:
                return fn(si)
            except vim.fault.NotAuthenticated:
                with self._lock:
                    if self._si is si:
                        self._si = None  # expired: the next attempt logs in again
                if attempt == 2:
                    raise PlatformError(
                        f"vmware: {what}: not authenticated after a new login"
                    ) from None
                log.info("vmware: the vCenter session expired; logging in again")
            except vim.fault.VimFault as exc:
                raise PlatformError(f"vmware: {what}: {type(exc).__name__}: {exc.msg}") from None
        raise AssertionError("unreachable")

    def cookie(self) -> str:
        """The session's cookie (`vmware_soap_session=...`) for the datastore interface."""
        with self._lock:
            if self._si is None:
                self._si = self._login()
            return str(self._si._stub.cookie).split(";", 1)[0].strip()

    def expired(self, cookie: str) -> None:
        """vCenter refused this cookie: log in again on the next use, unless already done."""
        with self._lock:
            if self._si is not None and str(self._si._stub.cookie).startswith(cookie):
                self._si = None
                log.info("vmware: the vCenter session expired; logging in again")

    def logout(self) -> None:
        from pyVim.connect import Disconnect

        with self._lock:
            si, self._si = self._si, None
        if si is not None:
            with contextlib.suppress(Exception):
                Disconnect(si)


def session_for(section: VmwareSection) -> VSphereSession:
    return process_shared("vsphere", section, lambda: VSphereSession(section))


class VSphereInventory:
    """The VMs vCenter has, as the proxy sees them."""

    def __init__(self, section: VmwareSection) -> None:
        self.section = section
        self.session = session_for(section)

    def _wanted(self) -> set[str]:
        return {part.strip() for part in self.section.vms.split(",") if part.strip()}

    def discover(self) -> list[VmRef]:
        """Every protected VM, from one property collection whatever their number."""
        wanted = self._wanted()
        found = []
        rows = self.session.call("listing VMs", lambda si: collect(si, VM_PROPERTIES))
        for moid, props in rows:
            ref = vm_ref_of(props)
            if ref is None:
                continue
            if wanted and not wanted & {ref.vm_id, ref.name, moid}:
                continue
            found.append(ref)
        return found

    def vm(self, key: str) -> VmRef:
        """A VM by instance UUID (one lookup), managed object id or name."""

        def by_uuid(si: Any) -> VmRef | None:
            found = si.RetrieveContent().searchIndex.FindByUuid(None, key, True, True)
            return None if found is None else vm_ref(found)

        ref = self.session.call(f"finding VM {key}", by_uuid)
        if ref is not None:
            return ref
        for moid, props in self.session.call("listing VMs", lambda si: collect(si, VM_PROPERTIES)):
            ref = vm_ref_of(props)
            if ref is not None and key in (ref.vm_id, ref.name, moid):
                return ref
        raise PlatformError(f"vmware: no VM with instance UUID, id or name {key!r}")

    # --- change tracking and snapshots ---------------------------------------------

    def _vm_object(self, si: Any, vm_id: str) -> Any:
        found = si.RetrieveContent().searchIndex.FindByUuid(None, vm_id, True, True)
        if found is None:
            raise PlatformError(f"vmware: no VM with instance UUID {vm_id} (not found)")
        return found

    def ensure_change_tracking(self, vm_id: str) -> None:
        """Turn CBT on when it is off and the VM has no snapshot; otherwise say what to do.

        vSphere starts tracking only from a "stun/unstun" of the disks, which a snapshot
        in place prevents: the operator must remove the VM's snapshots first.
        """

        def ensure(si: Any) -> None:
            from pyVmomi import vim

            vm = self._vm_object(si, vm_id)
            if vm.config.changeTrackingEnabled:
                return
            if vm.snapshot is not None and vm.snapshot.rootSnapshotList:
                raise PlatformError(
                    f"vmware: VM {vm.name} has Changed Block Tracking off and snapshots: "
                    "remove its snapshots so that the proxy can turn tracking on"
                )
            log.info("vmware: turning Changed Block Tracking on for VM %s", vm.name)
            wait_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))

        self.session.call(f"turning change tracking on for {vm_id}", ensure)

    def snapshot_disks(self, snapshot: Any, config: Any = None) -> dict[str, dict[str, Any]]:
        """disk name -> what a reader needs, from a snapshot's own config (fetched unless given)."""
        from pyVmomi import vim

        disks = {}
        config = config if config is not None else snapshot.config
        for disk in config.hardware.device:
            if not isinstance(disk, vim.vm.device.VirtualDisk):
                continue
            backing = disk.backing
            size = disk.capacityInBytes or (disk.capacityInKB or 0) * 1024
            disks[str(disk.key)] = {
                "key": disk.key,
                "file": backing.fileName,
                "size": int(size),
                "token": getattr(backing, "changeId", None) or "",
                "delta": getattr(backing, "parent", None) is not None,
                "disk_uuid": getattr(backing, "uuid", None) or "",
            }
        return disks

    def find_snapshots(self, si: Any, vm: Any, name: str) -> list[Any]:
        return [tree.snapshot for tree in walk_snapshots(vm.snapshot) if tree.name == name]

    def guest_networks(self, obj: Any, what: str) -> tuple[list[Any], dict[str, str]]:
        """The VM's `guest.net` and {network moid: name} of its networks, in one call.

        Only for the description: a failure is logged and gives nothing, never a failed sync.
        """

        def fetch(si: Any) -> tuple[list[Any], dict[str, str]]:
            from pyVmomi import vim, vmodl

            pc = vmodl.query.PropertyCollector
            to_networks = pc.TraversalSpec(
                name="networks", path="network", skip=False, type=vim.VirtualMachine
            )
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=obj, skip=False, selectSet=[to_networks])],
                propSet=[
                    pc.PropertySpec(type=vim.VirtualMachine, pathSet=["guest.net"], all=False),
                    pc.PropertySpec(type=vim.Network, pathSet=["name"], all=False),
                ],
            )
            collector = si.RetrieveContent().propertyCollector
            result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
            nets: list[Any] = []
            names: dict[str, str] = {}
            while result is not None:
                for item in result.objects:
                    props = {p.name: p.val for p in item.propSet or []}
                    if isinstance(item.obj, vim.VirtualMachine):
                        nets = list(props.get("guest.net") or [])
                    elif props.get("name"):
                        names[item.obj._moId] = str(props["name"])
                if not result.token:
                    break
                result = collector.ContinueRetrievePropertiesEx(result.token)
            return nets, names

        try:
            return self.session.call(f"guest networks of {what}", fetch)
        except Exception as exc:  # the description goes without: the snapshot is what matters
            log.warning("vmware: %s: no guest network information: %s", what, exc)
            return [], {}


def walk_snapshots(info: Any) -> list[Any]:
    """Every node of a VM's snapshot tree (its `snapshot` property; None: no snapshot)."""
    found: list[Any] = []
    pending = list(getattr(info, "rootSnapshotList", None) or [])
    while pending:
        tree = pending.pop()
        found.append(tree)
        pending.extend(tree.childSnapshotList or [])
    return found


# What vSphere answers a quiesced snapshot it cannot quiesce (no VMware Tools, a VSS or
# freeze script failing in the guest).
QUIESCE_FAULTS = ("ToolsUnavailable", "ApplicationQuiesceFault")


class TaskFailed(PlatformError):
    """A vSphere task ended in error; `fault` is vSphere's fault object."""

    def __init__(self, message: str, fault: Any) -> None:
        super().__init__(message)
        self.fault = fault


def _quiesce_fault(exc: BaseException) -> bool:
    fault = exc.fault if isinstance(exc, TaskFailed) else exc
    return any(type(fault).__name__.endswith(name) for name in QUIESCE_FAULTS)


def _fault_text(exc: BaseException) -> str:
    fault = exc.fault if isinstance(exc, TaskFailed) else exc
    return str(getattr(fault, "msg", "") or type(fault).__name__)


def wait_task(task: Any, timeout_s: float = 3600) -> Any:
    """A vSphere task's result, or its error as a PlatformError."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while task.info.state not in ("success", "error"):
        if time.monotonic() > deadline:
            raise TransientPlatformError(f"vmware: task {task.info.descriptionId} took too long")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    if task.info.state == "error":
        error = task.info.error
        raise TaskFailed(
            f"vmware: {task.info.descriptionId}: {getattr(error, 'msg', error)}", error
        )
    return task.info.result


VM_PROPERTIES = ("name", "config.instanceUuid", "config.template", "config.hardware.device")


def collect(si: Any, properties: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """(moid, {property: value}) of every VM, a page of objects per call, not one per VM."""
    from pyVmomi import vim, vmodl

    pc = vmodl.query.PropertyCollector
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        traversal = pc.TraversalSpec(
            name="view", path="view", skip=False, type=vim.view.ContainerView
        )
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=list(properties), all=False)],
        )
        rows: list[tuple[str, dict[str, Any]]] = []
        result = content.propertyCollector.RetrievePropertiesEx(
            [spec], pc.RetrieveOptions(maxObjects=500)
        )
        while result is not None:
            for item in result.objects:
                rows.append((item.obj._moId, {p.name: p.val for p in item.propSet}))
            if not result.token:
                break
            result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
        return rows
    finally:
        view.Destroy()


def vm_ref(vm: Any) -> VmRef | None:
    """A VM object as a VmRef (None for a template)."""
    config = vm.config
    if config is None:
        return None
    return vm_ref_of({
        "name": vm.name,
        "config.instanceUuid": config.instanceUuid,
        "config.template": config.template,
        "config.hardware.device": config.hardware.device,
    })  # fmt: skip


def vm_ref_of(props: dict[str, Any]) -> VmRef | None:
    """The VM as a VmRef (None for a template); disks in device key order."""
    from pyVmomi import vim

    if props.get("config.template") or not props.get("config.instanceUuid"):
        return None
    disks, skipped = [], []
    devices = sorted(
        (
            d
            for d in props.get("config.hardware.device") or []
            if isinstance(d, vim.vm.device.VirtualDisk)
        ),
        key=lambda d: d.key,
    )
    for disk in devices:
        backing = disk.backing
        label = f"disk {disk.key} ({getattr(backing, 'fileName', '?')})"
        mode = getattr(backing, "diskMode", "") or ""
        if mode in INDEPENDENT_MODES:
            skipped.append(f"{label}: an independent disk ({mode}): snapshots do not cover it")
            continue
        if getattr(backing, "compatibilityMode", "") == "physicalMode":
            skipped.append(f"{label}: a physical-mode RDM: snapshots do not cover it")
            continue
        size = disk.capacityInBytes or (disk.capacityInKB or 0) * 1024
        disks.append(DiskRef(str(disk.key), int(size), backing.fileName))
    return VmRef(props["config.instanceUuid"], props["name"], NAME, tuple(disks), tuple(skipped))


# --------------------------------------------------------------------------- description

# Controllers in the order their disks are described, and how VMware names their slots.
_CONTROLLER_KINDS = (
    ("VirtualIDEController", "ide"),
    ("VirtualSCSIController", "scsi"),
    ("VirtualSATAController", "sata"),
    ("VirtualNVMEController", "nvme"),
)


def _controller_kind(device: Any) -> tuple[int, str] | None:
    from pyVmomi import vim

    for rank, (type_name, kind) in enumerate(_CONTROLLER_KINDS):
        cls = getattr(vim.vm.device, type_name, None)
        if cls is not None and isinstance(device, cls):
            return rank, kind
    return None


def vm_facts(config: Any, guest_nets: list[Any], network_names: dict[str, str]) -> dict[str, Any]:
    """`describe_vm` facts from a VM's (or its snapshot's) config and its guest networks.

    Disks in controller order (IDE, SCSI, SATA, NVMe, each by bus number) and unit, named
    `scsi0:1` as vSphere does; the boot disk is the first disk `bootOptions.bootOrder`
    names (none when it names none: the firmware's own order is not guessed). NICs in
    device key order: label, MAC, network (a standard port group's name, a distributed
    port group's name, else what VMware Tools reports) and the IPs VMware Tools reports.
    """
    from pyVmomi import vim

    hardware = getattr(config, "hardware", None)
    devices = list(getattr(hardware, "device", None) or [])
    controllers = {}
    for device in devices:
        kind = _controller_kind(device)
        if kind is not None:
            controllers[device.key] = (kind[0], kind[1], int(getattr(device, "busNumber", 0) or 0))
    boot_order = getattr(getattr(config, "bootOptions", None), "bootOrder", None) or []
    boot_key = next(
        (
            entry.deviceKey
            for entry in boot_order
            if isinstance(entry, vim.vm.BootOptions.BootableDiskDevice)
        ),
        None,
    )
    placed = []
    for disk in devices:
        if not isinstance(disk, vim.vm.device.VirtualDisk):
            continue
        controller = controllers.get(disk.controllerKey)
        unit = getattr(disk, "unitNumber", None)
        if controller is None or unit is None:
            order, device = (len(_CONTROLLER_KINDS), disk.key, 0), None
        else:
            rank, kind, bus = controller
            order, device = (rank, bus, int(unit)), f"{kind}{bus}:{unit}"
        placed.append((order, {"name": str(disk.key), "device": device,
                               "boot": disk.key == boot_key}))  # fmt: skip
    guest = {getattr(n, "deviceConfigId", None): n for n in guest_nets}
    nics = []
    cards = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    for card in sorted(cards, key=lambda d: d.key):
        backing = card.backing
        reported = guest.get(card.key)
        network = getattr(backing, "deviceName", None)  # a standard port group: its name
        port = getattr(backing, "port", None)  # a distributed port group: its key
        if not network and port is not None:
            network = network_names.get(getattr(port, "portgroupKey", None) or "")
        if not network and reported is not None:
            network = getattr(reported, "network", None)
        info = getattr(card, "deviceInfo", None)
        nics.append({
            "name": getattr(info, "label", None) or f"ethernet {card.key}",
            "mac": getattr(card, "macAddress", None),
            "network": network,
            "addresses": list(getattr(reported, "ipAddress", None) or []),
        })  # fmt: skip
    return {
        "cpus": getattr(hardware, "numCPU", None),
        "memory_mib": getattr(hardware, "memoryMB", None),
        "guest_os": getattr(config, "guestId", None),
        "firmware": getattr(config, "firmware", None),
        "nics": nics,
        "disks": [item for _, item in sorted(placed, key=lambda pair: pair[0])],
    }


# --------------------------------------------------------------------------- reading


def change_epoch(change_id: str) -> str:
    """A change id is `<tracking UUID>/<sequence>`: a new UUID means tracking was reset."""
    return change_id.rsplit("/", 1)[0] if "/" in change_id else ""


class VmwareDiskSource(DiskSource):
    """One disk at one of the proxy's snapshots: its changed areas and its readers."""

    def __init__(self, platform: VmwarePlatform, snapshot: Snapshot, disk: str) -> None:
        super().__init__(snapshot, disk)
        self.platform = platform
        self.section = platform.section
        self.info = snapshot.disks[disk]
        self.where = f"VM {snapshot.vm_id} disk {disk} ({self.info['file']})"
        self.max_request = self.section.max_read_blocks * SECTOR
        self._export: NbdExport | None = None
        self._lock = threading.Lock()
        if self.section.transport == "https" and self.info.get("delta"):
            raise PlatformError(
                f"vmware: {self.where} is a delta of an older snapshot of the VM's own: the "
                "https transport reads flat disks only; remove the VM's other snapshots or "
                "set [vmware] transport = nbd"
            )

    def _areas(self, change_id: str) -> list[Extent] | None:
        """QueryChangedDiskAreas from `change_id`, page by page over the whole capacity;
        None when vCenter does not know the id or tracks nothing at this snapshot."""
        from pyVmomi import vim, vmodl

        info = self.info

        def query(si: Any, start: int) -> Any:
            vm = vim.VirtualMachine(str(info["vm"]), si._stub)
            snap = vim.vm.Snapshot(str(info["snapshot"]), si._stub)
            try:
                return vm.QueryChangedDiskAreas(
                    snapshot=snap, deviceKey=int(info["key"]), startOffset=start,
                    changeId=change_id,
                )  # fmt: skip
            except (vim.fault.FileFault, vmodl.fault.InvalidArgument) as exc:
                log.warning("%s: vCenter has no changes since %r: %s", self.where, change_id,
                            getattr(exc, "msg", "") or type(exc).__name__)  # fmt: skip
                return None

        found: list[Extent] = []
        start = 0
        while start < self.size:
            page = self.platform.session.call(
                f"changed areas of {self.where}", lambda si, at=start: query(si, at)
            )
            if page is None:
                return None
            for area in page.changedArea or []:
                found.append(Extent(int(area.start), int(area.length)))
            end = int(page.startOffset) + int(page.length)
            if end <= start:
                raise PlatformError(f"vmware: changed areas of {self.where} stop at {start}")
            start = end
        return found

    def allocated_extents(self) -> list[Extent]:
        found = self._areas("*")
        if found is None:  # no tracking at this snapshot: every byte may hold data
            return [Extent(0, self.size)] if self.size else []
        return found

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        if not base_token or not self.token:
            return None
        if change_epoch(base_token) != change_epoch(self.token):
            log.warning("%s: change tracking was reset since %r: reading every allocated "
                        "area", self.where, base_token)  # fmt: skip
            return None
        return self._areas(base_token)

    def open_reader(self) -> DiskReader:
        if self.section.transport == "nbd":
            with self._lock:
                if self._export is None:
                    self._export = NbdExport(self.section, self.info, self.where)
                export = self._export
            return export.open_reader(self.max_request)
        session = self.platform.session
        url = folder_url(
            self.section.host, self.section.port, str(self.info["file"]),
            str(self.info["datacenter"]),
        )  # fmt: skip
        return HttpsReader(url, ssl_context(self.section), session.cookie, session.expired,
                           self.max_request, self.where)  # fmt: skip

    def close(self) -> None:
        with self._lock:
            export, self._export = self._export, None
        if export is not None:
            export.close()


# --------------------------------------------------------------------------- the platform


class VmwarePlatform(Platform):
    name = NAME
    # CBT answers from a change id alone: the snapshot goes as soon as its point is committed.
    keeps_base_snapshot = False
    # One property collection lists every VM's snapshot tree; Redis' records find the
    # snapshots of runs the proxy knows at every scan.
    leftover_listing_every_s = 300

    def __init__(self, section: VmwareSection, flags: DiskFlags | None = None) -> None:
        self.section = section
        self.flags = flags or DiskFlags()
        self.inventory = VSphereInventory(section)
        self.session = self.inventory.session

    def close(self) -> None:
        """The session ends; the process keeps its vCenter session."""

    def discover(self) -> list[VmRef]:
        return self.inventory.discover()

    def vm(self, vm_id: str) -> VmRef:
        return self.inventory.vm(vm_id)

    # --- snapshots ----------------------------------------------------------------

    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        run_id = run_of_snapshot(snapshot_id)
        if run_id is None:
            raise PlatformError(f"vmware: {snapshot_id!r} is not a name of the proxy's snapshots")
        self.inventory.ensure_change_tracking(vm.vm_id)
        created = time.time()
        timeout = float(self.section.snapshot_timeout)

        quiesce_failed: list[str] = []

        def take(si: Any) -> tuple[Any, Any]:
            obj = self.inventory._vm_object(si, vm.vm_id)
            # Idempotent: a retry after a lost answer finds the snapshot the first try made.
            made = self.inventory.find_snapshots(si, obj, snapshot_id)
            if made:
                return obj, made[0]
            quiesce = self.section.quiesce and not quiesce_failed
            try:
                task = obj.CreateSnapshot_Task(
                    name=snapshot_id,
                    description=f"Hamal restore point {run_id}; the proxy removes it",
                    memory=False,
                    quiesce=quiesce,
                )
                return obj, wait_task(task, timeout)
            except Exception as exc:
                if not (quiesce and _quiesce_fault(exc)):
                    raise
                why = _fault_text(exc)
            # As a mature backup does: a crash-consistent point rather than none, and said.
            log.warning("vmware: VM %s could not be quiesced (%s): snapshot without quiescing",
                        vm.name, why)  # fmt: skip
            quiesce_failed.append(why)
            return take(si)

        try:
            obj, snap = self.session.call(f"snapshot of VM {vm.name}", take)
            disks, config = self.session.call(
                f"snapshot of VM {vm.name}", lambda si: self._snapshot_disks(obj, snap, vm)
            )
            nets, names = self.inventory.guest_networks(obj, f"VM {vm.name}")
            description = describe_vm(vm, vm_facts(config, nets, names), disks)
        except BaseException:
            with contextlib.suppress(Exception):
                self.delete_snapshot(Snapshot(snapshot_id, vm.vm_id, self.name, created))
            raise
        quiesced = self.section.quiesce and not quiesce_failed
        note = "" if quiesced else "crash-consistent (quiesce is off)"
        if quiesce_failed:
            note = f"crash-consistent: quiescing failed ({quiesce_failed[0]})"
        details = {"vm": obj._moId, "snapshot": snap._moId, "quiesced": quiesced}
        return Snapshot(
            snapshot_id, vm.vm_id, self.name, created, disks, "vm", note, details, description
        )

    def describe(self, vm: VmRef) -> dict[str, Any]:
        """The VM as its current config says (a snapshot's description is its own config's)."""

        def read(si: Any) -> tuple[Any, Any]:
            obj = self.inventory._vm_object(si, vm.vm_id)
            return obj, obj.config

        obj, config = self.session.call(f"describing VM {vm.name}", read)
        nets, names = self.inventory.guest_networks(obj, f"VM {vm.name}")
        return describe_vm(vm, vm_facts(config, nets, names))

    def _snapshot_disks(
        self, obj: Any, snap: Any, vm: VmRef
    ) -> tuple[dict[str, dict[str, Any]], Any]:
        """The snapshot's disks, and its config they came from (fetched once: the
        description is read from it too)."""
        from pyVmomi import vim

        config = snap.config
        found = self.inventory.snapshot_disks(snap, config)
        datacenter = obj.parent
        while datacenter is not None and not isinstance(datacenter, vim.Datacenter):
            datacenter = datacenter.parent
        disks: dict[str, dict[str, Any]] = {}
        for ref in vm.disks:
            info = found.get(ref.name)
            if info is None:
                raise PlatformError(f"vmware: the snapshot of VM {vm.name} has no disk {ref.name}")
            info.update(vm=obj._moId, snapshot=snap._moId,
                        datacenter=datacenter.name if datacenter is not None else "")  # fmt: skip
            if self.flags.applies(int(info["size"])):
                info["identity"] = (
                    f"vmware:{vm.vm_id}/{ref.name}/{info['disk_uuid'] or ref.locator}"
                )
            disks[ref.name] = info
        return disks, config

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        name = snapshot.snapshot_id
        if run_of_snapshot(name) is None:
            raise PlatformError(
                f"vmware: {name!r} is not one of the proxy's snapshots: not deleted"
            )
        timeout = float(self.section.snapshot_timeout)

        def remove(si: Any) -> int:
            from pyVmomi import vmodl

            obj = si.RetrieveContent().searchIndex.FindByUuid(None, snapshot.vm_id, True, True)
            if obj is None:
                return 0  # the VM is gone, and its snapshots with it
            found = self.inventory.find_snapshots(si, obj, name)
            for snap in found:
                with contextlib.suppress(vmodl.fault.ManagedObjectNotFound):  # removed meanwhile
                    task = snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
                    wait_task(task, timeout)
            return len(found)

        if snapshot.vm_id:
            self.session.call(f"removing snapshot {name}", remove)

    def leftover_snapshots(self) -> list[Snapshot]:
        rows = self.session.call(
            "listing snapshots", lambda si: collect(si, ("config.instanceUuid", "snapshot"))
        )
        found = []
        for _moid, props in rows:
            vm_id = props.get("config.instanceUuid") or ""
            for tree in walk_snapshots(props.get("snapshot")):
                if vm_id and run_of_snapshot(tree.name) is not None:
                    created = tree.createTime.timestamp() if tree.createTime else time.time()
                    found.append(Snapshot(tree.name, vm_id, self.name, created))
        return found

    # --- disks --------------------------------------------------------------------

    def open_disk(self, snapshot: Snapshot, disk: str) -> DiskSource:
        if disk not in snapshot.disks:
            raise PlatformError(f"vmware: snapshot {snapshot.snapshot_id} has no disk {disk}")
        return VmwareDiskSource(self, snapshot, disk)


def _create(settings: Settings) -> Platform:
    section = settings.vmware
    return VmwarePlatform(section, DiskFlags(section.skip_disk_flag, section.disk_flag_size))


SPEC = PlatformSpec(
    name=NAME,
    enabled=lambda settings: bool(settings.vmware.host),
    create=_create,
    release_cpu_ms_per_mb=lambda settings: settings.period.vmware_release_cpu_time,
)
