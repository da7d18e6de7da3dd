"""Sample VMs for the local platform, and a writer that changes their disks like a guest.

The writer follows the local platform's quiesce protocol: it holds a shared flock on
an image while it writes, so a snapshot (exclusive flock) never sees half a write. With
change tracking on (the image has a change journal), every write is also recorded in
the journal under that lock, the way a hypervisor's CBT records it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hamal_workers.platforms.local import ChangeJournal

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


@contextlib.contextmanager
def writing(path: Path) -> Iterator[int]:
    """An fd open for writing under a shared flock: the platform's snapshot waits for it."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield fd
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
    with writing(path) as fd:
        for slot, kind in zip(slots, kinds, strict=False):
            if kind == "random":
                data = rng.randbytes(layout.piece)
            elif kind == "text":
                data = compressible(rng, layout.piece)
            else:
                data = bytes(layout.piece)
            os.pwrite(fd, data, slot * layout.piece)


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
    """One guest write, recorded in the image's change journal when it has one."""
    journal = ChangeJournal(path)
    with writing(path) as fd:
        os.pwrite(fd, data, offset)
        if journal.path.exists():
            journal.record(offset, len(data))


def scribble(path: Path, rng: random.Random, writes: int, max_len: int = MiB) -> int:
    """A guest's writes: random lengths at random offsets; returns the bytes written."""
    size = path.stat().st_size
    journal = ChangeJournal(path)
    tracked = journal.path.exists()
    written = 0
    with writing(path) as fd:
        for _ in range(writes):
            length = rng.randint(512, max_len)
            offset = rng.randrange(0, size - length)
            data = rng.randbytes(length) if rng.random() < 0.7 else compressible(rng, length)
            os.pwrite(fd, data, offset)
            if tracked:
                journal.record(offset, length)
            written += length
    return written
