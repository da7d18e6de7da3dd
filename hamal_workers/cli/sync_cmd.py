"""`hamal sync` starts a sync now; `hamal status` shows running syncs and the last results."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from hamal_workers.backoff import backoff
from hamal_workers.cli.common import (
    CommandError,
    add_config_option,
    guarded,
    load_settings,
    one_line,
    open_redis,
    redis_errors,
)
from hamal_workers.cli.points_cmd import human_size
from hamal_workers.cli.sync_wait import TIMED_OUT, Outcome, SyncWait
from hamal_workers.config import CONTROL_QUEUE, Settings
from hamal_workers.mass_sources import mass_mode
from hamal_workers.platforms import enabled_platforms, open_platform
from hamal_workers.platforms.base import PlatformError, VmRef
from hamal_workers.state import COMMITTED, State
from hamal_workers.targets import open_target
from hamal_workers.targets.base import TargetError
from hamal_workers.tasks.base import PRIORITY_MANUAL
from hamal_workers.tasks.progress import disk_progress

# How long workers have to answer "which queues do you consume?" (they answer in milliseconds).
WORKER_REPLY_S = 1.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sync", help="start a sync of one VM now")
    add_config_option(p)
    p.add_argument("--vm", required=True, help="VM name or id")
    p.add_argument("--wait", action="store_true", help="wait until the restore point is committed")
    p.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits at most")
    p.set_defaults(func=guarded("sync", cmd_sync))

    p = sub.add_parser("status", help="running syncs with per-disk progress, last results")
    add_config_option(p)
    p.set_defaults(func=guarded("status", cmd_status))


def known_vm(state: State, settings: Settings, name: str) -> VmRef | None:
    """The VM as the scans recorded it, when exactly one enabled VM has that name or id.

    Saves asking every platform for its whole inventory (thousands of instances) to find
    one; the worker asks the platform about that one VM when the sync starts, and fails
    clearly if it is gone. Unknown or ambiguous names go to the platforms.
    """
    enabled = set(enabled_platforms(settings))
    tasks = set(state.mass_tasks()) if mass_mode(settings) else set()
    ids = state.vm_ids()
    matches = [
        VmRef(vm_id, record.get("name", ""), record.get("platform", ""), ())
        for vm_id, record in zip(ids, state.vms(ids), strict=True)
        if name in (vm_id, record.get("name"))
        # Mass mode: the VMs of Mass' tasks, as the scan recorded them; else hamal.conf's.
        and (record.get("mass_task") in tasks if tasks else record.get("platform") in enabled)
    ]
    return matches[0] if len(matches) == 1 else None


def find_vm(settings: Settings, name: str) -> VmRef:
    if mass_mode(settings):
        raise PlatformError(
            f"no VM named {name!r} among the VMs of Mass' tasks that the scans recorded: Mass "
            "decides what this proxy protects ([mass] mass_endpoint is set)"
        )
    matches: list[VmRef] = []
    for name_of_platform in enabled_platforms(settings):
        with open_platform(name_of_platform, settings) as platform:
            matches += [vm for vm in platform.discover() if name in (vm.name, vm.vm_id)]
    if not matches:
        raise PlatformError(
            f"no VM named {name!r} on the enabled platforms "
            f"({', '.join(enabled_platforms(settings)) or 'none'})"
        )
    if len(matches) > 1:
        ids = ", ".join(f"{vm.platform}:{vm.vm_id}" for vm in matches)
        raise PlatformError(f"{name!r} names several VMs ({ids}): give the id")
    return matches[0]


def _app_for(settings: Settings) -> Any:
    # The Celery app reads $HAMAL_CONF when imported: point it at the file we loaded.
    os.environ["HAMAL_CONF"] = settings.path
    from hamal_workers.celery_app import app

    return app


def _require_period_worker(app: Any, state: State) -> None:
    """Refuse to send a task that nothing would run: it would only wait in the queue.

    Workers keep a presence key in Redis (renewed every third of the lease time): reading
    them is one round trip, where a broadcast waits its whole timeout for replies. Only
    when no key says so (a worker that has just started) are they asked by broadcast.
    """
    if any(CONTROL_QUEUE in w.get("queues", ()) for w in state.live_workers().values()):
        return
    replies = app.control.inspect(timeout=WORKER_REPLY_S).active_queues() or {}
    if not any(
        queue.get("name") == CONTROL_QUEUE for queues in replies.values() for queue in queues
    ):
        raise CommandError(
            f"no worker consumes queue {CONTROL_QUEUE}: start one "
            f"(celery -A hamal_workers worker -Q {CONTROL_QUEUE}); nothing was sent"
        )


def cmd_sync(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    with redis_errors(settings):
        client = open_redis(settings)
        app = _app_for(settings)
        # Checked before the VM is looked up: discovery may take long, and nothing would run.
        _require_period_worker(app, State(client))
        vm = known_vm(State(client), settings, args.vm) or find_vm(settings, args.vm)
        waiting = SyncWait(client, vm.vm_id) if args.wait else None
        try:
            return _send_and_wait(app, vm, args.timeout, waiting)
        finally:
            if waiting:
                waiting.close()


def _send_and_wait(app: Any, vm: VmRef, timeout: float, waiting: SyncWait | None) -> int:
    # Its result is kept (tasks keep none by default): --wait falls back on its state.
    task = app.send_task(
        "hamal.vm.sync",
        kwargs={"vm_id": vm.vm_id, "platform": vm.platform},
        queue="period",
        priority=PRIORITY_MANUAL,
        ignore_result=waiting is None,
    )
    print(f"sync of {vm.name} ({vm.vm_id}) sent as task {task.id}")
    if waiting is None:
        return 0
    print(
        f"waiting for {vm.name}'s sync to commit, at most {timeout:g} s "
        "(Ctrl-C stops waiting; the sync goes on)",
        file=sys.stderr,
        flush=True,
    )
    try:
        outcome = waiting.wait(timeout, task)
    except KeyboardInterrupt:
        print("hamal sync: stopped waiting; the sync goes on: see hamal status", file=sys.stderr)
        return 130
    return _report(vm, timeout, outcome)


def _report(vm: VmRef, timeout: float, outcome: Outcome) -> int:
    if outcome.status == COMMITTED:
        print(f"restore point {outcome.detail} of {vm.name} committed")
        return 0
    if outcome.status == TIMED_OUT:
        problem = f"still not committed after {timeout:g} s; the sync goes on: see hamal status"
    else:
        run = f"run {outcome.run_id}" if outcome.run_id else "the sync, before a run started,"
        problem = f"{run} failed: {outcome.detail}"
    print(f"hamal sync: {vm.name}: {one_line(problem)}", file=sys.stderr)
    return 1


def _free_bytes(settings: Settings) -> Callable[[], int | None]:
    def free() -> int | None:
        try:
            return open_target(settings, create=False).free_bytes()
        except (OSError, TargetError):
            return None

    return free


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    with redis_errors(settings):
        state = State(open_redis(settings))
        _print_status(state, float(settings.period.interval), _free_bytes(settings))
    return 0


def _condition(
    vm: dict[str, str],
    last: dict[str, object],
    interval: float,
    now: float,
    free_bytes: Callable[[], int | None],
) -> str:
    """What the VM is doing or waiting for, in the scan's own terms (hamal_workers/backoff.py)."""
    if vm.get("active_run"):
        return "syncing"
    waiting = backoff(vm, interval, now, free_bytes)
    if waiting is not None:
        next_try = time.strftime("%H:%M:%SZ", time.gmtime(waiting.until))
        return f"{waiting.reason} (next try by {next_try})"
    if vm.get("requested"):
        return "sync requested"
    if last.get("status") == COMMITTED:
        return "ok"
    return "due" if last else "never synced"


