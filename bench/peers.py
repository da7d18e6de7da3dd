"""The peers Hamal is measured against: `cp --sparse=always` and benji 0.17.

benji lives in its own venv (its pins conflict with ours), installed the way
shared/TESTBEDS.md found to work on Python 3.11: ruamel.yaml 0.15 built without its C
extension first, then benji with zstd support.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hamal_workers.engine.extents import Extent

BENJI_PINS = ("ruamel.yaml==0.15.100", "benji[compression]==0.17.0")
_INSTALLED = ".hamal-bench-installed"
_TAIL = 1500

BENJI_CONFIG = """\
configurationVersion: '1'
databaseEngine: sqlite:///{root}/benji.sqlite
defaultStorage: files
blockSize: {block_size}
storages:
  - name: files
    storageId: 1
    module: file
    configuration:
      path: {root}/data
      activeTransforms: [zstd]
transforms:
  - name: zstd
    module: zstd
    configuration:
      level: 1
ios:
  - name: file
    module: file
"""


class PeerError(Exception):
    """A measured command could not be installed or failed; the message says which and why."""


@dataclass(frozen=True)
class Ran:
    """A command that exited 0: its wall time, and when it started and ended (epoch)."""

    seconds: float
    started_at: float
    ended_at: float
    stdout: str


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> Ran:
    """Run a command to its end, timed; PeerError with its output's tail if it fails."""
    started_at = time.time()
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-_TAIL:]
        raise PeerError(f"{' '.join(cmd[:4])} … exited with {done.returncode}:\n{output}")
    return Ran(seconds, started_at, started_at + seconds, done.stdout)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Run a command; its wall time in seconds, or PeerError with its output's tail."""
    return run_timed(cmd, env).seconds


def cp_sparse(src: Path, dst: Path) -> float:
    dst.unlink(missing_ok=True)
    return timed(["cp", "--sparse=always", str(src), str(dst)])


# --- benji ------------------------------------------------------------------------------


def install_benji(venv: Path) -> Path:
    """The benji executable in `venv`, installed first unless an earlier run did it."""
    exe = venv / "bin" / "benji"
    if (venv / _INSTALLED).exists() and exe.exists():
        return exe
    python3 = shutil.which("python3")
    if python3 is None:
        raise PeerError("no python3 on PATH to create benji's venv with")
    pip = str(venv / "bin" / "pip")
    # Without a C compiler ruamel.yaml 0.15 installs pure Python; its C part does not build.
    no_cc = {**os.environ, "CC": "/bin/false"}
    timed([python3, "-m", "venv", str(venv)])
    timed([pip, "install", "--quiet", BENJI_PINS[0]], env=no_cc)
    timed([pip, "install", "--quiet", BENJI_PINS[1]])
    if not exe.exists():
        raise PeerError(f"pip installed {BENJI_PINS[1]} but {exe} is missing")
    (venv / _INSTALLED).write_text(" ".join(BENJI_PINS) + "\n")
    return exe


def prepare_benji(root: Path) -> Path | None:
    """benji's executable in root/benji-venv, or None (and why, printed) if it won't install."""
    venv = root / "benji-venv"
    try:
        exe = install_benji(venv)
    except PeerError as exc:
        print(f"benji: NOT MEASURED, it could not be installed in {venv}: {exc}")
        return None
    print(f"benji: {exe}")
    return exe


def rbd_hints(extents: list[Extent]) -> list[dict[str, object]]:
    """Changed extents in the `rbd diff --format=json` form benji's -r takes."""
    return [{"offset": e.offset, "length": e.length, "exists": "true"} for e in extents]


@dataclass
class Benji:
    """One benji repository (sqlite database + file storage) under `root`."""

    exe: Path
    root: Path
    block_size: int

    def create(self) -> None:
        """A fresh repository: the config, then `benji database-init`."""
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "data").mkdir(parents=True)
        text = BENJI_CONFIG.format(root=self.root, block_size=self.block_size)
        self.config.write_text(text)
        self._benji("database-init")

    @property
    def config(self) -> Path:
        return self.root / "benji.yaml"

    def backup(
        self, uid: str, image: Path, volume: str, base: str = "", hints: Path | None = None
    ) -> float:
        """Seconds `benji backup` took; with `base` and `hints` an incremental."""
        args = ["backup", "-u", uid]
        if base:
            args += ["-f", base]
        if hints is not None:
            args += ["-r", str(hints)]
        return self._benji(*args, f"file:{image}", volume)

    def write_hints(self, extents: list[Extent]) -> Path:
        path = self.root / "hints.json"
        path.write_text(json.dumps(rbd_hints(extents)))
        return path

    def restore(self, uid: str, out: Path) -> float:
        """Seconds `benji restore --sparse` took to write version `uid` to the file `out`."""
        out.unlink(missing_ok=True)
        return self._benji("restore", "--sparse", uid, f"file:{out}")

    def remove(self, uid: str) -> None:
        """Forget a version, so a later backup cannot take its blocks as already stored."""
        self._benji("rm", "--force", uid)

    def startup_seconds(self) -> float:
        """`benji ls`: interpreter start, imports, config and database open, and no data."""
        return self._benji("ls")

    def _benji(self, *args: str) -> float:
        cmd = [str(self.exe), "-c", str(self.config), "--log-level", "WARNING", *args]
        return timed(cmd)
