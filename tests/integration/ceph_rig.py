"""A real Ceph cluster for the session, and what the Ceph tests do to it from outside.

The cluster comes up once (about 10 s) and goes at the end of the session; before it
goes, the session fails if any `hamal-` snapshot or group is left on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hamal_workers.platforms.base import run_of_snapshot
from hamal_workers.testbeds.ceph import CephCluster

MiB = 1024 * 1024
FEATURES = 1 | 4 | 8 | 16 | 32  # layering, exclusive-lock, object-map, fast-diff, deep-flatten


@dataclass
class Rbd:
    """librbd on the test cluster, as a guest or an operator would touch it."""

    cluster: CephCluster

    def __post_init__(self) -> None:
        import rados

        self.rados = rados.Rados(
            conffile=str(self.cluster.conf),
            rados_id="admin",
            conf={"keyring": str(self.cluster.keyring)},
        )
        self.rados.connect(timeout=10)
        self.ioctx: dict[str, Any] = {}

    def io(self, pool: str) -> Any:
        if pool not in self.ioctx:
            self.ioctx[pool] = self.rados.open_ioctx(pool)
        return self.ioctx[pool]

    @contextlib.contextmanager
    def image(self, pool: str, name: str) -> Iterator[Any]:
        import rbd

        img = rbd.Image(self.io(pool), name)
        try:
            yield img
        finally:
            img.close()

    def create(self, pool: str, name: str, size: int, features: int = FEATURES) -> None:
        import rbd

        rbd.RBD().create(self.io(pool), name, size, old_format=False, features=features)

    def write(self, pool: str, name: str, offset: int, data: bytes) -> None:
        with self.image(pool, name) as img:
            img.write(data, offset)

    def fill(self, pool: str, name: str, seed: int, pieces: int, piece: int = MiB) -> None:
        """Random data in `pieces` places, some compressible, leaving holes between."""
        rng = _Rng(seed)
        with self.image(pool, name) as img:
            size = img.size()
            for n in range(pieces):
                offset = rng.below(size // piece) * piece
                data = os.urandom(piece) if n % 3 else bytes([n % 251]) * piece
                img.write(data, offset)

    def export(self, pool: str, name: str, snap: str | None = None) -> bytes:
        """`rbd export` of the image (at `snap`): the reference a restore must equal."""
        spec = f"{pool}/{name}" + (f"@{snap}" if snap else "")
        return subprocess.run(
            [
                "rbd",
                "export",
                "--no-progress",
                spec,
                "-",
                "--conf",
                str(self.cluster.conf),
                "--keyring",
                str(self.cluster.keyring),
            ],  # fmt: skip
            check=True,
            capture_output=True,
        ).stdout

    def user_snaps(self, pool: str, name: str) -> list[str]:
        with self.image(pool, name) as img:
            return [s["name"] for s in img.list_snaps() if s.get("namespace", 0) == 0]

    def groups(self, pool: str = "volumes") -> list[str]:
        import rbd

        return list(rbd.RBD().group_list(self.io(pool)))

    def close(self) -> None:
        for io in self.ioctx.values():
            io.close()
        self.rados.shutdown()


def ours_left(cluster: CephCluster) -> list[str]:
    """Every `hamal-<run id>` snapshot and group on the cluster."""
    import rbd

    rb = Rbd(cluster)
    found = []
    try:
        for pool in rb.rados.list_pools():
            io = rb.io(pool)
            try:
                images = rbd.RBD().list(io)
            except rbd.Error:
                continue
            for name in images:
                with rb.image(pool, name) as img:
                    found += [
                        f"{pool}/{name}@{s['name']}"
                        for s in img.list_snaps()
                        if run_of_snapshot(s["name"]) or s["name"].startswith(".group")
                    ]
            with contextlib.suppress(rbd.Error):
                found += [
                    f"group {pool}/{g}" for g in rbd.RBD().group_list(io) if run_of_snapshot(g)
                ]
    finally:
        rb.close()
    return found


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class _Rng:
    def __init__(self, seed: int) -> None:
        import random

        self.r = random.Random(seed)

    def below(self, n: int) -> int:
        return self.r.randrange(max(n, 1))


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