def _print_status(state: State, interval: float, free_bytes: Callable[[], int | None]) -> None:
    console = Console()
    running = Table(title="Running syncs")
    for col in ("VM", "run", "status", "disk", "disk state", "progress", "attempts", "worker"):
        running.add_column(col)
    for run_id in state.active_runs():
        run = state.run(run_id)
        disks = state.run_disks(run_id) or ["-"]
        for disk in disks:
            fields = state.disk(run_id, disk).fields if disk != "-" else {}
            prog = disk_progress(fields)
            running.add_row(
                run.get("vm_name", ""),
                run_id,
                run.get("status", ""),
                disk,
                prog["state"],
                f"{prog['percent']:.1f}%",
                fields.get("attempts", ""),
                fields.get("worker", ""),
            )
    console.print(running)
    last = Table(title="VMs")
    for col in ("VM", "state", "last run", "status", "finished", "error or notes"):
        last.add_column(col)
    now = time.time()
    for vm_id in state.vm_ids():
        vm = state.vm(vm_id)
        history = state.history(vm_id, 1)
        if state.requested(vm_id):
            vm["requested"] = "1"
        condition = _condition(vm, history[0] if history else {}, interval, now, free_bytes)
        if not history:
            last.add_row(vm.get("name", vm_id), condition, "-", "never synced", "", "")
            continue
        h = history[0]
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("finished", 0)))
        notes = [
            str(d.get("notes"))
            for d in h.get("disks", {}).values()
            if isinstance(d, dict) and d.get("notes")
        ]
        notes += [f"not synced: {why}" for why in h.get("skipped") or []]
        retention = _retention_note(h.get("retention"), vm.get("last_gc_freeing", ""))
        last.add_row(
            vm.get("name", vm_id),
            condition,
            h.get("run_id", ""),
            h.get("status", ""),
            finished + "Z",
            # Retention last: an error or a note about the sync itself matters more.
            str(h.get("error", "") or "; ".join(n for n in [*notes, retention] if n))[:200],
        )
    console.print(last)
    console.print(_gc_line(state.last_gc(), now))
    link = state.mass_link()
    if link.get("registered") or link.get("unreachable_since"):
        console.print(_mass_line(state, link, now))


