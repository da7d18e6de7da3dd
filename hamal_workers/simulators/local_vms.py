"""Sample VMs for the local platform, and a writer that changes their disks like a guest.

The writer follows the local platform's write protocol (`GuestDisk`): it holds a shared
flock on an image while it writes, so a snapshot (exclusive flock) never sees half a
write; before it overwrites a block it lets every live snapshot keep the block's old
bytes (copy-on-write); and with change tracking on (the image has a change journal),
every write is recorded in the journal under that lock, the way a hypervisor's CBT
records it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hamal_workers.platforms.local import ChangeJournal, preserve_before_write

MiB = 1024 * 1024


@dataclass(frozen=True)
class ImageLayout:
    """Apparent size and how much of it holds each kind of data (the rest is holes)."""

    size: int = 1024 * MiB
    random_bytes: int = 48 * MiB
    compressible_bytes: int = 48 * MiB
    zero_bytes: int = 16 * MiB  # written zeros: allocated, but stored as "zero"
    piece: int = 4 * MiB


def compressible(rng: random.Random, length: int) -> bytes:
    """Text-like data: zstd shrinks it several times, but it is not all one byte."""
    words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(64)]
    out = bytearray()
    while len(out) < length:
        out += b" ".join(rng.choice(words) for _ in range(32)) + b"\n"
    return bytes(out[:length])


class GuestDisk:
    """An image open for a guest's writes, under the local platform's write protocol:
    the shared flock is held, every live snapshot keeps what it must see before a block
    is overwritten, and the change journal (when the image has one) records the write."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        journal = ChangeJournal(path)
        self.journal = journal if journal.path.exists() else None

    def write(self, offset: int, data: bytes) -> None:
        preserve_before_write(self.path, self.fd, offset, len(data))
        os.pwrite(self.fd, data, offset)
        if self.journal is not None:
            self.journal.record(offset, len(data))

    def discard(self, offset: int, length: int) -> None:
        """The guest discards (TRIM): the range reads as zeros and is a hole again."""
        preserve_before_write(self.path, self.fd, offset, length)
        _punch_hole(self.fd, offset, length)
        if self.journal is not None:
            self.journal.record(offset, length)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[GuestDisk]:
    """The image open for writing under a shared flock: the platform's snapshot waits for it."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield GuestDisk(path, fd)
    finally:
        os.close(fd)


def make_image(path: Path, layout: ImageLayout, seed: int) -> None:
    """A sparse image with random, compressible and zero pieces at spread-out offsets."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.truncate(layout.size)
    slots = list(range(layout.size // layout.piece))
    rng.shuffle(slots)
    kinds = (
        ["random"] * (layout.random_bytes // layout.piece)
        + ["text"] * (layout.compressible_bytes // layout.piece)
        + ["zero"] * (layout.zero_bytes // layout.piece)
    )
    with writing(path) as disk:
        for slot, kind in zip(slots, kinds, strict=False):
            if kind == "random":
                data = rng.randbytes(layout.piece)
            elif kind == "text":
                data = compressible(rng, layout.piece)
            else:
                data = bytes(layout.piece)
            disk.write(slot * layout.piece, data)


def make_inventory(
    root: Path, vms: int, disks: int, layout: ImageLayout, *, track_changes: bool = False
) -> list[Path]:
    """VMs vm01, vm02 ... with disks disk0.raw ...; `track_changes` starts their journals."""
    images = []
    for v in range(vms):
        for d in range(disks):
            image = root / f"vm{v + 1:02d}" / f"disk{d}.raw"
            make_image(image, layout, seed=v * 100 + d)
            if track_changes:
                ChangeJournal(image).reset()
            images.append(image)
    return images


def write_at(path: Path, offset: int, data: bytes) -> None:
    """One guest write."""
    with writing(path) as disk:
        disk.write(offset, data)


def discard(path: Path, offset: int, length: int) -> None:
    """One guest discard (TRIM)."""
    with writing(path) as disk:
        disk.discard(offset, length)


def scribble(path: Path, rng: random.Random, writes: int, max_len: int = MiB) -> int:
    """A guest's writes: random lengths at random offsets; returns the bytes written."""
    size = path.stat().st_size
    written = 0
    with writing(path) as disk:
        for _ in range(writes):
            length = rng.randint(512, max_len)
            offset = rng.randrange(0, size - length)
            data = rng.randbytes(length) if rng.random() < 0.7 else compressible(rng, length)
            disk.write(offset, data)
            written += length
    return written
