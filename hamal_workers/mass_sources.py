"""How a Mass task's source becomes the connection a platform opens (Mass mode).

A task's `source` holds the keys of its platform's hamal.conf section(s), credentials
included: `[vmware]` for vmware, `[fusion_compute]` for fusion, `[openstack]` then `[ceph]`
for ceph, `[local]` for local. They are laid over the proxy's own settings, each value
checked as hamal.conf checks it (an error names the task and the key, never the value),
and the platform's VM filter is set to the task's VMs. A CA given as PEM (`ca_cert`) is
written once to `hamal_lib_dir/mass/ca/<sha256>.pem` and named by the section's CA key.

A platform is opened for a VM through its Mass task (`open_for_vm`): the scan records
which task a VM belongs to (`mass_task` in its Redis record), and every task after it --
vm.sync, disk sync, finalize, the sweep -- opens the platform with that task's source,
unsealed in the worker's memory only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hamal_workers import fsutil
from hamal_workers.config import KEYS, Key
from hamal_workers.mass import MassError, SourceKey, TaskView
from hamal_workers.platforms import open_platform

if TYPE_CHECKING:
    from hamal_workers.config import Settings
    from hamal_workers.platforms.base import Platform
    from hamal_workers.state import State

SECTIONS: dict[str, tuple[str, ...]] = {
    "vmware": ("vmware",),
    "fusion": ("fusion_compute",),
    "ceph": ("openstack", "ceph"),
    "local": ("local",),
}
# The key that limits a platform to some VMs, and the one naming a CA file.
VM_FILTER = {"vmware": ("vmware", "vms"), "fusion": ("fusion_compute", "vms"),
             "ceph": ("openstack", "servers")}  # fmt: skip
CA_KEY = {"vmware": ("vmware", "ca_file"), "fusion": ("fusion_compute", "ca_file"),
          "ceph": ("openstack", "cacert")}  # fmt: skip
_KEYS = {(key.section.lower(), key.name): key for key in KEYS}


def mass_mode(settings: Settings) -> bool:
    return bool(settings.mass.mass_endpoint)


def source_digest(platform: str, source: dict[str, Any]) -> str:
    """One id per distinct connection: tasks that share it are discovered together."""
    text = json.dumps([platform, source], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_settings(
    settings: Settings, task_id: str, platform: str, source: dict[str, Any], vm_ids: list[str]
) -> Settings:
    """`settings` with the task's source laid over its platform's section(s)."""
    sections = SECTIONS.get(platform)
    if sections is None:
        raise MassError(f"mass: task {task_id}: unknown platform {platform!r}")
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for name, value in source.items():
        if name == "ca_cert":
            if platform not in CA_KEY or not isinstance(value, str):
                raise MassError(f"mass: task {task_id}: ca_cert is not a PEM text for {platform}")
            section, ca_key = CA_KEY[platform]
            changes[section][ca_key] = str(_ca_file(settings, value))
            continue
        section = next((s for s in sections if (s, name) in _KEYS), None)
        if section is None:
            raise MassError(
                f"mass: task {task_id}: source key {name!r} is not a key of "
                + " or ".join(f"[{s}]" for s in sections)
            )
        key: Key = _KEYS[(section, name)]
        typed = key.convert(str(value).lower() if isinstance(value, bool) else str(value))
        bounded = key.type not in (int, float) or key.high is not None
        if typed is None or (bounded and not key.within(typed, key.high)):
            expected = key.expected(key.high)
            raise MassError(f"mass: task {task_id}: source key {name!r} of [{section}]: {expected}")
        changes[section][name] = typed
    if platform in VM_FILTER:
        section, filter_key = VM_FILTER[platform]
        changes[section][filter_key] = ",".join(vm_ids)
    replaced = {
        name: dataclasses.replace(getattr(settings, name), **values)
        for name, values in changes.items()
    }
    return dataclasses.replace(settings, **replaced)


def _ca_file(settings: Settings, pem: str) -> Path:
    digest = hashlib.sha256(pem.encode()).hexdigest()
    path = Path(settings.default.hamal_lib_dir) / "mass" / "ca" / f"{digest}.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.write_atomic(path, [pem.encode()], mode=0o644)
    return path


def task_source(settings: Settings, state: State, view: TaskView) -> dict[str, Any]:
    sealed = state.mass_source(view.task_id)
    if sealed is None:
        raise MassError(f"mass: task {view.task_id}: its source is not in Redis (fetched again)")
    return SourceKey(settings.default.hamal_lib_dir).open(view.task_id, view.version, sealed)


def task_of_vm(state: State, vm_id: str) -> TaskView | None:
    task_id = state.vm(vm_id).get("mass_task")
    if not task_id:
        return None
    # A retired task still opens its VM's platform: its base snapshot goes with it.
    found = state.mass_task(task_id, retired=True)
    return TaskView.from_json(found) if found else None


def open_for_vm(settings: Settings, state: State, name: str, vm_id: str) -> Platform:
    """The platform `name` for this VM: through its Mass task in Mass mode, else as
    hamal.conf configures it."""
    if not mass_mode(settings) or not vm_id:
        return open_platform(name, settings)
    view = task_of_vm(state, vm_id)
    if view is None:
        raise MassError(f"mass: VM {vm_id} belongs to no task Mass gave this proxy")
    source = task_source(settings, state, view)
    return open_platform(name, task_settings(settings, view.task_id, name, source, [vm_id]))
