"""A whole fleet on this machine, as real OS processes: redis-server, celery beat, workers.

`make demo` and the integration tests use it; each process gets the reference config
plus HAMAL_<SECTION>_<KEY> overrides, exactly as a container would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
REFERENCE_CONF = REPO / "etc" / "hamal" / "hamal.conf"


class FleetError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, timeout: float, what: str, every: float = 0.05) -> None:
    """Poll a cheap local condition (a port, a file) until true; FleetError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(every)
    raise FleetError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalFleet:
    root: Path
    overrides: Mapping[str, str] = field(default_factory=dict)
    config: Path = REFERENCE_CONF
    procs: dict[str, Proc] = field(default_factory=dict)
    redis_port: int = 0
    redis_password: str = ""  # non-empty: Redis requires it (--requirepass)

    @property
    def redis_url(self) -> str:
        from urllib.parse import quote

        password = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{password}127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAMAL_")}
        env["HAMAL_CONF"] = str(self.config)
        env["HAMAL_REDIS_URL"] = self.redis_url
        env["HAMAL_DEFAULT_LOG_DIR"] = str(self.root / "log")
        env["HAMAL_DEFAULT_HAMAL_LIB_DIR"] = str(self.root / "lib")
        env["HAMAL_DEFAULT_HAMAL_INFO_PATH"] = str(self.root / "lib" / "hamal_info")
        env["HAMAL_TARGET_PATH"] = str(self.root / "store")
        env["PYTHONPATH"] = str(REPO)
        env.update(self.overrides)
        return env

    def apply_env(self) -> None:
        """Make this process see the fleet's config (for sending tasks, reading state)."""
        for k in [k for k in os.environ if k.startswith("HAMAL_")]:
            del os.environ[k]
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("HAMAL_")})

    # --- processes ---------------------------------------------------------------
    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if not server:
            raise FleetError(
                "redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)"
            )
        self.redis_port = self.redis_port or free_port()
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        password = ["--requirepass", self.redis_password] if self.redis_password else []
        self._spawn(
            "redis",
            [
                server,
                *password,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(data),
                "--maxmemory-policy",
                "noeviction",
            ],
        )
        client = redis.Redis(
            port=self.redis_port,
            password=self.redis_password or None,
            socket_connect_timeout=0.5,
        )

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(ready, 15, "redis-server to answer PING")

    def start_worker(self, name: str, queues: list[str], concurrency: int | None = None) -> Proc:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "hamal_workers",
            "worker",
            "-Q",
            ",".join(queues),
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if concurrency:
            cmd += ["-c", str(concurrency)]
        return self._spawn(name, cmd)

    def start_beat(self, name: str = "beat") -> Proc:
        run = self.root / "run"
        run.mkdir(parents=True, exist_ok=True)
        return self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "hamal_workers",
                "beat",
                "--loglevel",
                "INFO",
                "--pidfile",
                str(run / f"{name}.pid"),
                "-s",
                str(run / f"{name}-schedule"),
            ],
        )

    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        out = self.root / "proc"
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"{name}.out"
        with log.open("ab") as fh:
            popen = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=str(REPO),
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def wait_worker_ready(self, name: str, timeout: float = 60) -> None:
        """Until the worker answers a broadcast ping: it consumes from its queues then."""
        from hamal_workers.celery_app import app

        host = socket.gethostname()

        def ready() -> bool:
            proc = self.procs[name]
            if proc.popen.poll() is not None:
                raise FleetError(
                    f"{name} exited with {proc.popen.returncode}: {proc.log.read_text()[-2000:]}"
                )
            return bool(app.control.ping(destination=[f"{name}@{host}"], timeout=0.5))

        wait_for(ready, timeout, f"worker {name} to answer ping", every=0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and its whole group (a worker and its prefork children)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, sig)
        if sig == signal.SIGKILL:
            proc.popen.wait(10)

    def stop(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.popen.poll() is not None:
            return
        try:
            os.killpg(proc.popen.pid, signal.SIGTERM)
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        # Workers and beat first, Redis last: they need it to shut down cleanly.
        for name in [n for n in self.procs if n != "redis"]:
            self.stop(name)
        self.stop("redis")
