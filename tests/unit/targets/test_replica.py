"""The raw replica target against real image files (and a loop device where there is one),
fed by the engine from the local platform's snapshots, as a disk task and finalize do."""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hamal_workers.config import ConfigError, load
from hamal_workers.engine.pipeline import EngineSettings, NoCheckpoint, sync_disk
from hamal_workers.engine.plan import ALLOCATED, CHANGED, DiskPlan, new_plan
from hamal_workers.platforms.base import VmRef, new_run_id, snapshot_name
from hamal_workers.platforms.local import ChangeJournal, LocalPlatform
from hamal_workers.simulators.local_vms import discard, scribble, write_at
from hamal_workers.state import LeaseLost
from hamal_workers.targets.base import TargetError
from hamal_workers.targets.replica import DiskFlagMismatch, ReplicaTarget, SupersededPoint
from hamal_workers.targets.restore import find_damaged_chunks, restore_disk

MiB = 1024 * 1024
CS = 4 * MiB
DISK = "disk0.raw"
SIZE = 10 * MiB  # two whole chunks and a half one


def make_vm(inventory: Path, name: str, seed: int) -> Path:
    """A VM of one tracked disk: random data in each chunk, a hole, zeros written."""
    rng = random.Random(seed)
    image = inventory / name / DISK
    image.parent.mkdir(parents=True)
    with image.open("wb") as fh:
        fh.truncate(SIZE)
    ChangeJournal(image).reset()
    write_at(image, 0, rng.randbytes(MiB))
    write_at(image, CS + 12345, rng.randbytes(300_000))
    write_at(image, 2 * CS, bytes(MiB))  # zeros, written: a zero entry, not data
    write_at(image, SIZE - 4096, rng.randbytes(4096))
    return image


def sync(
    target: ReplicaTarget,
    platform: LocalPlatform,
    vm: VmRef,
    *,
    check_lease: Callable[[], None] = lambda: None,
    commit: bool = True,
) -> tuple[str, DiskPlan]:
    """One run of the VM's disk: what hamal.disk.sync then hamal.vm.finalize do."""
    point_id = new_run_id()
    snapshot = platform.create_snapshot(vm, snapshot_name(point_id))
    try:
        with platform.open_disk(snapshot, DISK) as source:
            plan = new_plan(source, target, vm.vm_id)
            flag = f"{vm.vm_id}/{DISK}"
            writer = target.open_disk_writer(vm.vm_id, vm.name, point_id, DISK, source.size, flag)
            with writer:
                result = sync_disk(
                    plan,
                    source.open_reader,
                    target,
                    EngineSettings(checkpoint_every_s=0.0),
                    check_lease=check_lease,
                    disk_writer=writer,
                )
        target.stage_disk(vm.vm_id, point_id, result.manifest)
        if commit:
            meta: dict[str, object] = {"tokens": {DISK: snapshot.token(DISK)}}
            target.commit_point(vm.vm_id, vm.name, point_id, snapshot.created, [DISK], meta)
    finally:
        platform.delete_snapshot(snapshot)
    return point_id, plan


def digest(path: Path, size: int = SIZE) -> str:
    with path.open("rb") as fh:
        return hashlib.sha256(fh.read(size)).hexdigest()


def restored_equal(target: ReplicaTarget, vm: VmRef, point_id: str, image: Path) -> bool:
    out = image.parent.parent.parent / "restored.raw"
    restore_disk(target, vm.vm_id, point_id, DISK, out)
    try:
        return filecmp.cmp(image, out, shallow=False)
    finally:
        out.unlink()


@pytest.fixture
def rig(tmp_path: Path) -> tuple[LocalPlatform, Path]:
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    return LocalPlatform(str(inventory), str(tmp_path / "lib")), inventory


