"""A disk sync's checkpoint in Redis: the snapshot it reads, its whole plan, what is stored.

Entries go to Redis only after the target's durability barrier (see pipeline.py), so a
redelivered disk task can trust every entry it finds and re-reads at most what was
stored during one flush period. Every write is fenced by the disk's lease.
"""

from __future__ import annotations

from hamal_workers.engine.plan import DiskPlan
from hamal_workers.state import Lease, State


class RedisCheckpoint:
    def __init__(
        self, state: State, run_id: str, disk: str, snapshot_id: str, fence: Lease | None = None
    ) -> None:
        self.state = state
        self.run_id = run_id
        self.disk = disk
        self.snapshot_id = snapshot_id
        self.fence = fence

    def saved_plan(self) -> dict[str, str] | None:
        """The fields of the plan an earlier delivery started, if it got that far."""
        fields, _ = self.state.checkpoint(self.run_id, self.disk)
        if fields.get("snapshot_id") != self.snapshot_id or "plan" not in fields:
            return None
        return fields

    def start(self, plan: DiskPlan, gc_ack: int) -> None:
        """Save a new plan, dropping whatever an earlier one had stored.

        gc_ack: the garbage collection round seen before any chunk was chosen (reuse_fence.py).
        """
        fields = {"snapshot_id": self.snapshot_id, **plan.to_fields(), "done": "0"}
        self.state.start_checkpoint(
            self.run_id, self.disk, {**fields, "gc_ack": str(gc_ack)}, self.fence
        )

    def load(self) -> dict[int, bytes | None]:
        fields, entries = self.state.checkpoint(self.run_id, self.disk)
        if fields.get("snapshot_id") != self.snapshot_id:
            return {}
        return entries

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int
    ) -> None:
        self.state.save_checkpoint(
            self.run_id,
            self.disk,
            {"done": str(done), "total": str(total), "gc_ack": str(gc_ack)},
            new_entries,
            self.fence,
        )
