"""How `hamal sync --wait` learns that a VM's sync committed or failed: the fleet's events.

The fleet publishes on `hamal:events`: `run-started` (run_id, vm_id) once a run's disks are
dispatched, `run` (run_id, vm_id, status) when it is committed or failed, and `vm-sync`
(vm_id, status, run_id, error) when a vm.sync task ends without starting a run (the VM is busy,
a run is already going, or it failed before a run existed). The subscription is made before the
task is sent, so no event of it can be missed. Published events are not kept, though: if the
connection drops one may be lost, so the run (or, before one is known, the VM and the task) is
also read every few seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from hamal_workers.state import COMMITTED, FAILED, State, key

# How often the run is read besides waiting for its events.
FALLBACK_CHECK_S = 3.0


@dataclass(frozen=True)
class Outcome:
    """How a wait ended: COMMITTED (detail = point id), FAILED (detail = error) or TIMED_OUT."""

    status: str
    run_id: str = ""
    detail: str = ""


TIMED_OUT = "timed out"


class SyncWait:
    """Made before the vm.sync task is sent; `wait` follows the VM's run to its end.

    That run is the one already going when this is made (the task will find it), else the
    next one started.
    """

    def __init__(self, client: redis.Redis, vm_id: str) -> None:
        self.state = State(client)
        self.vm_id = vm_id
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(key("events"))
        # Read after subscribing: a run that ends from now on is either seen here or announced.
        self.run_id = self.state.vm(vm_id).get("active_run", "")

    def close(self) -> None:
        self.pubsub.close()

    def wait(self, timeout: float, task: Any) -> Outcome:
        """Until the run ends or `timeout` seconds pass; `task` is the sent vm.sync's result."""
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + FALLBACK_CHECK_S
        while (left := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(timeout=min(left, FALLBACK_CHECK_S))
            outcome = self._on_event(json.loads(message["data"])) if message else None
            if outcome is None and time.monotonic() >= next_check:
                outcome = self._check(task)
                next_check = time.monotonic() + FALLBACK_CHECK_S
            if outcome is not None:
                return outcome
        return Outcome(TIMED_OUT, self.run_id)

    def _on_event(self, event: dict[str, Any]) -> Outcome | None:
        kind = event.get("event")
        if kind == "run" and self._is_ours(event):
            return self._ended(event.get("run_id", ""))
        if event.get("vm_id") != self.vm_id or self.run_id:
            return None
        if kind == "run-started":
            self.run_id = event.get("run_id", "")
        elif kind == "vm-sync":
            if event.get("status") == FAILED:
                return Outcome(FAILED, "", str(event.get("error") or "no error given"))
            self.run_id = event.get("run_id") or ""  # none: busy, a run of it is on its way
        return None

    def _is_ours(self, event: dict[str, Any]) -> bool:
        if self.run_id:
            return bool(event.get("run_id") == self.run_id)
        return bool(event.get("vm_id") == self.vm_id)

    def _ended(self, run_id: str) -> Outcome | None:
        run = self.state.run(run_id)
        if run.get("status") == COMMITTED:
            return Outcome(COMMITTED, run_id, run.get("point_id") or run_id)
        if run.get("status") == FAILED:
            return Outcome(FAILED, run_id, run.get("error") or "no error recorded")
        return None

    def _check(self, task: Any) -> Outcome | None:
        """The fallback read: the run if known, else the VM's active run and the task's end."""
        if not self.run_id:
            self.run_id = self.state.vm(self.vm_id).get("active_run", "")
        if self.run_id:
            return self._ended(self.run_id)
        return _task_failure(task)


def _task_failure(task: Any) -> Outcome | None:
    # Read once, never awaited (.get would block on the result backend).
    if task.state != "FAILURE":
        return None
    error = task.result
    return Outcome(FAILED, "", f"{type(error).__name__}: {error}")
