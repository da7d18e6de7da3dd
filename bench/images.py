"""The benchmark's disk images: built from a seed, so every run measures the same bytes.

The engine image is the one TESTBEDS.md measured its peers on: 2 GiB raw, each 4 MiB
piece random (40%), a hole (30%) or compressible text (30%). The incremental changes 1%
of the 4 MiB chunks with one write of random data inside each.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hamal_workers.engine.extents import Extent
from hamal_workers.simulators.local_vms import compressible

MiB = 1024 * 1024
GiB = 1024 * MiB
_READ_PIECE = 16 * MiB


@dataclass(frozen=True)
class MixedImage:
    """Apparent size, the piece every kind of data is laid out in, and the share of each."""

    size: int = 2 * GiB
    piece: int = 4 * MiB
    random_share: float = 0.4
    compressible_share: float = 0.3  # the rest (30%) stays holes

    @property
    def pieces(self) -> int:
        return self.size // self.piece

    def kinds(self, rng: random.Random) -> list[str]:
        """The kind of every piece, in disk order."""
        random_count = round(self.pieces * self.random_share)
        text_count = round(self.pieces * self.compressible_share)
        kinds = ["random"] * random_count + ["text"] * text_count
        kinds += ["hole"] * (self.pieces - len(kinds))
        rng.shuffle(kinds)
        return kinds


def build_image(path: Path, spec: MixedImage, seed: int) -> dict[str, int]:
    """Write the image (holes stay unallocated); return how many pieces of each kind."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    counts = {"random": 0, "text": 0, "hole": 0}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, spec.size)
        for index, kind in enumerate(spec.kinds(rng)):
            counts[kind] += 1
            if kind == "random":
                os.pwrite(fd, rng.randbytes(spec.piece), index * spec.piece)
            elif kind == "text":
                os.pwrite(fd, compressible(rng, spec.piece), index * spec.piece)
    finally:
        os.close(fd)
    return counts


def change_chunks(
    base: Path, out: Path, chunk_size: int, fraction: float, seed: int
) -> list[Extent]:
    """Copy `base` to `out` and write random data inside `fraction` of its chunks.

    Chunks are picked at random among all of them (holes too); each gets one write of
    random data at a 4 KiB-aligned offset inside it, from 256 KiB long up to the chunk's
    end. Returns the extents written, in disk order: what change tracking would report.
    """
    rng = random.Random(seed)
    out.unlink(missing_ok=True)
    copy_sparse(base, out)
    size = base.stat().st_size
    count = max(1, round(size // chunk_size * fraction))
    chosen = sorted(rng.sample(range(size // chunk_size), count))
    written = []
    fd = os.open(out, os.O_WRONLY)
    try:
        for index in chosen:
            pages = chunk_size // 4096
            first = rng.randrange(pages)
            length = rng.randint(min(64, pages - first), pages - first) * 4096
            offset = index * chunk_size + first * 4096
            os.pwrite(fd, rng.randbytes(length), offset)
            written.append(Extent(offset, length))
    finally:
        os.close(fd)
    return written


def copy_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def read_through(path: Path) -> None:
    """Read every byte once, so the page cache holds the file (or every file under the
    directory) for whoever reads it next."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb", buffering=0) as f:
            while f.read(_READ_PIECE):
                pass


def same_content(a: Path, b: Path) -> str | None:
    """None when both files hold the same bytes (holes read as zeros), else where they differ."""
    if a.stat().st_size != b.stat().st_size:
        return f"sizes differ: {a.stat().st_size} vs {b.stat().st_size}"
    with a.open("rb", buffering=0) as fa, b.open("rb", buffering=0) as fb:
        offset = 0
        while True:
            x, y = fa.read(_READ_PIECE), fb.read(_READ_PIECE)
            if x != y:
                return f"first difference in the 16 MiB at offset {offset}"
            if not x:
                return None
            offset += len(x)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
