"""A fleet syncing into an encrypted chunk store; `hamal restore` and `hamal verify` with the
key, without it, with another key, and over a tampered chunk."""

from __future__ import annotations

import filecmp
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hamal_workers.localfleet import LocalFleet
from hamal_workers.platforms.local import vm_id_for
from hamal_workers.simulators.local_vms import make_inventory, scribble
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.encryption import load_key_file, new_key_file
from tests.integration.test_local_sync import SMALL, scan, start

pytestmark = pytest.mark.timeout(240)


def hamal(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamal_workers.cli", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_encrypted_points_restore_only_with_their_key(
    fleet: LocalFleet, events: Any, tmp_path: Path
) -> None:
    (image,) = make_inventory(fleet.root / "inventory", vms=1, disks=1, layout=SMALL)
    key = tmp_path / "hamal.key"
    made = hamal(fleet.env(), "key", "new", str(key))
    assert made.returncode == 0, made.stderr
    secret = key.read_text().strip()
    fleet.overrides = {**fleet.overrides, "HAMAL_TARGET_ENCRYPTION_KEY_FILE": str(key)}
    start(fleet)
    scan(fleet)
    assert events.runs(1, timeout=120)[0]["status"] == "committed"
    scribble(image, random.Random(5), writes=3, max_len=256 * 1024)
    scan(fleet)
    assert events.runs(1, timeout=120)[0]["status"] == "committed"
    fleet.stop_all()

    env = fleet.env()
    vm = image.parent.name
    listed = hamal(env, "points", "--vm", vm, "--json")
    assert listed.returncode == 0, listed.stderr
    points = [p["point_id"] for p in json.loads(listed.stdout)["points"]]
    assert len(points) == 2
    for point in points:
        out = tmp_path / f"{point}.raw"
        done = hamal(env, "restore", "--vm", vm, "--disk", image.name, "--point", point,
                     "--to", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert filecmp.cmp(image, tmp_path / f"{points[-1]}.raw", shallow=False)
    # No chunk holds the disk's bytes in the clear, and the key is in no log.
    store = ChunkStore(fleet.root / "store", create=False, cipher=load_key_file(key))
    sample = image.read_bytes()
    probe = next(
        sample[i : i + 64] for i in range(0, len(sample), 4096) if sample[i : i + 64].strip(b"\0")
    )
    for path in (fleet.root / "store" / "chunks").rglob("*"):
        if path.is_file():
            assert probe not in path.read_bytes(), path
    logs = "".join(p.read_text(errors="replace") for p in fleet.root.rglob("*.log"))
    logs += "".join(p.read_text(errors="replace") for p in fleet.root.rglob("*.out"))
    assert secret not in logs

    # Without the key, or with another: one clear line, exit 1, nothing written.
    out = tmp_path / "refused.raw"
    args = ("restore", "--vm", vm, "--disk", image.name, "--point", points[-1], "--to", str(out))
    without = hamal({**env, "HAMAL_TARGET_ENCRYPTION_KEY_FILE": ""}, *args)
    assert without.returncode == 1
    assert "this store is encrypted (key id" in without.stderr
    assert "Traceback" not in without.stderr
    other = tmp_path / "other.key"
    new_key_file(other)
    wrong = hamal({**env, "HAMAL_TARGET_ENCRYPTION_KEY_FILE": str(other)}, *args)
    assert wrong.returncode == 1
    assert "is not this store's key" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not out.exists()

    # A tampered chunk: restore and verify name it and say it fails authentication.
    manifest = store.manifest(vm_id_for(vm), points[-1], image.name)
    name = next(n for n in manifest.entries if n is not None)
    path = store.chunk_path(name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    broken = hamal(env, *args)
    assert broken.returncode == 1
    assert name.hex() in broken.stderr and "fails authentication" in broken.stderr
    verified = hamal(env, "verify", "--vm", vm, "--point", points[-1])
    assert verified.returncode != 0
    assert f"DAMAGED chunk {name.hex()}" in verified.stdout
    assert "fails authentication" in verified.stdout
