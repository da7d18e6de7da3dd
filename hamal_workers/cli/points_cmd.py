"""`hamal points`, `hamal restore`, `hamal verify`: list, restore and check restore points.

Every command reads the target named in hamal.conf and never creates one: a wrong path
is an error, not a new empty store. A failure is one line on stderr and exit status 1
(`verify --repair`, not available yet, exits 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hamal_workers.cli.common import (
    CommandError,
    add_config_option,
    guarded,
    load_settings,
    open_redis,
    redis_errors,
)
from hamal_workers.config import Settings
from hamal_workers.point_metadata import load_local
from hamal_workers.state import State
from hamal_workers.targets import open_target
from hamal_workers.targets.base import PointInfo, PointScan, Target, TargetError
from hamal_workers.targets.restore import (
    ChunkUse,
    DamagedChunk,
    ReadContent,
    find_damaged_chunks,
    repair_chunks,
    restore_disk,
)

# A chunk shared by many entries would otherwise print a page of indexes per disk.
_MAX_INDEXES_SHOWN = 20


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("points", help="list restore points")
    add_config_option(p)
    p.add_argument("--vm", metavar="NAME", help="only this VM (its name or id)")
    p.add_argument(
        "--json", action="store_true", help="every point with its record (disks, tokens, meta)"
    )
    p.set_defaults(func=guarded("points", cmd_points))

    p = subparsers.add_parser("restore", help="restore one disk of a restore point to a file")
    add_config_option(p)
    p.add_argument("--vm", metavar="NAME", required=True, help="the VM (its name or id)")
    p.add_argument("--disk", required=True, help="the disk to restore")
    p.add_argument("--point", metavar="ID", default="latest", help="point id, or latest")
    p.add_argument("--to", metavar="FILE", required=True, help="the image file to write")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=guarded("restore", cmd_restore))

    p = subparsers.add_parser("verify", help="re-read and re-hash every chunk of restore points")
    add_config_option(p)
    p.add_argument("--vm", metavar="NAME", help="only this VM (its name or id); default: all")
    p.add_argument("--point", metavar="ID", help="only this point (or latest); needs --vm")
    p.add_argument(
        "--repair",
        action="store_true",
        help="store damaged chunks again from a fresh snapshot of the source VM",
    )
    p.set_defaults(func=guarded("verify", cmd_verify))


def _open(args: argparse.Namespace) -> Target:
    return open_target(load_settings(args), create=False)


# --- the commands ---------------------------------------------------------------------


def cmd_points(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    target = open_target(settings, create=False)
    scan = target.scan_points()
    if args.json:
        # One VM's listing also reads each point's metadata: a read per point, bounded.
        metadata = _metadata_reader(settings, target) if args.vm else None
        return points_json(scan, args.vm, _kept_because(settings, scan), metadata)
    # A raw replica holds only its newest generation: its older points are listed as such.
    unheld = {(p.vm_id, p.point_id): target.why_unrestorable(p) for p in scan.points}
    return list_points(scan, args.vm, _kept_because(settings, scan), unheld)


def _kept_because(settings: Settings, scan: PointScan) -> dict[tuple[str, str], str]:
    """(vm_id, point_id) -> why [retention] keeps the point, or that it will not."""
    from hamal_workers.prune import base_reasons, plan_retention
    from hamal_workers.retention import RetentionPolicy

    try:
        with redis_errors(settings):
            protected = base_reasons(State(open_redis(settings)))
    except CommandError as exc:
        # Listing needs no Redis: only the bases of running syncs go unshown.
        print(f"hamal points: bases of running syncs not shown: {exc}", file=sys.stderr)
        protected = {}
    policy = RetentionPolicy.from_settings(settings.retention)
    return {
        (plan.vm_id, v.point_id): ", ".join(v.reasons) if v.keep else "expires (not kept)"
        for plan in plan_retention(scan, policy, protected)
        for v in plan.verdicts
    }


def cmd_restore(args: argparse.Namespace) -> int:
    return restore(_open(args), args.vm, args.disk, args.point, args.to, force=args.force)


def cmd_verify(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    target = open_target(settings, create=False)
    if not args.repair:
        return verify(target, args.vm, args.point)
    from hamal_workers.cli.repair import current_sources

    state = None
    if settings.mass.mass_endpoint:  # the sources are Mass tasks', found through Redis
        from hamal_workers.cli.common import open_redis, redis_errors
        from hamal_workers.state import State

        with redis_errors(settings):
            state = State(open_redis(settings))
    with current_sources(settings, target.chunk_size, state) as read_content:
        return verify(target, args.vm, args.point, read_content)


MetadataReader = Callable[[str, str], dict[str, object] | None]


def _metadata_reader(settings: Settings, target: Target) -> MetadataReader:
    """The record beside the point in the store, else the copy under hamal_lib_dir."""

    def read(vm_id: str, point_id: str) -> dict[str, object] | None:
        try:
            found = target.point_metadata(vm_id, point_id)
        except TargetError as exc:
            found = {"problem": str(exc)}
        if found is None:
            found = load_local(settings.default.hamal_lib_dir, vm_id, point_id)
        return found

    return read


def points_json(
    scan: PointScan,
    vm: str | None,
    kept_because: dict[tuple[str, str], str],
    metadata: MetadataReader | None = None,
) -> int:
    """The points as JSON on stdout (their whole records), for scripts and other tools.

    With `metadata`, each point also carries its metadata record (None when it has none).
    """
    points, broken = scan.points, scan.broken
    if vm is not None:
        vm_id = resolve_vm(scan, vm)
        points = [p for p in points if p.vm_id == vm_id]
        broken = [b for b in broken if b.vm_id == vm_id]
    shown = {
        "points": [
            {
                "vm_id": p.vm_id,
                "vm_name": p.vm_name,
                "point_id": p.point_id,
                "created": p.created,
                "disks": p.disks,
                "meta": p.meta,
                "kept": kept_because.get((p.vm_id, p.point_id), ""),
                **({"metadata": metadata(p.vm_id, p.point_id)} if metadata else {}),
            }
            for p in points
        ],
        "broken": [
            {"vm_id": b.vm_id, "point_id": b.point_id, "problem": b.problem} for b in broken
        ],  # fmt: skip
    }
    print(json.dumps(shown, indent=2, sort_keys=True))
    return 1 if broken else 0


def list_points(
    scan: PointScan,
    vm: str | None,
    kept_because: dict[tuple[str, str], str] | None = None,
    unheld: dict[tuple[str, str], str] | None = None,
) -> int:
    """Print the points as a table; broken points go to stderr and make the status 1.

    unheld: why the target no longer holds a point's data (Target.why_unrestorable).
    """
    points, broken = scan.points, scan.broken
    if vm is not None:
        vm_id = resolve_vm(scan, vm)
        points = [p for p in points if p.vm_id == vm_id]
        broken = [b for b in broken if b.vm_id == vm_id]
    if points:
        _stdout().print(_points_table(points, kept_because or {}, unheld or {}))
    elif not broken:
        print("no restore points" + (f" of VM {vm}" if vm else ""))
    for b in broken:
        print(f"BROKEN VM {b.vm_id} point {b.point_id}: {b.problem}", file=sys.stderr)
    return 1 if broken else 0


def restore(target: Target, vm: str, disk: str, point: str, to: str, *, force: bool = False) -> int:
    scan = target.scan_points()
    info = resolve_point(scan, resolve_vm(scan, vm), point)
    if disk not in info.disks:
        raise CommandError(
            f"restore point {info.point_id} of VM {_vm_label(info)} has no disk {disk!r}; "
            f"its disks: {', '.join(sorted(info.disks)) or 'none'}"
        )
    with _progress_bar(disk, in_bytes=True) as report:
        result = restore_disk(target, info.vm_id, info.point_id, disk, to, report, overwrite=force)
    size = info.disks[disk]
    print(
        f"restored VM {_vm_label(info)} point {info.point_id} disk {disk} to {to}: "
        f"{human_size(size)}, {result.chunks} chunks + {result.zero_chunks} zero, "
        f"in {result.seconds:.1f}s ({human_size(int(size / max(result.seconds, 1e-6)))}/s)"
    )
    return 0


def verify(
    target: Target, vm: str | None, point: str | None, read_content: ReadContent | None = None
) -> int:
    """Check the points of one VM (or all); print each damaged chunk once with its users.

    Stdout: a BROKEN line per unreadable record or manifest, a DAMAGED block per chunk
    (the problem, then the points, disks and chunk indexes that use it), then OK or
    FAILED per point. A damaged chunk is moved aside, so the next sync that reads its
    data stores it again; with `read_content` (--repair) it is stored again at once from
    the current source where that still holds it. Status 1 when anything was wrong.
    """
    scan = target.scan_points()
    vm_id = resolve_vm(scan, vm) if vm is not None else None
    if point is not None and vm_id is None:
        raise CommandError("--point needs --vm")
    if point == "latest" and vm_id is not None:
        point = resolve_point(scan, vm_id, point).point_id
    with _progress_bar("verify", in_bytes=False) as report:
        check = find_damaged_chunks(target, vm_id, point, report)
    labels = {p.vm_id: _vm_label(p) for p in scan.points}
    for b in check.broken:
        print(f"BROKEN VM {labels.get(b.vm_id, b.vm_id)} point {b.point_id}: {b.problem}")
    for chunk in check.damaged:
        print(f"DAMAGED chunk {chunk.name.hex()}: {chunk.problem}")
        for line in _use_lines(chunk.uses, labels):
            print(f"  used by {line}")
        if target.quarantine_chunk(chunk.name, f"found damaged by verify: {chunk.problem}"):
            print("  moved aside: the next sync that reads its data stores it again")
    if read_content is not None and check.damaged:
        _repair(target, check.damaged, read_content)
    bad = check.bad_points()
    for info in check.points:
        state = "FAILED" if (info.vm_id, info.point_id) in bad else "OK"
        print(f"{state} VM {_vm_label(info)} point {info.point_id}")
    for info, why in check.unheld:
        # A raw replica's older generation: nothing to check, nothing wrong.
        print(f"NOT HELD VM {_vm_label(info)} point {info.point_id}: {why}")
    checked = len(check.points) + len({(b.vm_id, b.point_id) for b in check.broken})
    if bad:
        print(
            f"hamal verify: {len(bad)} of {checked} restore points have problems "
            f"({len(check.damaged)} damaged of {check.chunks} distinct chunks)",
            file=sys.stderr,
        )
        return 1
    if not checked and not check.unheld:
        print("no restore points" + (f" of VM {vm}" if vm else ""))
    return 0


def _repair(target: Target, damaged: list[DamagedChunk], read_content: ReadContent) -> None:
    result = repair_chunks(target, damaged, read_content)
    for name in result.repaired:
        print(f"REPAIRED chunk {name.hex()}: stored again from the current source")
    for name, why in result.unrepaired:
        print(f"NOT REPAIRED chunk {name.hex()}: {why}")


def _use_lines(uses: list[ChunkUse], labels: dict[str, str]) -> Iterator[str]:
    """One line per (VM, point, disk): the chunk indexes there that use the chunk."""
    grouped: dict[tuple[str, str, str], list[int]] = {}
    for use in uses:
        grouped.setdefault((use.vm_id, use.point_id, use.disk), []).append(use.index)
    for (vm_id, point_id, disk), indexes in grouped.items():
        shown = ", ".join(str(i) for i in indexes[:_MAX_INDEXES_SHOWN])
        more = len(indexes) - _MAX_INDEXES_SHOWN
        tail = f" and {more} more" if more > 0 else ""
        noun = "chunk" if len(indexes) == 1 else "chunks"
        yield f"VM {labels.get(vm_id, vm_id)} point {point_id} disk {disk} {noun} {shown}{tail}"


# --- finding VMs and points -----------------------------------------------------------


def resolve_vm(scan: PointScan, wanted: str) -> str:
    """The VM id that `wanted` names: an id as is, else a unique VM name."""
    ids = {p.vm_id for p in scan.points} | {b.vm_id for b in scan.broken}
    if wanted in ids:
        return wanted
    named = sorted({p.vm_id for p in scan.points if p.vm_name == wanted})
    if len(named) == 1:
        return named[0]
    if named:
        raise CommandError(
            f"VM name {wanted!r} is ambiguous: ids {', '.join(named)}; pass one of them to --vm"
        )
    known = sorted({_vm_label(p) for p in scan.points})
    hint = f"; VMs with points: {', '.join(known[:10])}" if known else ""
    raise CommandError(f"no restore point of a VM named or with id {wanted!r}{hint}")


def resolve_point(scan: PointScan, vm_id: str, point: str) -> PointInfo:
    """A readable point of the VM by id, or its newest readable one for "latest"."""
    points = [p for p in scan.points if p.vm_id == vm_id]
    if point == "latest":
        if not points:
            raise CommandError(f"VM {vm_id} has no readable restore point")
        return points[-1]
    for info in points:
        if info.point_id == point:
            return info
    for b in scan.broken:
        if b.vm_id == vm_id and b.point_id == point:
            raise CommandError(b.problem)
    newest = f"; newest: {points[-1].point_id}" if points else ""
    raise CommandError(f"VM {vm_id} has no restore point {point}{newest}")


# --- output ---------------------------------------------------------------------------


def _stdout() -> Console:
    console = Console()
    if not console.is_terminal:
        # Piped output is read by scripts: never wrap or cut a row.
        console.width = 240
    return console


def _points_table(
    points: list[PointInfo],
    kept_because: dict[tuple[str, str], str],
    unheld: dict[tuple[str, str], str],
) -> Table:
    table = Table()
    table.add_column("VM")
    table.add_column("point", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("disks")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("kept because")
    notes = {
        (p.vm_id, p.point_id): "; ".join(
            n for n in (_point_notes(p), unheld.get((p.vm_id, p.point_id), "")) if n
        )
        for p in points
    }
    if any(notes.values()):
        table.add_column("notes")
    for p in points:
        row = [
            _vm_label(p),
            p.point_id,
            datetime.fromtimestamp(p.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            ", ".join(sorted(p.disks)),
            human_size(sum(p.disks.values())),
            kept_because.get((p.vm_id, p.point_id), ""),
        ]
        if any(notes.values()):
            row.append(notes[(p.vm_id, p.point_id)])
        table.add_row(*row)
    return table


def _point_notes(info: PointInfo) -> str:
    """What the point's record says an operator restoring it should know."""
    notes = []
    if info.meta.get("consistency") == "disk":
        notes.append("disks snapshotted one by one")
    skipped = info.meta.get("skipped")
    if isinstance(skipped, list) and skipped:
        # The disks by name; why each was skipped is in `hamal status` and the VM's log.
        notes.append("not synced: " + ", ".join(str(s).split(":", 1)[0] for s in skipped))
    return "; ".join(notes)


@contextmanager
def _progress_bar(description: str, *, in_bytes: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress(done, total) callback drawing a bar on stderr when it is a terminal."""
    counter: ProgressColumn = (
        DownloadColumn(binary_units=True) if in_bytes else MofNCompleteColumn()
    )
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        counter,
    ]
    if in_bytes:
        columns.append(TransferSpeedColumn())
    columns.append(TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def _vm_label(info: PointInfo) -> str:
    return info.vm_id if info.vm_name in ("", info.vm_id) else f"{info.vm_name} ({info.vm_id})"


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
