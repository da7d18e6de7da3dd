"""Plans against the real store and the local platform's snapshots and change journal.

Every point here is made the way a run makes it: a plan, the engine's sync of it, the
disk staged, the point committed with the snapshot's change token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hamal_workers.engine.extents import Extent, chunk_count, chunks_touched, from_runs, to_runs
from hamal_workers.engine.pipeline import EngineSettings, sync_disk
from hamal_workers.engine.plan import (
    ALLOCATED,
    BASE_CANDIDATES,
    CHANGED,
    DiskPlan,
    find_base,
    new_plan,
    resume_plan,
)
from hamal_workers.platforms.base import DiskSource
from hamal_workers.platforms.local import ChangeJournal, LocalPlatform
from hamal_workers.simulators.local_vms import write_at
from hamal_workers.targets.base import DiskManifest
from hamal_workers.targets.chunkstore import ChunkStore

CS = 64 * 1024
DISK = "d.raw"


class Lab:
    """One VM with one tracked disk, a local platform and a chunk store."""

    def __init__(self, root: Path, chunks: float = 8, *, track: bool = True) -> None:
        self.image = root / "inv" / "vm" / DISK
        self.image.parent.mkdir(parents=True)
        with self.image.open("wb") as fh:
            fh.truncate(int(chunks * CS))
        if track:
            ChangeJournal(self.image).reset()
        self.platform = LocalPlatform(str(root / "inv"), str(root / "lib"))
        (self.vm,) = self.platform.discover()
        self.store = ChunkStore(root / "store", chunk_size=CS)
        self.snapshots = 0

    @property
    def vm_id(self) -> str:
        return self.vm.vm_id

    def write(self, offset: int, data: bytes) -> None:
        write_at(self.image, offset, data)

    def resize(self, size: int) -> None:
        os.truncate(self.image, size)

    def source(self) -> DiskSource:
        self.snapshots += 1
        self.vm = self.platform.vm(self.vm.vm_id)
        snap = self.platform.create_snapshot(self.vm, f"hamal-20261125T{self.snapshots:06d}Z-a")
        return self.platform.open_disk(snap, DISK)

    def commit(self, source: DiskSource, plan: DiskPlan, point_id: str) -> DiskManifest:
        result = sync_disk(plan, source.open_reader, self.store, EngineSettings())
        self.store.stage_disk(self.vm_id, point_id, result.manifest)
        self.store.commit_point(
            self.vm_id, "vm", point_id, 1.0, [DISK], {"tokens": {DISK: source.token}}
        )
        return result.manifest

    def point(self, point_id: str) -> tuple[DiskSource, DiskManifest]:
        """Snapshot, plan, sync, commit: one run's point."""
        source = self.source()
        plan = new_plan(source, self.store, self.vm_id)
        return source, self.commit(source, plan, point_id)


def content(seed: int, length: int = 1000) -> bytes:
    return bytes((seed + i) % 251 + 1 for i in range(length))


