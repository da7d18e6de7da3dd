"""Retention: which restore points each VM keeps under [retention], and deleting the rest.

The policy (retention.py) decides from the points' times alone; this module adds what
only the running system knows -- a point a running sync diffs from is kept whatever the
policy says -- and deletes. Deleting a point removes its record and manifests at once;
its chunks are garbage collection's (gc.py), which frees those no other point uses
within two passes. A broken point (a record that cannot be read) is never deleted
here: `hamal verify` shows it and the operator decides.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from hamal_workers.retention import RetentionPolicy, Verdict, apply_policy
from hamal_workers.state import State
from hamal_workers.targets.base import BrokenPoint, MissingPoint, PointInfo, PointScan, Target

log = logging.getLogger("hamal.period")


@dataclass
class VmRetention:
    vm_id: str
    vm_name: str
    verdicts: list[Verdict]  # oldest first
    broken: list[BrokenPoint] = field(default_factory=list)

    @property
    def expired(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.keep]

    @property
    def kept(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.keep]


def base_reasons(state: State, vm_id: str | None = None) -> dict[str, dict[str, str]]:
    """vm_id -> {point_id: why kept} for every point a running disk sync diffs from
    (of one VM when vm_id is given)."""
    return {
        vm: {point: f"base of running sync {run_id}" for point, run_id in points.items()}
        for vm, points in state.running_bases(vm_id).items()
    }


def plan_retention(
    scan: PointScan,
    policy: RetentionPolicy,
    protected: dict[str, dict[str, str]],
    vm_id: str | None = None,
) -> list[VmRetention]:
    """Each VM's verdicts (one VM's when vm_id is given) over a listing, by VM id."""
    by_vm: dict[str, list[PointInfo]] = defaultdict(list)
    for info in scan.points:
        if vm_id is None or info.vm_id == vm_id:
            by_vm[info.vm_id].append(info)
    broken: dict[str, list[BrokenPoint]] = defaultdict(list)
    for bad in scan.broken:
        if vm_id is None or bad.vm_id == vm_id:
            broken[bad.vm_id].append(bad)
    plans = []
    for vm in sorted(set(by_vm) | set(broken)):
        points = by_vm.get(vm, [])
        verdicts = apply_policy(
            [(p.point_id, p.created) for p in points], policy, protected.get(vm, {})
        )
        name = points[-1].vm_name if points else ""
        plans.append(VmRetention(vm, name, verdicts, broken.get(vm, [])))
    return plans


def delete_expired(target: Target, plan: VmRetention) -> list[str]:
    """Delete the points the plan expires; the ids deleted (one already gone is skipped)."""
    deleted = []
    for verdict in plan.expired:
        try:
            target.delete_point(plan.vm_id, verdict.point_id)
        except MissingPoint:
            continue
        deleted.append(verdict.point_id)
    return deleted
