"""A disk sync's checkpoint in Redis: the snapshot it reads, its plan, and what is stored.

Entries go to Redis only after the target's durability barrier (see pipeline.py), so a
redelivered disk task can trust every entry it finds and re-reads at most what was
stored during one flush period.
"""

from __future__ import annotations

import json

from hamal_workers.engine.extents import from_runs, to_runs
from hamal_workers.engine.plan import DiskPlan
from hamal_workers.state import State


class RedisCheckpoint:
    def __init__(self, state: State, run_id: str, disk: str, snapshot_id: str) -> None:
        self.state = state
        self.run_id = run_id
        self.disk = disk
        self.snapshot_id = snapshot_id

    def saved_plan(self) -> list[int] | None:
        """The chunk indexes an earlier delivery planned to read, if it got that far."""
        fields, _ = self.state.checkpoint(self.run_id, self.disk)
        if fields.get("snapshot_id") != self.snapshot_id or "plan" not in fields:
            return None
        return list(from_runs(json.loads(fields["plan"])))

    def start(self, plan: DiskPlan) -> None:
        self.state.save_checkpoint(
            self.run_id,
            self.disk,
            {
                "snapshot_id": self.snapshot_id,
                "mode": plan.mode,
                "size": str(plan.size),
                "chunk_size": str(plan.chunk_size),
                "plan": json.dumps(to_runs(plan.to_read)),
                "total": str(len(plan.to_read)),
            },
            {},
        )

    def load(self) -> dict[int, bytes | None]:
        fields, entries = self.state.checkpoint(self.run_id, self.disk)
        if fields.get("snapshot_id") != self.snapshot_id:
            return {}
        return {index: (digest or None) for index, digest in entries.items()}

    def save(self, new_entries: dict[int, bytes | None], done: int, total: int) -> None:
        self.state.save_checkpoint(
            self.run_id,
            self.disk,
            {"done": str(done), "total": str(total)},
            {index: digest or b"" for index, digest in new_entries.items()},
        )
