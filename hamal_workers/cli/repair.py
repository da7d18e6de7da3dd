"""`hamal verify --repair`: read damaged chunks' data again from the current source.

For each VM that uses a damaged chunk, a snapshot of the VM is taken (named like every
snapshot the proxy makes, so the sweep finds it if this command is killed), the chunk's
place is read from it, and the chunk is stored again only when that data carries the
chunk's name -- the source may have changed since. Every snapshot taken is deleted on
every exit path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import ExitStack

from hamal_workers.config import Settings
from hamal_workers.mass import MassError
from hamal_workers.mass_sources import mass_mode, open_for_vm
from hamal_workers.platforms import enabled_platforms, open_platform
from hamal_workers.platforms.base import (
    Platform,
    PlatformError,
    Snapshot,
    new_run_id,
    snapshot_name,
)
from hamal_workers.state import State
from hamal_workers.targets.restore import ReadContent


@contextlib.contextmanager
def current_sources(
    settings: Settings, chunk_size: int, state: State | None = None
) -> Iterator[ReadContent]:
    """read_content(vm_id, disk, index) over fresh snapshots of the VMs, deleted at the end.

    In Mass mode (with `state`) a VM's source is its Mass task's, opened for that VM.
    """
    with ExitStack() as stack:
        mass = state is not None and mass_mode(settings)
        sessions = [] if mass else [
            stack.enter_context(open_platform(n, settings)) for n in enabled_platforms(settings)
        ]  # fmt: skip
        snapshots: dict[str, tuple[Platform, Snapshot] | None] = {}

        def sessions_of(vm_id: str) -> list[Platform]:
            if not mass:
                return sessions
            assert state is not None
            name = state.vm(vm_id).get("platform", "")
            try:
                return [stack.enter_context(open_for_vm(settings, state, name, vm_id))]
            except (MassError, PlatformError):
                return []  # not a VM of Mass' tasks: nothing to read it from

        def snapshot_of(vm_id: str) -> tuple[Platform, Snapshot] | None:
            if vm_id not in snapshots:
                snapshots[vm_id] = None
                for platform in sessions_of(vm_id):
                    try:
                        vm = platform.vm(vm_id)
                    except PlatformError:
                        continue
                    snapshot = platform.create_snapshot(vm, snapshot_name(new_run_id()))
                    stack.callback(platform.delete_snapshot, snapshot)
                    snapshots[vm_id] = (platform, snapshot)
                    break
            return snapshots[vm_id]

        def read_content(vm_id: str, disk: str, index: int) -> bytes | None:
            found = snapshot_of(vm_id)
            if found is None or disk not in found[1].disks:
                return None
            platform, snapshot = found
            with platform.open_disk(snapshot, disk) as source:
                offset = index * chunk_size
                length = min(chunk_size, source.size - offset)
                if length <= 0:
                    return None
                reader = source.open_reader()
                try:
                    buf = bytearray(length)
                    got = reader.readinto(offset, memoryview(buf))
                finally:
                    reader.close()
            return bytes(buf) if got == length else None

        yield read_content
