"""A vCenter for tests and benches: govmomi's simulator with the project's front end.

    python -m hamal_workers.testbeds.vcenter build         # compile it (cached by source)
    python -m hamal_workers.testbeds.vcenter serve DIR     # run it until Ctrl-C

`vcsim/main.go` is built against Debian's govmomi (`golang-github-vmware-govmomi-dev`,
0.24) with Debian's Go, GOPATH mode: no download. It serves the vSphere SOAP API over TLS
with a certificate made here (so certificate checking is tested for real), accepts one
user, and keeps its datastore's files (the disks) under the directory it is given.
`vcsim/cbt.go` adds what the simulator lacks: snapshots that freeze the disk content they
saw, change ids on disk backings and `QueryChangedDiskAreas` answering exactly the blocks
changed since a change id (64 KiB blocks, paged), a CBT reset when tracking is turned off,
and the datastore interface (`/folder`, with Range) for live sessions only.
`scripts/setup-vmware.sh` installs the packages.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hamal_workers.testbeds import stop_process
from hamal_workers.testbeds.certs import make_certificate

SOURCE = Path(__file__).with_name("vcsim")
GOVMOMI = Path("/usr/share/gocode/src/github.com/vmware/govmomi")


class VCenterTestbedError(Exception):
    pass


def missing_tools() -> list[str]:
    missing = [] if shutil.which("go") else ["go (golang-go)"]
    if not (GOVMOMI / "simulator").is_dir():
        missing.append("govmomi (golang-github-vmware-govmomi-dev)")
    return missing


def binary_path() -> Path:
    """Where the build of the current source lives: beside the interpreter's environment."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE.glob("*.go")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return Path(sys.prefix) / "vcsim" / digest.hexdigest()[:16] / "vcsim"


def build() -> Path:
    """The simulator's binary, compiled when the source changed (about 20 s cold)."""
    binary = binary_path()
    if binary.exists():
        return binary
    missing = missing_tools()
    if missing:
        raise VCenterTestbedError(
            f"cannot build the vCenter simulator, missing: {', '.join(missing)} "
            "(scripts/setup-vmware.sh installs them)"
        )
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOPATH": "/usr/share/gocode", "GO111MODULE": "off", "GOFLAGS": ""}
    env.setdefault("GOCACHE", str(binary.parent.parent / "go-cache"))
    partial = binary.with_name("vcsim.partial")
    done = subprocess.run(
        ["go", "build", "-o", str(partial), "."],
        cwd=SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise VCenterTestbedError(f"go build of {SOURCE} failed:\n{done.stderr[-3000:]}")
    partial.rename(binary)
    return binary


@dataclass
class VCenter:
    """A running simulator: where it listens, who may log in, where its disks are."""

    directory: Path
    url: str  # https://127.0.0.1:PORT/sdk
    user: str
    password: str
    ca_file: Path
    datastores: dict[str, Path]
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> VCenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def folder_reads(self) -> list[tuple[str, str]]:
        """(path, Range header) of each datastore read so far (started with trace_folder)."""
        found = []
        for line in (self.directory / "vcsim.log").read_text(errors="replace").splitlines():
            parts = line.split(" folder GET ", 1)
            if len(parts) == 2:
                path, _, rng = parts[1].partition(" range=")
                found.append((path, rng.strip('"')))
        return found


def start(
    directory: Path,
    *,
    user: str = "hamal@vsphere.local",
    password: str = "vcsim-password",
    vms: int = 2,
    session_idle_s: float = 0,
    disk_mib: int = 64,
    trace_folder: bool = False,
) -> VCenter:
    """Start a simulator whose files (certificate, datastore, log) live under `directory`."""
    binary = build()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(directory, "vcenter")
    # The simulator puts each datastore in a new directory under $TMPDIR.
    (directory / "datastores").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(directory / "datastores")}
    cmd = [str(binary), "-cert", str(cert), "-key", str(key), "-user", user, "-password", password,
           "-vm", str(vms), "-session-idle", f"{session_idle_s}s",
           "-disk-mib", str(disk_mib)]  # fmt: skip
    if trace_folder:  # every datastore read and its range in vcsim.log
        cmd.append("-trace-folder")
    log = (directory / "vcsim.log").open("wb")
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    log.close()
    assert process.stdout is not None
    line = process.stdout.readline()  # the simulator's one line, once it serves
    if not line:
        process.wait(10)
        tail = (directory / "vcsim.log").read_text(errors="replace")[-2000:]
        raise VCenterTestbedError(f"the vCenter simulator exited {process.returncode}: {tail}")
    ready = json.loads(line)
    stores = {name: Path(url) for name, url in ready["datastores"].items()}
    return VCenter(directory, ready["url"], user, password, cert, stores, process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamal_workers.testbeds.vcenter")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="compile the simulator (cached by its source)")
    serve = sub.add_parser("serve", help="run a simulator with its files in DIR until Ctrl-C")
    serve.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build())
            return 0
        with start(args.directory) as vcenter:
            print(f"vCenter simulator at {vcenter.url}, user {vcenter.user}, CA {vcenter.ca_file}")
            print(f"datastores: {vcenter.datastores}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                vcenter.process.wait()
    except VCenterTestbedError as exc:
        print(f"vcenter testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