def test_full_then_incremental_in_place_restore_equal_and_older_refused(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    image = make_vm(inventory, "vm01", seed=1)
    (vm,) = platform.discover()
    target = ReplicaTarget(tmp_path / "replica")
    replica = Path(target.replica_path(vm.vm_id, vm.name, DISK))

    first, plan = sync(target, platform, vm)
    assert plan.mode == ALLOCATED
    assert filecmp.cmp(image, replica, shallow=False)
    assert restored_equal(target, vm, first, image)
    assert target.record(str(replica)).generation == 1  # type: ignore[union-attr]

    # The guest writes into one chunk and trims another whole: only those two are read,
    # and the trimmed one becomes a hole in the replica.
    rng = random.Random(2)
    write_at(image, 12345, rng.randbytes(2000))
    discard(image, CS, CS)
    second, plan = sync(target, platform, vm)
    assert plan.mode == CHANGED and plan.to_read == [0, 1]
    assert filecmp.cmp(image, replica, shallow=False)
    assert replica.stat().st_blocks * 512 < 2 * CS  # holes stay holes
    assert restored_equal(target, vm, second, image)

    points = target.points(vm.vm_id)
    assert [p.meta["replica"][DISK]["generation"] for p in points] == [1, 2]  # type: ignore[index]
    assert target.why_unrestorable(points[1]) == ""
    why = target.why_unrestorable(points[0])
    assert why == (
        f"disk {DISK}: overwritten in place (the replica holds generation 2 only; "
        "this point was generation 1)"
    )
    with pytest.raises(SupersededPoint, match="holds generation 2 only"):
        restore_disk(target, vm.vm_id, first, DISK, tmp_path / "old.raw")
    assert not (tmp_path / "old.raw").exists()

    # Verify reads every entry of the newest generation at its place; the older is not held.
    check = find_damaged_chunks(target, vm.vm_id)
    assert not check.damaged and not check.broken
    assert [p.point_id for p in check.points] == [second]
    assert [(p.point_id, bool(why)) for p, why in check.unheld] == [(first, True)]
    with replica.open("r+b") as fh:
        fh.seek(12345)
        fh.write(b"tampered")
    damaged = find_damaged_chunks(target, vm.vm_id).damaged
    assert [(d.uses[0].index, "does not hold what generation 2" in d.problem) for d in damaged] == [
        (0, True)
    ]
    with pytest.raises(TargetError, match="does not hold what generation 2 committed"):
        restore_disk(target, vm.vm_id, second, DISK, tmp_path / "bad.raw")


def test_a_failed_run_then_a_good_one_restores_equal_to_the_source(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    image = make_vm(inventory, "vm01", seed=3)
    (vm,) = platform.discover()
    target = ReplicaTarget(tmp_path / "replica")
    replica = Path(target.replica_path(vm.vm_id, vm.name, DISK))
    first, _ = sync(target, platform, vm)

    rng = random.Random(4)
    for chunk in range(3):
        write_at(image, chunk * CS + 100, rng.randbytes(5000))
    calls = 0

    def lease_lost_after_one_write() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise LeaseLost("test: the lease went after the first write")

    with pytest.raises(LeaseLost):
        sync(target, platform, vm, check_lease=lease_lost_after_one_write)
    # Part of the replica is new, part old: it is neither generation, and says so.
    assert not filecmp.cmp(image, replica, shallow=False)
    (info,) = target.points(vm.vm_id)
    assert "its replica is being written (run " in target.why_unrestorable(info)
    with pytest.raises(TargetError, match="is being written by run"):
        restore_disk(target, vm.vm_id, first, DISK, tmp_path / "mid.raw")

    scribble(image, rng, writes=2, max_len=64 * 1024)
    second, plan = sync(target, platform, vm)
    # Diffed from the committed generation's token: it covers what the failed run wrote.
    assert plan.mode == CHANGED and plan.base_point == first
    assert filecmp.cmp(image, replica, shallow=False)
    assert restored_equal(target, vm, second, image)


class SavedCheckpoint(NoCheckpoint):
    """The entries a disk task's checkpoint holds, as Redis would keep them between deliveries."""

    def __init__(self) -> None:
        self.entries: dict[int, bytes | None] = {}

    def load(self) -> dict[int, bytes | None]:
        return dict(self.entries)

    def save(
        self, new_entries: dict[int, bytes | None], done: int, total: int, gc_ack: int
    ) -> None:
        self.entries.update(new_entries)


def test_a_redelivered_disk_task_continues_from_its_checkpoint(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    image = make_vm(inventory, "vm01", seed=9)
    (vm,) = platform.discover()
    target = ReplicaTarget(tmp_path / "replica")
    replica = Path(target.replica_path(vm.vm_id, vm.name, DISK))
    point_id = new_run_id()
    snapshot = platform.create_snapshot(vm, snapshot_name(point_id))
    checkpoint = SavedCheckpoint()

    def crash() -> None:
        raise LeaseLost("test: the worker died right after its first checkpoint")

    def deliver(after_flush: Callable[[], None] | None) -> Any:
        with platform.open_disk(snapshot, DISK) as source:
            plan = new_plan(source, target, vm.vm_id)
            flag = f"{vm.vm_id}/{DISK}"
            with target.open_disk_writer(vm.vm_id, vm.name, point_id, DISK, SIZE, flag) as writer:
                settings = EngineSettings(readers=1, checkpoint_every_s=0.0)
                return sync_disk(
                    plan,
                    source.open_reader,
                    target,
                    settings,
                    checkpoint,
                    after_flush=after_flush,
                    disk_writer=writer,
                )

    with pytest.raises(LeaseLost):
        deliver(crash)
    assert len(checkpoint.entries) == 1
    result = deliver(None)
    assert (result.chunks_resumed, result.chunks_read) == (1, 2)
    target.stage_disk(vm.vm_id, point_id, result.manifest)
    target.commit_point(vm.vm_id, vm.name, point_id, snapshot.created, [DISK], {})
    platform.delete_snapshot(snapshot)
    assert filecmp.cmp(image, replica, shallow=False)
    assert restored_equal(target, vm, point_id, image)


def test_a_replica_whose_flag_names_another_disk_is_refused_and_untouched(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    make_vm(inventory, "vm01", seed=5)
    make_vm(inventory, "vm02", seed=6)
    vm01, vm02 = platform.discover()
    shared = tmp_path / "disks" / "shared.raw"
    shared.parent.mkdir()
    shared.touch()  # an existing image file: hamal creates none outside its directory
    first = ReplicaTarget(tmp_path / "replica", {("vm01", DISK): str(shared)})
    sync(first, platform, vm01)
    record = first._record_file(str(shared))
    before = (digest(shared), record.read_bytes(), shared.stat().st_mtime_ns)

    # The operator points vm02's disk at the same file, through a link.
    link = tmp_path / "disks" / "by-id"
    link.symlink_to(shared)
    wrong = ReplicaTarget(tmp_path / "replica", {(vm02.vm_id, DISK): str(link)})
    with pytest.raises(DiskFlagMismatch) as refused:
        sync(wrong, platform, vm02)
    message = str(refused.value)
    assert message.startswith(
        f"replica {shared} belongs to VM vm01 ({vm01.vm_id}) disk {DISK}, "
        f"not VM vm02 ({vm02.vm_id}) disk {DISK}: "
    )
    assert "nothing was written" in message
    assert (digest(shared), record.read_bytes(), shared.stat().st_mtime_ns) == before
    assert wrong.points(vm02.vm_id) == [] and wrong.staged_points() == []


def test_a_disk_given_another_replica_is_copied_whole_into_it(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    image = make_vm(inventory, "vm01", seed=10)
    (vm,) = platform.discover()
    first, _ = sync(ReplicaTarget(tmp_path / "replica"), platform, vm)
    write_at(image, CS + 1, b"new")
    device = tmp_path / "disks" / "vm01.raw"
    device.parent.mkdir()
    device.write_bytes(os.urandom(SIZE + MiB))  # whatever it held before
    moved = ReplicaTarget(tmp_path / "replica", {("vm01", DISK): str(device)})
    (info,) = moved.points(vm.vm_id)
    assert moved.why_unrestorable(info) == f"disk {DISK}: its replica is {device} now"
    # The new replica holds nothing of the last point: no diff from it, a whole copy.
    second, plan = sync(moved, platform, vm)
    assert plan.mode == ALLOCATED and plan.base_point == ""
    assert device.stat().st_size == SIZE and filecmp.cmp(image, device, shallow=False)
    assert restored_equal(moved, vm, second, image)
    with pytest.raises(SupersededPoint, match=f"its replica is {device} now"):
        restore_disk(moved, vm.vm_id, first, DISK, tmp_path / "old.raw")


def test_a_missing_device_and_planted_links_are_refused(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    make_vm(inventory, "vm01", seed=7)
    (vm,) = platform.discover()
    missing = tmp_path / "dev" / "sdz"
    target = ReplicaTarget(tmp_path / "replica", {("vm01", DISK): str(missing)})
    with pytest.raises(TargetError, match="does not exist: a block device or image file"):
        target.open_disk_writer(vm.vm_id, vm.name, new_run_id(), DISK, SIZE, None)
    assert not missing.exists()

    # A link planted where the VM's images go: nothing is written through it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = ReplicaTarget(tmp_path / "replica")
    (target.root / "images" / vm.vm_id).symlink_to(elsewhere)
    with pytest.raises(TargetError, match="is a symbolic link; refusing to write through it"):
        target.open_disk_writer(vm.vm_id, vm.name, new_run_id(), DISK, SIZE, None)
    (target.root / "images" / vm.vm_id).unlink()
    (target.root / "images" / vm.vm_id).mkdir()
    (target.root / "images" / vm.vm_id / (DISK + ".raw")).symlink_to(elsewhere / "x.raw")
    with pytest.raises(TargetError, match="is a symbolic link; refusing to write through it"):
        target.open_disk_writer(vm.vm_id, vm.name, new_run_id(), DISK, SIZE, None)
    assert list(elsewhere.iterdir()) == []


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    with backing.open("wb") as fh:
        fh.truncate(size)
    attached = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if attached.returncode != 0:
        pytest.skip(f"no loop device here: {attached.stderr.strip()}")
    device = Path(attached.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


def test_a_block_device_is_written_in_place_and_a_small_one_refused(
    tmp_path: Path, rig: tuple[LocalPlatform, Path]
) -> None:
    platform, inventory = rig
    image = make_vm(inventory, "vm01", seed=8)
    (vm,) = platform.discover()
    with loop_device(tmp_path / "small.img", 8 * MiB) as small:
        target = ReplicaTarget(tmp_path / "replica", {("vm01", DISK): str(small)})
        with pytest.raises(TargetError, match="smaller than the disk's"):
            sync(target, platform, vm)
        assert target.record(str(small)) is None
        assert digest(small, 8 * MiB) == hashlib.sha256(bytes(8 * MiB)).hexdigest()

    with loop_device(tmp_path / "big.img", 16 * MiB) as device:
        # Old data on the device where the source has a hole: zeroed, since an ALLOCATED
        # plan says every chunk it does not read is zero.
        with device.open("r+b") as fh:
            fh.write(os.urandom(16 * MiB))
            os.fsync(fh.fileno())
        discard(image, CS, CS)
        target = ReplicaTarget(tmp_path / "replica", {(vm.vm_id, DISK): str(device)})
        _, plan = sync(target, platform, vm)
        assert plan.mode == ALLOCATED and 1 not in plan.to_read
        assert digest(device) == digest(image)
        # A chunk the guest zeroed is written as zeros (the device zeroes the range).
        write_at(image, 0, bytes(CS))
        write_at(image, CS + 7, b"changed")
        second, plan = sync(target, platform, vm)
        assert plan.mode == CHANGED and plan.to_read == [0, 1]
        assert digest(device) == digest(image)
        assert restored_equal(target, vm, second, image)


def test_replica_settings_are_checked(tmp_path: Path) -> None:
    conf = tmp_path / "hamal.conf"
    conf.write_text(
        "[target]\ntype = replica\n[replica]\n"
        f"directory = {tmp_path / 'replica'}\n"
        f"devices = vm01:disk0.raw=/dev/sdb, vm02:disk0.raw=/dev/sdb, oops, "
        f"vm03:d=relative/path, vm04:d={tmp_path / 'replica' / 'images' / 'x'}\n"
    )
    with pytest.raises(ConfigError) as bad:
        load(str(conf), {})
    text = str(bad.value)
    assert "[replica] devices: 'oops', 'vm03:d=relative/path': expected VM:DISK=" in text
    assert "vm01:disk0.raw, vm02:disk0.raw all map to /dev/sdb: expected one disk per" in text
    assert "[replica] directory, devices: " in text and "is inside directory" in text

    conf.write_text(
        f"[target]\ntype = replica\n[replica]\ndirectory = {tmp_path / 'replica'}\n"
        "devices = web:1:disk0.raw = /dev/disk/by-id/x , db:vda-1=/dev/vdb\n"
    )
    settings = load(str(conf), {})
    assert settings.replica.devices_map() == {
        ("web:1", "disk0.raw"): "/dev/disk/by-id/x",
        ("db", "vda-1"): "/dev/vdb",
    }
