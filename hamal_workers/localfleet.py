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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
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
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Like compose's `restart: unless-stopped`: an exit nobody asked for is restarted.
    supervised: bool = True
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    quick_exits: int = 0
    restart_at: float | None = None


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

    def start_worker(
        self,
        name: str,
        queues: list[str],
        concurrency: int | None = None,
        extra: list[str] | None = None,
    ) -> Proc:
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
        return self._spawn(name, cmd + list(extra or []))

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

    def start_flower(self, port: int, basic_auth: str, name: str = "flower") -> Proc:
        """Flower on 127.0.0.1:port; `basic_auth` is "user:password", given in Flower's own
        environment variable (FLOWER_BASIC_AUTH), never on its command line."""
        flower = {"FLOWER_BASIC_AUTH": basic_auth, "FLOWER_PORT": str(port)}
        cmd = [sys.executable, "-m", "celery", "-A", "hamal_workers", "flower"]
        return self._spawn(name, cmd, {**flower, "FLOWER_ADDRESS": "127.0.0.1"})

    def _spawn(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        out = self.root / "proc"
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"{name}.out"
        env = {**self.env(), **(extra_env or {})}
        proc = Proc(name, _popen(cmd, env, log), log, cmd, env)
        with self._supervisor.lock:
            self.procs[name] = proc
        self._supervisor.start()
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

    def kill(
        self, name: str, sig: int = signal.SIGKILL, restart: bool = True, group: bool = True
    ) -> subprocess.Popen[bytes]:
        """Signal a process and its whole group (a worker and its prefork children), or with
        group=False the process alone, as `docker stop` signals a container's PID 1.

        The supervisor restarts it if it exits, unless `restart` is False.
        """
        with self._supervisor.lock:
            proc = self.procs[name]
            proc.supervised = proc.supervised and restart
            popen = proc.popen
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(popen.pid, sig)
            else:
                os.kill(popen.pid, sig)
        if sig == signal.SIGKILL:
            popen.wait(10)
        return popen

    def stop(self, name: str, timeout: float = 20) -> None:
        with self._supervisor.lock:
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
        self._supervisor.stop()

    # --- supervision ---------------------------------------------------------------
    @cached_property
    def _supervisor(self) -> Supervisor:
        return Supervisor(self.procs, self.root / "proc" / "fleet.log")


def _popen(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )


# A process that dies sooner than this after its start waits twice as long before the next
# one, up to the cap; one that ran longer is restarted after the first delay again.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 10.0
RAN_LONG_ENOUGH_S = 10.0
SUPERVISE_EVERY_S = 0.1


class Supervisor:
    """Restarts, with the same command line and environment, a process that exits unasked.

    `stop` takes a process out of `procs` (under `lock`) before ending it, and `kill(...,
    restart=False)` clears its `supervised` flag: neither is restarted. Each exit and
    restart is a line in the fleet's proc log (proc/fleet.log) and in the process's own.
    """

    def __init__(self, procs: dict[str, Proc], log: Path) -> None:
        self.procs = procs
        self.log = log
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="fleet-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SUPERVISE_EVERY_S):
            with self.lock:
                for proc in self.procs.values():
                    self._check(proc)

    def _check(self, proc: Proc) -> None:
        if not proc.supervised or proc.popen.poll() is None:
            return
        now = time.monotonic()
        if proc.restart_at is None:
            ran = now - proc.started
            proc.quick_exits = proc.quick_exits + 1 if ran < RAN_LONG_ENOUGH_S else 0
            delay = min(RESTART_DELAY_MAX_S, RESTART_DELAY_S * 2 ** max(0, proc.quick_exits - 1))
            proc.restart_at = now + delay
            self._note(
                proc, f"exited with {proc.popen.returncode} after {ran:.1f} s; restart in {delay} s"
            )
        elif now >= proc.restart_at:
            proc.popen = _popen(proc.cmd, proc.env, proc.log)
            proc.restarts += 1
            proc.started, proc.restart_at = now, None
            self._note(proc, f"restarted (restart {proc.restarts}, pid {proc.popen.pid})")

    def _note(self, proc: Proc, what: str) -> None:
        line = f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {proc.name}: {what}\n"
        for path in (self.log, proc.log):
            with path.open("a") as fh:
                fh.write(line)
