"""Garbage collection: delete chunks no restore point uses, while syncs go on (docs/GC.md).

One pass, written against the Target interface and the State in Redis:

    round P = the newest published round (the store's record; never below Redis' copy)
    acks    = every running disk's checkpoint: the round its entries cover, and the entries
    mark    = names in those checkpoints, then in staged manifests, then in committed ones
    sweep   over the chunk listing:
              a condemned copy that is marked          -> revived (a late reference)
              a condemned copy of round <= min(acks,P) -> dropped: the space comes back
              a chunk that is not marked, and older
                than the grace for in-flight writes    -> condemned in round P+1
    publish round P+1: in the store's record, then in Redis for the disk syncs to see

Condemning is a rename out of reach of has_chunk and put_chunk, so a sync that looks
after it stores the chunk again instead of reusing it; only a decision made before
the rename can still name a condemned chunk, and such a decision is counted in the
sync's checkpoint until its entry is there (engine/reuse_fence.py). A round's copies
are dropped only when every running disk acknowledges that round, and after a mark
that read those checkpoints: nothing a sync stored or chose before it commits is lost.
Syncs never wait; a long sync holds nothing back, since its checkpoints move its acks
forward every few seconds. Space comes back two passes after a point is deleted.

A pass that meets a manifest it cannot read deletes nothing: chunks are never
dropped on the word of a damaged index.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice

import numpy as np

from hamal_workers import faults
from hamal_workers.logs import LogSettings, vm_logger
from hamal_workers.state import State
from hamal_workers.targets.base import DIGEST_SIZE, StoredChunk, Target, TargetError

log = logging.getLogger("hamal.gc")

# Names are compared by their first 8 bytes: a shared prefix can only keep a chunk that
# could have gone (at 2.6 million chunks, about one pass in 10^7 keeps one chunk).
_PREFIX = np.dtype(">u8")
_CHECKPOINT_RECORD = np.dtype([("index", ">u4"), ("prefix", ">u8"), ("rest", "V24")])
# Pending prefixes are merged into the sorted set past this many: bounds memory.
_MERGE_AT = 2_000_000
SWEEP_BATCH = 8192


class MarkSet:
    """The chunk names something references, as sorted unique 8-byte prefixes."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._pending: list[np.ndarray] = []
        self._pending_count = 0

    def __len__(self) -> int:
        self._merge()
        return int(self._sorted.size)

    def add_digests(self, digests: bytes | memoryview) -> None:
        """Entries as a manifest stores them: count x 32 bytes (all-zero ones are holes)."""
        if len(digests) % DIGEST_SIZE:
            raise ValueError(f"{len(digests)} bytes is not a whole number of digests")
        prefixes = np.frombuffer(digests, dtype=_PREFIX)[:: DIGEST_SIZE // 8]
        self._add(prefixes)

    def add_checkpoint_entries(self, records: bytes) -> None:
        """Entries as a checkpoint stores them: (u32 index, 32-byte name) records."""
        self._add(np.frombuffer(records, dtype=_CHECKPOINT_RECORD)["prefix"])

    def _add(self, prefixes: np.ndarray) -> None:
        if prefixes.size == 0:
            return
        self._pending.append(sorted_unique(prefixes.astype(np.uint64)))
        self._pending_count += prefixes.size
        if self._pending_count >= _MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            self._sorted = sorted_unique(np.concatenate([self._sorted, *self._pending]))
            self._pending, self._pending_count = [], 0

    def contains(self, names: list[bytes]) -> np.ndarray:
        """For each name, whether it is marked."""
        if not names:
            return np.zeros(0, dtype=bool)
        return self.contains_prefixes(prefixes_of(names))

    def contains_prefixes(self, query: np.ndarray) -> np.ndarray:
        self._merge()
        if self._sorted.size == 0:
            return np.zeros(query.size, dtype=bool)
        at = np.minimum(np.searchsorted(self._sorted, query), self._sorted.size - 1)
        return np.asarray(self._sorted[at] == query)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted: a sort and a neighbour compare.

    Not np.unique, which since numpy 2.3 builds a hash set of every value: ten times
    the time and about 70 bytes per chunk name at a store's size (bench/gc.py).
    """
    ordered = np.sort(values)
    if ordered.size < 2:
        return ordered
    keep = np.empty(ordered.size, dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


class DeletedOwners:
    """Which VM's deleted point named a chunk that nothing else names (for the reports)."""

    def __init__(self, marks: MarkSet) -> None:
        self._marks = marks
        self._vms: list[str] = []
        self._parts: list[tuple[np.ndarray, int]] = []
        self._prefixes: np.ndarray | None = None
        self._owner = np.empty(0, dtype=np.int64)

    def add(self, vm_id: str, digests: bytes | memoryview) -> None:
        prefixes = np.frombuffer(digests, dtype=_PREFIX)[:: DIGEST_SIZE // 8].astype(np.uint64)
        unused = prefixes[~self._marks.contains_prefixes(prefixes)]
        if unused.size:
            if vm_id not in self._vms:
                self._vms.append(vm_id)
            self._parts.append((unused, self._vms.index(vm_id)))
            self._prefixes = None  # sorted again at the next lookup

    def owner(self, name: bytes) -> str | None:
        if not self._parts:
            return None
        if self._prefixes is None:
            prefixes = np.concatenate([p for p, _ in self._parts])
            owner = np.concatenate([np.full(p.size, vm) for p, vm in self._parts])
            order = np.argsort(prefixes, kind="stable")
            self._prefixes, self._owner = prefixes[order], owner[order]
        prefix = np.uint64(int.from_bytes(name[:8], "big"))
        at = int(np.searchsorted(self._prefixes, prefix))
        if at < self._prefixes.size and self._prefixes[at] == prefix:
            return self._vms[int(self._owner[at])]
        return None


def prefixes_of(names: list[bytes]) -> np.ndarray:
    joined = b"".join(names)
    return np.frombuffer(joined, dtype=_PREFIX)[:: DIGEST_SIZE // 8].astype(np.uint64)


@dataclass
class GcReport:
    gc_round: int = 0  # the round this pass condemned in and published
    dropped_round: int = 0  # condemned copies of this round and older could be dropped
    started: float = 0.0
    seconds: float = 0.0
    dry_run: bool = False
    running_disks: int = 0
    marked: int = 0  # distinct chunk names referenced
    chunks_seen: int = 0
    condemned: int = 0
    condemned_bytes: int = 0  # what the condemned chunks take: freed by the next pass
    revived: int = 0
    dropped: int = 0
    bytes_freed: int = 0
    waiting: int = 0  # condemned copies kept until every running disk acknowledges them
    # VM id -> bytes condemned this pass that only that VM's deleted points named: what its
    # retention frees at the next pass.
    freeing_by_vm: dict[str, int] = field(default_factory=dict)
    deleted_points: int = 0  # deleted points whose manifests this pass read (then purged)
    refused: str = ""  # why this pass deleted nothing, when it did not
    steps: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        if self.refused:
            return f"deleted nothing: {self.refused}"
        verb = "would free" if self.dry_run else "freed"
        return (
            f"round {self.gc_round}: {verb} {self.bytes_freed / 2**20:.1f} MiB "
            f"({self.dropped} chunks), "
            f"condemned {self.condemned}, revived {self.revived}, {self.waiting} waiting, "
            f"{self.marked} chunks in use, {self.running_disks} disks syncing, "
            f"{self.seconds:.1f} s"
        )


def collect(
    target: Target,
    state: State,
    *,
    young_s: float,
    dry_run: bool = False,
    between: Callable[[str], None] = lambda step: None,
    before_change: Callable[[], None] = lambda: None,
) -> GcReport:
    """One garbage collection pass (see the module docstring).

    `between(step)` runs after each step (tests interleave there); `before_change` before
    each rename or deletion, so a collector that lost its lease stops before the next.

    young_s: chunks written more recently than this are never condemned, even when
    nothing names them yet -- a sync's newest entries reach its checkpoint only at its
    next flush. (They would be revived; the grace spares the rename and a second put.)
    """
    report = GcReport(started=time.time(), dry_run=dry_run)
    clock = _Steps(report)
    record = target.gc_record()
    published = max(_int(record.get("round")), state.gc_round())
    if not dry_run:
        # A flushed Redis reads 0 until told again; syncs only ever move forward from it.
        state.set_gc_round(published)
    condemning = published + 1
    running = state.running_checkpoints()
    report.running_disks = len(running)
    report.dropped_round = min([published, *(c.gc_ack for c in running)])
    marks = MarkSet()
    for checkpoint in running:
        marks.add_checkpoint_entries(checkpoint.entries)
    clock.step("checkpoints")
    between("checkpoints")
    # Checkpoints, then staging, then points: the order a reference moves in, so one
    # that moves while the pass reads is met again further on.
    try:
        for staged in (True, False):
            for manifest in target.iter_manifests(staged=staged):
                marks.add_digests(manifest.digests)
            clock.step("staging" if staged else "points")
            between("staging" if staged else "points")
    except TargetError as exc:
        report.refused = f"a manifest cannot be read ({exc}); run hamal verify"
        report.seconds = time.time() - report.started
        log.error("garbage collection %s", report.summary())
        return report
    report.marked = len(marks)
    # After the mark: only names nothing else uses are kept as a deleted point's.
    owners = DeletedOwners(marks)
    deleted = set()
    for manifest in target.iter_deleted_manifests():
        owners.add(manifest.vm_id, manifest.digests)
        deleted.add((manifest.vm_id, manifest.point_id))
    report.deleted_points = len(deleted)
    sweep = _Sweep(target, report, condemning, time.time() - young_s, before_change, owners)
    highest = published
    for batch in _batches(target.iter_chunks(), SWEEP_BATCH):
        in_use = marks.contains([chunk.name for chunk in batch])
        for chunk, used in zip(batch, in_use, strict=True):
            report.chunks_seen += 1
            highest = max(highest, chunk.condemned)
            sweep.one(chunk, bool(used))
        between("sweep")
    clock.step("sweep")
    # Rounds never go back, even if the store's record was lost: copies left by any
    # earlier round are all made by now (one collector at a time).
    report.gc_round = max(condemning, highest)
    if not dry_run:
        # No barrier before publishing: a condemn or a drop that a crash undoes only
        # brings a copy back (docs/GC.md); revive_chunk makes its own name durable.
        target.save_gc_record({"round": report.gc_round, "last": _short(report)})
        state.set_gc_round(report.gc_round)
        for vm_id, point_id in sorted(deleted):
            target.purge_deleted(vm_id, point_id)
    report.seconds = time.time() - report.started
    return report


@dataclass
class _Sweep:
    """What the sweep does with each entry of the listing (see the module docstring)."""

    target: Target
    report: GcReport
    condemning: int
    written_before: float
    before_change: Callable[[], None]
    owners: DeletedOwners

    def one(self, chunk: StoredChunk, used: bool) -> None:
        if chunk.condemned:
            self._condemned_copy(chunk, used)
        elif not used and chunk.modified() < self.written_before:
            self._unnamed_chunk(chunk)

    def _condemned_copy(self, chunk: StoredChunk, used: bool) -> None:
        report, target = self.report, self.target
        if used:
            report.revived += 1
            if not report.dry_run:
                self.before_change()
                target.revive_chunk(chunk.name, chunk.condemned)
        elif chunk.condemned <= report.dropped_round:
            report.dropped += 1
            if report.dry_run:
                report.bytes_freed += target.stored_size(chunk.name) or 0
            else:
                self.before_change()
                report.bytes_freed += target.drop_condemned(chunk.name, chunk.condemned)
                faults.point("mid-gc-drop")
        else:
            report.waiting += 1

    def _unnamed_chunk(self, chunk: StoredChunk) -> None:
        report, target = self.report, self.target
        if report.dry_run:
            size = target.stored_size(chunk.name) or 0
        else:
            self.before_change()
            size = target.condemn_chunk(chunk.name, self.condemning)
            if not size:
                return
            faults.point("mid-gc-condemn")
        report.condemned += 1
        report.condemned_bytes += size
        owner = self.owners.owner(chunk.name)
        if owner is not None:
            report.freeing_by_vm[owner] = report.freeing_by_vm.get(owner, 0) + size


def unreferenced_bytes(
    target: Target, state: State, doomed: set[tuple[str, str]]
) -> tuple[int, int]:
    """(bytes, chunks) that deleting the `doomed` (vm_id, point_id) points would free.

    Chunks the doomed points name and nothing else does: no other point, staged disk or
    running checkpoint. What `hamal prune --dry-run` reports.
    """
    kept, gone = MarkSet(), MarkSet()
    names: dict[int, bytes] = {}
    for checkpoint in state.running_checkpoints():
        kept.add_checkpoint_entries(checkpoint.entries)
    for staged in (True, False):
        for manifest in target.iter_manifests(staged=staged):
            if not staged and (manifest.vm_id, manifest.point_id) in doomed:
                gone.add_digests(manifest.digests)
                _remember(names, manifest.digests)
            else:
                kept.add_digests(manifest.digests)
    candidates = [name for name in names.values() if name != bytes(DIGEST_SIZE)]
    freed = [n for n, used in zip(candidates, kept.contains(candidates), strict=True) if not used]
    return sum(target.stored_size(n) or 0 for n in freed), len(freed)


def _remember(names: dict[int, bytes], digests: bytes | memoryview) -> None:
    raw = bytes(digests)
    for at in range(0, len(raw), DIGEST_SIZE):
        name = raw[at : at + DIGEST_SIZE]
        names.setdefault(int.from_bytes(name[:8], "big"), name)


class _Steps:
    def __init__(self, report: GcReport) -> None:
        self.report = report
        self.last = time.monotonic()

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.report.steps[name] = round(now - self.last, 3)
        self.last = now


def _batches(items: Iterable[StoredChunk], size: int) -> Iterator[list[StoredChunk]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _short(report: GcReport) -> dict[str, object]:
    keep = ("gc_round", "started", "seconds", "dropped", "bytes_freed", "condemned", "revived")
    return {k: v for k, v in report.as_dict().items() if k in keep}


# --- one collector at a time -----------------------------------------------------------

# With nothing deleted and nothing condemned, a pass still runs this often: it finds what
# failed runs left (chunks no manifest names).
IDLE_PASS_EVERY_S = 3600.0


# A chunk nothing names yet is left alone for this many checkpoint periods, and at least
# YOUNG_GRACE_MIN_S: a sync names what it stored at its next checkpoint, so an unnamed
# chunk older than that is garbage (a deleted point's, a failed run's). Condemning one
# too early is safe -- the next pass revives it -- only wasteful.
YOUNG_GRACE_PERIODS = 4
YOUNG_GRACE_MIN_S = 10.0


def young_grace(checkpoint_period_s: float) -> float:
    return max(YOUNG_GRACE_MIN_S, YOUNG_GRACE_PERIODS * checkpoint_period_s)


def pass_due(state: State, now: float | None = None) -> bool:
    """Whether the scan should send a pass: points were deleted, copies wait, or an hour went."""
    now = time.time() if now is None else now
    last = state.last_gc()
    if not last or last.get("refused"):
        return True
    if state.gc_is_due() or int(last.get("condemned") or 0) or int(last.get("waiting") or 0):
        return True
    return now - float(last.get("started") or 0) >= IDLE_PASS_EVERY_S


def collect_exclusively(
    target: Target, state: State, lease_ttl_s: float, young_s: float, *, dry_run: bool = False
) -> GcReport | None:
    """A pass under the collector's lease; None when another collector holds it."""
    from hamal_workers.state import LeaseKeeper

    lease = state.gc_lease(lease_ttl_s)
    if not lease.acquire():
        return None
    try:
        with LeaseKeeper(lease) as keeper:
            if not dry_run:
                state.take_gc_due()
            report = collect(
                target,
                state,
                young_s=young_s,
                dry_run=dry_run,
                # A collector that lost its lease stops before its next change.
                between=lambda step: keeper.check(),
                before_change=keeper.check,
            )
    finally:
        lease.release()
    if not dry_run:
        state.record_gc(report.as_dict())
        state.publish({"event": "gc", **report.as_dict()})
        (log.error if report.refused else log.info)("garbage collection %s", report.summary())
    return report


def tell_vms(state: State, settings: LogSettings, report: GcReport) -> None:
    """Each VM whose deleted points' chunks the pass condemned: in its log and its status."""
    for vm_id, size in sorted(report.freeing_by_vm.items()):
        name = state.vm(vm_id).get("name") or vm_id
        vm_logger(settings, name, vm_id).info(
            "garbage collection round %d: %.1f MiB of chunks only its deleted restore points "
            "used are condemned, and freed at the next pass",
            report.gc_round,
            size / 2**20,
        )
        record = {"bytes": size, "round": report.gc_round, "time": report.started}
        state.set_vm_fields(vm_id, last_gc_freeing=json.dumps(record))