def test_a_first_sync_reads_what_is_allocated_and_starts_from_zero(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(2 * CS + 10, content(1))
    lab.write(5 * CS - 1, content(2, 2))  # ends one byte into chunk 5
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    assert plan.mode == ALLOCATED
    assert plan.to_read == [2, 4, 5]
    assert plan.initial == [None] * 8
    assert (plan.disk, plan.size, plan.chunk_size) == (DISK, 8 * CS, CS)
    assert (plan.base_point, plan.base_token, plan.notes) == ("", "", [])


def test_an_incremental_reads_only_what_changed_over_the_base_entries(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    lab.write(6 * CS, content(2))
    base_source, base = lab.point("p1")
    lab.write(3 * CS + 5, content(3))
    lab.write(4 * CS - 2, content(4, 4))  # across the boundary of chunks 3 and 4
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    assert plan.mode == CHANGED
    assert plan.to_read == [3, 4]
    assert plan.initial == base.entries and base.entries[0] is not None
    assert (plan.base_point, plan.base_token) == ("p1", base_source.token)
    assert base_source.token and plan.notes == []


def test_a_replica_holding_another_point_is_read_in_full(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    lab.point("p1")
    lab.write(3 * CS, content(2))
    held = new_plan(lab.source(), lab.store, lab.vm_id, holds="p1")
    assert (held.mode, held.to_read) == (CHANGED, [3])
    for holds, says in (("p0", "restore point p0"), ("", "no restore point")):
        plan = new_plan(lab.source(), lab.store, lab.vm_id, holds=holds)
        assert (plan.mode, plan.to_read, plan.initial) == (ALLOCATED, [0, 3], [None] * 8)
        assert plan.notes == [f"the replica holds {says}, not p1: reading every allocated extent"]


def test_nothing_changed_reads_nothing(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    lab.point("p1")
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    assert (plan.mode, plan.to_read, plan.read_bytes_planned) == (CHANGED, [], 0)


@pytest.mark.parametrize(
    ("before", "after", "expected_reread"),
    [
        (3.5, 6, [3, 4, 5]),  # grown: the old short last chunk and everything new
        (4, 6, [4, 5]),  # grown from a whole number of chunks
        (6, 3.5, [3]),  # shrunk: the new short last chunk
        (6, 4, []),  # shrunk to a whole number of chunks: nothing to re-read
    ],
)
def test_a_resized_disk_rereads_from_its_old_or_new_end(
    tmp_path: Path, before: float, after: float, expected_reread: list[int]
) -> None:
    lab = Lab(tmp_path, chunks=before)
    lab.write(0, content(1))
    lab.write(CS, content(2))
    _, base = lab.point("p1")
    lab.resize(int(after * CS))
    lab.write(0, content(3))  # a change the journal reports
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    count = chunk_count(int(after * CS), CS)
    assert plan.mode == CHANGED
    assert plan.to_read == sorted({0, *expected_reread})
    assert len(plan.initial) == count
    kept = min(count, len(base.entries))
    assert plan.initial == base.entries[:kept] + [None] * (count - kept)


def test_a_base_without_a_token_is_named_but_everything_allocated_is_read(
    tmp_path: Path,
) -> None:
    lab = Lab(tmp_path, track=False)
    lab.write(CS, content(1))
    lab.point("p1")
    lab.write(3 * CS, content(2))
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    assert plan.mode == ALLOCATED
    assert plan.to_read == [1, 3]
    assert plan.initial == [None] * 8
    assert (plan.base_point, plan.base_token, plan.notes) == ("p1", "", [])


def test_a_token_the_platform_no_longer_knows_means_reading_everything(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(CS, content(1))
    base_source, _ = lab.point("p1")
    ChangeJournal(lab.image).reset()  # tracking restarted: the old token means nothing
    lab.write(3 * CS, content(2))
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    assert plan.mode == ALLOCATED
    assert plan.to_read == [1, 3]
    assert plan.initial == [None] * 8
    assert (plan.base_point, plan.base_token) == ("p1", base_source.token)
    assert (
        len(plan.notes) == 1
        and "cannot tell what changed since restore point p1" in (plan.notes[0])
    )


def test_a_damaged_newest_point_falls_back_to_the_one_before(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    source1, base = lab.point("p1")
    lab.write(CS, content(2))
    lab.point("p2")
    manifest_file = next((lab.store.root / "points").rglob("p2/*.manifest"))
    manifest_file.write_bytes(manifest_file.read_bytes()[:-1])
    found, notes = find_base(lab.store, lab.vm_id, DISK)
    assert found is not None
    assert (found.point_id, found.token, found.manifest) == ("p1", source1.token, base)
    assert len(notes) == 1 and "restore point p2 cannot be a base" in notes[0]
    plan = new_plan(lab.source(), lab.store, lab.vm_id)
    assert plan.base_point == "p1" and plan.mode == CHANGED
    assert plan.to_read == [1]  # what changed since p1, not since p2
    assert plan.notes == [notes[0], "based on restore point p1 instead"]


def test_a_newer_point_without_the_disk_is_not_a_base(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    lab.point("p1")
    other = DiskManifest("other.raw", CS, CS, [None])
    lab.store.stage_disk(lab.vm_id, "p2", other)
    lab.store.commit_point(lab.vm_id, "vm", "p2", 2.0, ["other.raw"], {})
    found, notes = find_base(lab.store, lab.vm_id, DISK)
    assert found is not None and found.point_id == "p1" and notes == []


@pytest.mark.parametrize("newer", [BASE_CANDIDATES - 1, BASE_CANDIDATES])
def test_only_the_newest_points_are_tried_as_a_base(tmp_path: Path, newer: int) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    lab.point("p00")
    for n in range(1, newer + 1):  # newer points of another disk only
        lab.store.stage_disk(lab.vm_id, f"p{n:02d}", DiskManifest("other.raw", CS, CS, [None]))
        lab.store.commit_point(lab.vm_id, "vm", f"p{n:02d}", 2.0, ["other.raw"], {})
    found, _ = find_base(lab.store, lab.vm_id, DISK)
    if newer < BASE_CANDIDATES:
        assert found is not None and found.point_id == "p00"
    else:
        assert found is None
        plan = new_plan(lab.source(), lab.store, lab.vm_id)
        assert (plan.mode, plan.base_point, plan.to_read) == (ALLOCATED, "", [0])


def test_read_bytes_planned_counts_the_short_last_chunk_once(tmp_path: Path) -> None:
    plan = DiskPlan(DISK, 3 * CS + 100, CS, ALLOCATED, [0, 3], [None] * 4)
    assert plan.read_bytes_planned == CS + 100
    plan = DiskPlan(DISK, 3 * CS + 100, CS, ALLOCATED, [1, 2], [None] * 4)
    assert plan.read_bytes_planned == 2 * CS
    plan = DiskPlan(DISK, 4 * CS, CS, ALLOCATED, [0, 3], [None] * 4)
    assert plan.read_bytes_planned == 2 * CS


def test_a_saved_plan_is_rebuilt_exactly(tmp_path: Path) -> None:
    lab = Lab(tmp_path, chunks=7.5)
    lab.write(0, content(1))
    lab.write(5 * CS, content(2))
    first = lab.source()
    allocated = new_plan(first, lab.store, lab.vm_id)
    saved = allocated.to_fields()
    assert json.loads(json.dumps(saved)) == saved  # strings only: a Redis hash
    assert saved["total"] == "2" and saved["mode"] == ALLOCATED
    assert resume_plan(saved, first, lab.store, lab.vm_id) == (allocated, "")
    lab.commit(first, allocated, "p1")
    lab.write(2 * CS, content(3))
    lab.write(7 * CS, content(4, 10))
    source = lab.source()
    changed = new_plan(source, lab.store, lab.vm_id)
    assert changed.mode == CHANGED and changed.to_read == [2, 7]
    rebuilt, why = resume_plan(changed.to_fields(), source, lab.store, lab.vm_id)
    assert why == "" and rebuilt == changed


def test_resume_refuses_what_it_cannot_rebuild(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(0, content(1))
    first = lab.source()
    lab.commit(first, new_plan(first, lab.store, lab.vm_id), "p1")
    lab.write(CS, content(2))
    source = lab.source()
    good = new_plan(source, lab.store, lab.vm_id).to_fields()
    assert good["mode"] == CHANGED and good["base_point"] == "p1"

    def why(**changes: str | None) -> str:
        saved = {k: v for k, v in {**good, **changes}.items() if v is not None}
        plan, reason = resume_plan(saved, source, lab.store, lab.vm_id)
        assert plan is None
        return reason

    assert why(plan=None).startswith("its checkpoint is unreadable (KeyError")
    assert why(size="x").startswith("its checkpoint is unreadable (ValueError")
    assert why(plan="[[1]]").startswith("its checkpoint is unreadable (ValueError")
    assert why(plan="7").startswith("its checkpoint is unreadable (TypeError")
    assert why(size=str(9 * CS)) == "the disk or the store changed shape since it started"
    assert why(chunk_size=str(2 * CS)) == "the disk or the store changed shape since it started"
    assert why(mode="both") == "its checkpoint has an unknown plan ('both')"
    assert why(base_point="") == "its checkpoint has an unknown plan ('changed')"
    assert why(base_point="p0").startswith("its base, restore point p0, is no longer readable")
    lab.store.delete_point(lab.vm_id, "p1")
    assert why().startswith("its base, restore point p1, is no longer readable")


def test_an_allocated_plan_resumes_without_its_base(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write(CS, content(1))
    source = lab.source()
    plan = dataclasses.replace(
        new_plan(source, lab.store, lab.vm_id), base_point="gone", base_token="t:1"
    )
    assert resume_plan(plan.to_fields(), source, lab.store, lab.vm_id) == (plan, "")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 40 * CS),
    extents=st.lists(
        st.tuples(
            st.integers(0, 45 * CS),
            # Empty, one-byte and negative extents as often as long ones.
            st.one_of(st.integers(-2, 2), st.integers(3, 5 * CS)),
        ),
        max_size=8,
    ),
)
def test_chunks_touched_is_every_chunk_an_extent_overlaps(
    size: int, extents: list[tuple[int, int]]
) -> None:
    touched = chunks_touched([Extent(o, n) for o, n in extents], CS, size)
    count = chunk_count(size, CS)
    expected = {
        i
        for o, n in extents
        for i in range(count)
        if n > 0 and o < (i + 1) * CS and i * CS < o + n  # the byte ranges overlap
    }
    assert touched == sorted(expected)
    assert list(from_runs(to_runs(touched))) == touched
    runs = to_runs(touched)
    assert all(n > 0 for _, n in runs)
    # Maximal runs: two runs never touch, so none could be merged.
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:], strict=False))


def test_empty_extents_touch_nothing_and_one_byte_touches_its_chunk() -> None:
    assert chunks_touched([Extent(CS, 0), Extent(3 * CS - 1, 1)], CS, 8 * CS) == [2]
    assert chunks_touched([Extent(0, -1), Extent(5 * CS, 1)], CS, 8 * CS) == [5]
    assert chunks_touched([Extent(9 * CS, 1)], CS, 8 * CS) == []  # past the end