def _mass_line(state: State, link: dict[str, str], now: float) -> str:
    """Mass mode: whether Mass answers, since when not, and what waits for it."""
    tasks, waiting = state.mass_task_count(), state.mass_reports_waiting()
    since = float(link.get("unreachable_since") or 0)
    if since:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        return (
            f"Mass: UNREACHABLE since {stamp} ({now - since:.0f} s; "
            f"{link.get('last_error', '')[:160]}); protecting {tasks} verified tasks; "
            f"{waiting} status reports waiting"
        )
    contact = float(link.get("last_contact") or 0)
    ago = f"{now - contact:.0f} s ago" if contact else "not yet"
    return f"Mass: last answered {ago}; {tasks} verified tasks; {waiting} status reports waiting"


def _retention_note(retention: object, gc_freeing: str) -> str:
    """What the last commit's retention did (points deleted and kept, or why it did nothing),
    and what garbage collection last freed of the chunks only its deleted points used."""
    if not isinstance(retention, dict):
        return ""
    if retention.get("error"):
        return f"retention error: {retention['error']}"[:80]
    deleted = retention.get("deleted") or []
    cell = f"retention: {len(deleted)} deleted, {retention.get('kept', 0)} kept"
    if gc_freeing:
        freeing = json.loads(gc_freeing)
        cell += f"; gc round {freeing['round']} frees {human_size(int(freeing['bytes']))}"
    return cell


def _gc_line(report: dict[str, Any], now: float) -> str:
    """The last garbage collection pass, for the operator: when, what it freed, what waits."""
    if not report:
        return "Garbage collection: no pass yet"
    ago = now - float(report.get("started") or now)
    when = f"{ago / 60:.0f} min ago" if ago >= 60 else f"{ago:.0f} s ago"
    if report.get("refused"):
        return f"Garbage collection ({when}): DELETED NOTHING: {report['refused']}"
    return (
        f"Garbage collection ({when}, round {report.get('gc_round')}): freed "
        f"{human_size(int(report.get('bytes_freed') or 0))} ({report.get('dropped', 0)} chunks), "
        f"{report.get('condemned', 0)} condemned and {report.get('waiting', 0)} waiting "
        f"for the next pass, {report.get('marked', 0)} chunks in use"
    )
