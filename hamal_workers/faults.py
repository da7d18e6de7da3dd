"""Named crash points: the fault suite kills a process at an exact step of a sync.

    HAMAL_FAULTS="after-claim@/tmp/x/fired,mid-finalize"

arms the named points in every process started with that environment. A process that
reaches an armed point kills itself with SIGKILL -- no cleanup, no `finally`, exactly
like a power cut or the OOM killer. With `@path` the point fires once across all
processes: the first to create `path` dies, the others (the repairs) go on. Unarmed,
a point costs one dictionary lookup.

The points, in the order a sync passes them:

    after-claim          vm.sync claimed the VM and created its run, before the snapshot
    after-snapshot       the snapshot exists, before the disks are planned and sent
    after-plan           the disks are planned, before their tasks are sent
    mid-disk             a disk task stored some chunks and flushed its checkpoint once
    after-last-disk      the last disk is settled, before finalize is sent
    mid-finalize         the point is committed, before Redis and the snapshot follow
    mid-sweep            the sweep deleted one leftover snapshot, before its record
    mid-gc-condemn       garbage collection condemned one chunk, before the rest
    mid-gc-drop          garbage collection dropped one condemned chunk, before the rest
"""

from __future__ import annotations

import os
import signal
from functools import cache

ENV = "HAMAL_FAULTS"


@cache
def _armed() -> dict[str, str]:
    armed = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, marker = item.strip().partition("@")
        if name:
            armed[name] = marker
    return armed


def point(name: str) -> None:
    """Die here if this point is armed (and, with a marker, not fired yet)."""
    marker = _armed().get(name)
    if marker is None:
        return
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
