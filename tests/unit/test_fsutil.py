"""Atomic, durable file writes: the one copy the whole project uses."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hamal_workers import fsutil


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_write_atomic_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("old")
    assert fsutil.write_atomic(path, [b"new ", memoryview(b"content")]) == 11
    assert path.read_bytes() == b"new content"
    assert entries(tmp_path) == ["record.json"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old = os.umask(0o077)
    try:
        fsutil.write_atomic(tmp_path / "f", [b"x"], mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("old")

    def parts():  # type: ignore[no-untyped-def]
        yield b"half"
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        fsutil.write_atomic(path, parts())
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["record.json"]


def test_replacing_never_follows_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out.img"
    # Whatever name a temporary could have had: none of them is used through a link.
    for name in (".out.img.tmp", "out.img.partial"):
        (tmp_path / name).symlink_to(victim)
    with fsutil.replacing(out, mode=0o600) as fd:
        os.write(fd, b"image")
    assert out.read_bytes() == b"image" and victim.read_text() == "precious"
    assert not out.is_symlink()


def test_temporary_names_are_recognised_and_real_names_are_not(tmp_path: Path) -> None:
    for kind in ("tmp", "deleted", "discarded", "damaged"):
        name = fsutil.temporary_name(tmp_path / "aaa", kind).name
        assert fsutil.TEMPORARY_NAME.match(name), name
    for name in ("point.json", "ab" * 32, ".snapshot", ".x.tmp.123", "x.tmp.0123456789abcdef"):
        assert not fsutil.TEMPORARY_NAME.match(name), name


def test_make_dirs_reports_the_directories_that_gained_an_entry(tmp_path: Path) -> None:
    assert fsutil.make_dirs(tmp_path / "a" / "b" / "c") == [
        tmp_path,
        tmp_path / "a",
        tmp_path / "a" / "b",
    ]
    assert fsutil.make_dirs(tmp_path / "a" / "b" / "c") == []
    assert fsutil.make_dirs(tmp_path / "a" / "d") == [tmp_path / "a"]


def test_fsync_dir_raises_for_a_missing_directory(tmp_path: Path) -> None:
    fsutil.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsutil.fsync_dir(tmp_path / "gone")


def test_no_room_is_recognised() -> None:
    assert fsutil.is_no_room(OSError(errno.ENOSPC, "full"))
    assert fsutil.is_no_room(OSError(errno.EDQUOT, "quota"))
    assert not fsutil.is_no_room(OSError(errno.EIO, "io"))
    assert not fsutil.is_no_room(ValueError("x"))


# --- writes around the page cache ---------------------------------------------------

UNCACHED_DIRS = {"disk": None, "tmpfs": Path("/dev/shm")}


@pytest.fixture(params=sorted(UNCACHED_DIRS))
def write_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the disk's filesystem (O_DIRECT) and one on tmpfs (the fallback)."""
    base = UNCACHED_DIRS[request.param]
    if base is None:
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(dir=base))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


# The directory fixture is the same for every example: only the files differ.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]
part_sizes = st.lists(st.integers(0, 3 * fsutil.DIRECT_ALIGN + 7), min_size=1, max_size=3)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=part_sizes, seed=st.integers(0, 2**32 - 1))
def test_write_uncached_writes_exactly_the_parts(
    write_dir: Path, sizes: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    parts = [rng.randbytes(n) for n in sizes]
    path = write_dir / f"chunk-{seed}"
    with fsutil.replacing(path) as fd:
        assert fsutil.write_uncached(fd, parts) == sum(sizes)
    assert path.read_bytes() == b"".join(parts)
    path.unlink()


def test_write_uncached_bypasses_the_page_cache_where_the_filesystem_allows(
    tmp_path: Path,
) -> None:
    # The point of it: on a disk filesystem the aligned part goes through O_DIRECT.
    with fsutil.replacing(tmp_path / "probe") as fd:
        direct = fsutil._reopen_direct(fd)
    if direct is None:
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT: nothing to check here")
    os.close(direct)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 12), st.integers(1, 2 * fsutil.DIRECT_ALIGN + 3), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_uncached_writer_puts_every_piece_at_its_offset(
    write_dir: Path, pieces: list[tuple[int, int, bool]], seed: int
) -> None:
    rng = random.Random(seed)
    size = 16 * fsutil.DIRECT_ALIGN
    expected = bytearray(size)
    path = write_dir / f"image-{seed}"
    with fsutil.replacing(path) as fd:
        os.ftruncate(fd, size)
        with fsutil.UncachedWriter(fd) as writer:
            for block, length, unaligned in pieces:
                offset = block * fsutil.DIRECT_ALIGN + (rng.randrange(1, 512) if unaligned else 0)
                length = min(length, size - offset)
                data = rng.randbytes(length)
                writer.pwrite(memoryview(data), offset)
                expected[offset : offset + length] = data
    assert path.read_bytes() == bytes(expected)
    path.unlink()
