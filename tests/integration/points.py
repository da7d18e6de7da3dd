"""Restore points as a test checks them: restored from the fleet's store, byte for byte."""

from __future__ import annotations

from hamal_workers.localfleet import LocalFleet
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.restore import restore_disk


def restored(fleet: LocalFleet, vm_id: str, point_id: str, disk: str) -> bytes:
    """The disk of a restore point, restored through the product's own restore."""
    out = fleet.root / "restored.raw"
    restore_disk(ChunkStore(str(fleet.root / "store")), vm_id, point_id, disk, str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()
