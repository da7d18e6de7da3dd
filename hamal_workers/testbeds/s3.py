"""An S3 server for tests and benches: moto's server mode on 127.0.0.1, in a process of its own.

    python -m hamal_workers.testbeds.s3 serve DIR [--tls]     # run it until Ctrl-C

It speaks the S3 HTTP API (SigV4, multipart, listing, ranges) well enough for boto3, keeps
its objects in memory, and with `tls` serves a certificate made here, so that a CA bundle
is checked for real. It starts on a free port; `S3Server` says where, and which keys.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hamal_workers.localfleet import free_port
from hamal_workers.testbeds import stop_process
from hamal_workers.testbeds.certs import make_certificate

ACCESS_KEY = "hamal-test-access"
SECRET_KEY = "hamal-test-secret-key-0123456789"  # moto accepts any; never a real one
REGION = "us-east-1"
_RUNNING = re.compile(r"Running on (https?://[0-9.]+:[0-9]+)")
_START_S = 60.0


class S3TestbedError(Exception):
    pass


@dataclass
class S3Server:
    directory: Path
    endpoint_url: str
    ca_file: Path | None
    process: subprocess.Popen[bytes] = field(repr=False)
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def client(self) -> object:
        """A boto3 client of this server, as an operator's tool would be (not the proxy's)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            verify=str(self.ca_file) if self.ca_file else None,
        )  # fmt: skip

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(directory: Path, *, tls: bool = False) -> S3Server:
    """Start a server whose log (and certificate, with tls) live under `directory`."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    ca_file = None
    if tls:
        cert, key = make_certificate(directory, "s3")
        cmd += ["--ssl-cert", str(cert), "--ssl-key", str(key)]
        ca_file = cert
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    process = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=directory
    )
    assert process.stderr is not None
    log = (directory / "moto.log").open("ab")
    found: list[str] = []
    ready = threading.Event()

    def follow() -> None:  # werkzeug says where it listens once it does; the rest is the log
        assert process.stderr is not None
        for line in process.stderr:
            log.write(line)
            log.flush()
            match = _RUNNING.search(line.decode(errors="replace"))
            if match and not ready.is_set():
                found.append(match.group(1))
                ready.set()
        log.close()
        ready.set()

    threading.Thread(target=follow, name="moto-log", daemon=True).start()
    if not ready.wait(_START_S) or not found:
        process.kill()
        process.wait(10)
        tail = (directory / "moto.log").read_text(errors="replace")[-2000:]
        raise S3TestbedError(f"the S3 server did not start (exit {process.returncode}): {tail}")
    url = found[0].replace("http://", "https://") if tls else found[0]
    return S3Server(directory, url, ca_file, process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamal_workers.testbeds.s3")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server with its files in DIR until Ctrl-C")
    serve.add_argument("directory", type=Path)
    serve.add_argument("--tls", action="store_true", help="HTTPS with a certificate made here")
    serve.add_argument("--bucket", default="hamal", help="a bucket to create")
    args = parser.parse_args(argv)
    try:
        with start(args.directory, tls=args.tls) as server:
            server.create_bucket(args.bucket)
            print(f"S3 at {server.endpoint_url}, bucket {args.bucket}, access key "
                  f"{server.access_key}, CA {server.ca_file or '-'}", flush=True)  # fmt: skip
            with contextlib.suppress(KeyboardInterrupt):
                server.process.wait()
    except S3TestbedError as exc:
        print(f"s3 testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
