"""A restore point's metadata: the VM it is of and the snapshot chain it continues.

`[sync] upload_metadata_to_oss` keeps the record beside the point in the store
(`metadata.json`, so that a bucket describes its VMs to a proxy that has nothing else);
`[sync] save_local_snapshot_metadata` also under `hamal_lib_dir/metadata/<vm>/<point>.json`.
`hamal points --vm NAME --json` shows it. The record (docs/FORMAT.md):

    format, version       "hamal-point-metadata", 1
    vm_id, vm_name, point_id, platform, created, created_utc
    snapshot              the platform's snapshot id, and how consistent it is across disks
    vm                    the VM's description at the snapshot: CPUs, memory, NICs, firmware,
                          disks in the VM's order (what a restore needs to rebuild the VM)
    disks                 in that order: name, size, change id, mode ("allocated": read in
                          full; "changed": an incremental) and the base point it was diffed
                          from; following base points back to a full one gives each disk's chain
    skipped               disks of the VM the proxy does not sync, and why

Nothing secret is in it: platforms never put credentials into a description.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hamal_workers.fsutil import write_atomic
from hamal_workers.platforms.base import Snapshot
from hamal_workers.targets.chunkstore import encode_name

METADATA_FORMAT = "hamal-point-metadata"
METADATA_VERSION = 1


def build_record(
    point_id: str,
    vm_name: str,
    snapshot: Snapshot,
    disks: Mapping[str, Mapping[str, str]],
    skipped: list[str],
) -> dict[str, Any]:
    """The metadata of the point `point_id`; `disks`: each synced disk's outcome fields."""
    vm: dict[str, Any] = dict(snapshot.vm)
    described = [d.get("name") for d in vm.get("disks") or [] if isinstance(d, dict)]
    order = [d for d in described if d in disks] + sorted(d for d in disks if d not in described)
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "vm_id": snapshot.vm_id,
        "vm_name": vm_name,
        "point_id": point_id,
        "platform": snapshot.platform,
        "created": snapshot.created,
        "created_utc": datetime.fromtimestamp(snapshot.created, UTC).isoformat(),
        "snapshot": {
            "id": snapshot.snapshot_id,
            "consistency": snapshot.consistency,
            "consistency_note": snapshot.consistency_note,
        },
        "vm": vm,
        "disks": [
            {
                "name": disk,
                "size": int(float(disks[disk].get("size") or 0)),
                "change_id": snapshot.token(disk),
                "mode": disks[disk].get("mode", ""),
                "base_point": disks[disk].get("base_point") or None,
            }
            for disk in order
        ],
        "skipped": list(skipped),
    }


def local_path(lib_dir: str, vm_id: str, point_id: str) -> Path:
    return Path(lib_dir) / "metadata" / encode_name(vm_id) / f"{encode_name(point_id)}.json"


def save_local(lib_dir: str, record: dict[str, Any]) -> None:
    """Write the record under hamal_lib_dir, durably; OSError when it cannot be."""
    path = local_path(lib_dir, record["vm_id"], record["point_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, [json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"])


def load_local(lib_dir: str, vm_id: str, point_id: str) -> dict[str, Any] | None:
    """The record saved under hamal_lib_dir, or None (absent or unreadable: it is a copy)."""
    path = local_path(lib_dir, vm_id, point_id)
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def drop_local(lib_dir: str, vm_id: str, point_ids: Iterable[str]) -> None:
    """Forget the local records of deleted points (retention), so none outlives its point."""
    for point_id in point_ids:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_path(lib_dir, vm_id, point_id))
