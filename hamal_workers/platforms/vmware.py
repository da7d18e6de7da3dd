"""VMware vCenter through pyvmomi: the session and discovery (snapshots, CBT and reads next).

Not registered yet (no SPEC): a platform is registered once it can sync. What is here:

- **Session** (`VSphereSession`): one per worker process, verified TLS by default
  (`[vmware] ca_file`, else the system's CAs; `insecure` only when set), logged in again
  when vCenter expired it (`NotAuthenticated`), logged out at exit.
- **Discovery**: every VM (templates aside), or those `[vmware] vms` names by instance
  UUID, managed object id or name; each disk with its device key, capacity, backing file
  and datastore. Disks a snapshot cannot cover -- independent disks and physical-mode
  RDMs -- are skipped and named, never silently.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hamal_workers.platforms.base import DiskRef, PlatformError, TransientPlatformError, VmRef
from hamal_workers.platforms.shared import process_shared

if TYPE_CHECKING:
    from hamal_workers.config import VmwareSection

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
        atexit.register(self.logout)

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
    """The VMs vCenter has, as the proxy sees them (discovery only)."""

    def __init__(self, section: VmwareSection) -> None:
        self.section = section
        self.session = session_for(section)

    def _wanted(self) -> set[str]:
        return {part.strip() for part in self.section.vms.split(",") if part.strip()}

    def discover(self) -> list[VmRef]:
        wanted = self._wanted()
        found = []
        for vm in self.session.call("listing VMs", _all_vms):
            ref = vm_ref(vm)
            if ref is None:
                continue
            if wanted and not wanted & {ref.vm_id, ref.name, vm._moId}:
                continue
            found.append(ref)
        return found

    def vm(self, key: str) -> VmRef:
        """A VM by instance UUID, managed object id or name."""
        for vm in self.session.call("listing VMs", _all_vms):
            ref = vm_ref(vm)
            if ref is not None and key in (ref.vm_id, ref.name, vm._moId):
                return ref
        raise PlatformError(f"vmware: no VM with instance UUID, id or name {key!r}")

    # --- change tracking and snapshots ---------------------------------------------

    def _vm_object(self, si: Any, vm_id: str) -> Any:
        found = si.RetrieveContent().searchIndex.FindByUuid(None, vm_id, True, True)
        if found is None:
            raise PlatformError(f"vmware: no VM with instance UUID {vm_id}")
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
            wait_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))

        self.session.call(f"turning change tracking on for {vm_id}", ensure)

    def snapshot_disks(self, snapshot: Any) -> dict[str, dict[str, Any]]:
        """disk name -> what a reader needs, from a snapshot's own config."""
        from pyVmomi import vim

        disks = {}
        for disk in snapshot.config.hardware.device:
            if not isinstance(disk, vim.vm.device.VirtualDisk):
                continue
            backing = disk.backing
            size = disk.capacityInBytes or (disk.capacityInKB or 0) * 1024
            disks[str(disk.key)] = {
                "key": disk.key,
                "file": backing.fileName,
                "size": int(size),
                "token": getattr(backing, "changeId", None) or "",
            }
        return disks

    def find_snapshots(self, si: Any, vm: Any, name: str) -> list[Any]:
        found: list[Any] = []

        def walk(trees: list[Any]) -> None:
            for tree in trees:
                if tree.name == name:
                    found.append(tree.snapshot)
                walk(tree.childSnapshotList)

        if vm.snapshot is not None:
            walk(vm.snapshot.rootSnapshotList)
        return found


def wait_task(task: Any, timeout_s: float = 3600) -> Any:
    """A vSphere task's result, or its error as a PlatformError."""
    import time

    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while task.info.state not in ("success", "error"):
        if time.monotonic() > deadline:
            raise TransientPlatformError(f"vmware: task {task.info.descriptionId} took too long")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    if task.info.state == "error":
        error = task.info.error
        raise PlatformError(f"vmware: {task.info.descriptionId}: {getattr(error, 'msg', error)}")
    return task.info.result


def _all_vms(si: Any) -> list[Any]:
    from pyVmomi import vim

    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def vm_ref(vm: Any) -> VmRef | None:
    """The VM as a VmRef (None for a template); disks in device key order."""
    from pyVmomi import vim

    config = vm.config
    if config is None or config.template:
        return None
    disks, skipped = [], []
    devices = sorted(
        (d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)),
        key=lambda d: d.key,
    )
    for disk in devices:
        backing = disk.backing
        label = f"disk {disk.key} ({backing.fileName})"
        mode = getattr(backing, "diskMode", "") or ""
        if mode in INDEPENDENT_MODES:
            skipped.append(f"{label}: an independent disk ({mode}): snapshots do not cover it")
            continue
        if getattr(backing, "compatibilityMode", "") == "physicalMode":
            skipped.append(f"{label}: a physical-mode RDM: snapshots do not cover it")
            continue
        size = disk.capacityInBytes or (disk.capacityInKB or 0) * 1024
        disks.append(DiskRef(str(disk.key), int(size), backing.fileName))
    return VmRef(config.instanceUuid, vm.name, NAME, tuple(disks), tuple(skipped))
