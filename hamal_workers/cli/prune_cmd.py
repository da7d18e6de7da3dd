"""`hamal prune` applies [retention] now; `hamal gc` runs a garbage collection pass now.

Both are what the fleet does by itself (retention after every commit, a collection pass
from the scan when one is due); these are for an operator who wants to see or do it now.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from hamal_workers.cli.common import (
    CommandError,
    add_config_option,
    guarded,
    load_settings,
    open_redis,
    redis_errors,
)
from hamal_workers.cli.points_cmd import human_size, resolve_vm
from hamal_workers.gc import collect_exclusively, tell_vms, unreferenced_bytes, young_grace
from hamal_workers.point_metadata import drop_local
from hamal_workers.prune import VmRetention, base_reasons, delete_expired, plan_retention
from hamal_workers.retention import RetentionPolicy
from hamal_workers.state import State
from hamal_workers.targets import open_target


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("prune", help="delete restore points [retention] does not keep")
    add_config_option(p)
    p.add_argument("--vm", metavar="NAME", help="only this VM (its name or id); default: all")
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted; delete nothing"
    )
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(func=guarded("prune", cmd_prune))

    p = subparsers.add_parser("gc", help="free the chunks no restore point uses (one pass)")
    add_config_option(p)
    p.add_argument(
        "--dry-run", action="store_true", help="count what a pass would do; change nothing"
    )
    p.add_argument("--json", action="store_true", help="print the pass's report as JSON")
    p.set_defaults(func=guarded("gc", cmd_gc))


def cmd_prune(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    target = open_target(settings, create=False)
    policy = RetentionPolicy.from_settings(settings.retention)
    with redis_errors(settings):
        state = State(open_redis(settings))
        scan = target.scan_points()
        vm_id = resolve_vm(scan, args.vm) if args.vm else None
        plans = plan_retention(scan, policy, base_reasons(state, vm_id), vm_id)
        doomed = {(p.vm_id, v.point_id) for p in plans for v in p.expired}
        freed, chunks = unreferenced_bytes(target, state, doomed) if doomed else (0, 0)
    deleted = 0
    for plan in [] if args.dry_run else plans:
        gone = delete_expired(target, plan)
        drop_local(settings.default.hamal_lib_dir, plan.vm_id, gone)
        deleted += len(gone)
    if deleted:
        with redis_errors(settings):
            state.gc_due()
    if args.json:
        outcome = {
            "policy": policy.describe(),
            "dry_run": args.dry_run,
            "deleted": deleted,
            "bytes": freed,
            "chunks": chunks,
            "vms": [_plan_json(plan) for plan in plans],
        }
        print(json.dumps(outcome, indent=1, sort_keys=True))
        return 0
    print(f"policy: {policy.describe()}")
    for plan in plans:
        _print_plan(plan)
    what = f"{human_size(freed)} ({chunks} chunks no other point uses)"
    if args.dry_run:
        print(f"would delete {len(doomed)} restore points and free {what}; nothing deleted")
    else:
        print(
            f"deleted {deleted} restore points; {what} come back within two garbage "
            "collection passes (the scan sends them, or run hamal gc twice)"
        )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    target = open_target(settings, create=False)
    with redis_errors(settings):
        state = State(open_redis(settings))
        lease_ttl = float(settings.worker.lease_timeout)
        young_s = young_grace(float(settings.data_sync_v2.fsync_period_frequency))
        report = collect_exclusively(target, state, lease_ttl, young_s, dry_run=args.dry_run)
    if report is None:
        raise CommandError("another garbage collection is running; try again when it ends")
    if not args.dry_run:
        with redis_errors(settings):
            tell_vms(state, settings, report)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1, sort_keys=True))
        return 1 if report.refused else 0
    print(("dry run, nothing changed: " if args.dry_run else "") + report.summary())
    for vm_id, size in sorted(report.freeing_by_vm.items()):
        with redis_errors(settings):
            name = state.vm(vm_id).get("name") or vm_id
        print(f"  VM {name}: {human_size(size)} of chunks only its deleted points used")
    if args.dry_run and report.condemned:
        print(
            f"{report.condemned} unused chunks ({human_size(report.condemned_bytes)}) would be "
            "condemned, and freed by the pass after"
        )
    return 1 if report.refused else 0


def _plan_json(plan: VmRetention) -> dict[str, object]:
    return {
        "vm_id": plan.vm_id,
        "vm_name": plan.vm_name,
        "delete": [v.point_id for v in plan.expired],
        "keep": {v.point_id: list(v.reasons) for v in plan.kept},
        "broken": [b.point_id for b in plan.broken],
    }


def _print_plan(plan: VmRetention) -> None:
    label = f"{plan.vm_name} ({plan.vm_id})" if plan.vm_name else plan.vm_id
    print(
        f"VM {label}: {len(plan.verdicts)} points, {len(plan.expired)} to delete, "
        f"{len(plan.kept)} kept"
    )
    for verdict in plan.expired:
        print(f"  delete {verdict.point_id}  {_utc(verdict.created)}")
    for bad in plan.broken:
        print(f"  BROKEN {bad.point_id} is never deleted by prune: {bad.problem}")


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
