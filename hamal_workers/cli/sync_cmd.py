"""`hamal sync` starts a sync now; `hamal status` shows running syncs and the last results."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from hamal_workers.cli.common import add_config_option, load_settings
from hamal_workers.config import Settings
from hamal_workers.platforms import enabled_platforms, open_platform
from hamal_workers.platforms.base import PlatformError, VmRef
from hamal_workers.state import COMMITTED, FAILED, State
from hamal_workers.tasks.progress import disk_progress

FINISHED = (COMMITTED, FAILED)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sync", help="start a sync of one VM now")
    add_config_option(p)
    p.add_argument("--vm", required=True, help="VM name or id")
    p.add_argument("--wait", action="store_true", help="wait until the restore point is committed")
    p.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits at most")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("status", help="running syncs with per-disk progress, last results")
    add_config_option(p)
    p.set_defaults(func=cmd_status)


def find_vm(settings: Settings, name: str) -> VmRef:
    matches: list[VmRef] = []
    for platform in enabled_platforms(settings):
        matches += [
            vm for vm in open_platform(platform, settings).discover() if name in (vm.name, vm.vm_id)
        ]
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


def cmd_sync(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    try:
        vm = find_vm(settings, args.vm)
    except PlatformError as exc:
        print(f"hamal sync: {exc}", file=sys.stderr)
        return 1
    app = _app_for(settings)
    state = State.from_url(settings.redis.url)
    before = state.vm(vm.vm_id).get("active_run", "")
    result = app.send_task(
        "hamal.vm.sync", kwargs={"vm_id": vm.vm_id, "platform": vm.platform}, queue="period"
    )
    print(f"sync of {vm.name} ({vm.vm_id}) sent as task {result.id}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    answer = result.get(timeout=args.timeout, propagate=False)
    if not isinstance(answer, dict):
        print(f"hamal sync: the sync task failed: {answer}", file=sys.stderr)
        return 1
    run_id = answer.get("run_id") or before
    if not run_id:
        print(f"hamal sync: no run started: {answer}", file=sys.stderr)
        return 1
    run: dict[str, str] = {}
    while time.monotonic() < deadline:
        run = state.run(run_id)
        if run.get("status") in FINISHED:
            break
        time.sleep(0.5)
    status = run.get("status", "unknown")
    if status == COMMITTED:
        print(f"restore point {run_id} of {vm.name} committed")
        return 0
    print(f"run {run_id} of {vm.name}: {status} {run.get('error', '')}".rstrip(), file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    state = State.from_url(settings.redis.url)
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
    last = Table(title="Last result per VM")
    for col in ("VM", "last run", "status", "finished", "error"):
        last.add_column(col)
    for vm_id in state.vm_ids():
        vm = state.vm(vm_id)
        history = state.history(vm_id, 1)
        if not history:
            last.add_row(vm.get("name", vm_id), "-", "never synced", "", "")
            continue
        h = history[0]
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("finished", 0)))
        last.add_row(
            vm.get("name", vm_id),
            h.get("run_id", ""),
            h.get("status", ""),
            finished + "Z",
            str(h.get("error", ""))[:80],
        )
    console.print(last)
    return 0
