"""docker-compose-hamal.yaml without a Docker engine: valid against the Compose schema, and
every service's command, environment and healthcheck run as local processes until every
healthcheck passes -- so a wrong command line or module path fails here, not on a host.

What compose would do is done here as little as possible: its variable interpolation
(`${VAR}`, `${VAR:-default}`, `${VAR:?error}`, `$$`), the YAML merge keys, and the mounts
and network seen from one host: the container paths /etc/hamal, /var/log/hamal and
/var/lib/hamal become directories of the test, the host `redis` becomes 127.0.0.1, and the
ports 6379 and 9464 become free ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from hamal_workers.localfleet import free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose-hamal.yaml"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"

pytestmark = pytest.mark.timeout(240)

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every string in `value` (the spec's rules)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        have = env.get(name)
        empty = have is None or (have == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-") and empty:
            return arg
        if op in ("?", ":?") and empty:
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return have or ""

    return _VARIABLE.sub(one, value)


def schema_errors(doc: Any) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_the_compose_file_is_valid_against_the_compose_schema() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert schema_errors(doc) == []
    services = doc["services"]
    queues = {s[len("worker-") :] for s in services if s.startswith("worker-")}
    from hamal_workers.config import queue_names

    # One worker service per queue the product routes to.
    assert queues == set(queue_names())
    for name, service in services.items():
        assert "healthcheck" in service, name
        assert service["restart"] == "unless-stopped", name
    # The check can fail: a healthcheck that is not a command list is refused.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["beat"]["healthcheck"]["test"] = 5
    assert any("healthcheck" in e for e in schema_errors(broken))


class Service:
    def __init__(self, name: str, spec: dict[str, Any], paths: dict[str, str]) -> None:
        self.name = name
        self.env = {k: _mapped(str(v), paths) for k, v in (spec.get("environment") or {}).items()}
        self.command = [_mapped(str(a), paths) for a in spec["command"]]
        test = [_mapped(str(a), paths) for a in spec["healthcheck"]["test"]]
        self.check = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, base_env: dict[str, str], out: Path) -> None:
        self.log = out / f"{self.name}.out"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, env={**base_env, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def healthy(self, base_env: dict[str, str]) -> tuple[bool, str]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
            )
        done = subprocess.run(
            self.check, env={**base_env, **self.env}, capture_output=True, text=True, timeout=60
        )
        return done.returncode == 0, (done.stdout + done.stderr).strip()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)


def _mapped(text: str, paths: dict[str, str]) -> str:
    for old, new in paths.items():
        text = text.replace(old, new)
    return text


def test_every_service_starts_from_the_compose_file_and_turns_healthy(tmp_path: Path) -> None:
    password, flower_password = "compose-canary-9f3a", "flower-canary-77b1"
    redis_port, metrics_port, flower_port = free_port(), free_port(), free_port()
    root = tmp_path / "host"
    etc, logs, lib = root / "etc" / "hamal", root / "log" / "hamal", root / "lib" / "hamal"
    for d in (etc, logs, lib / "redis"):
        d.mkdir(parents=True)
    shutil.copy(REPO / "etc" / "hamal" / "hamal.conf", etc / "hamal.conf")
    conf = (REPO / "etc" / "hamal" / "redis.conf").read_text()
    conf = conf.replace("bind * -::*", "bind 127.0.0.1")
    (etc / "redis.conf").write_text(conf)
    # The mounts and the compose network, seen from this host.
    paths = {
        "/etc/hamal": str(etc), "/var/log/hamal": str(logs), "/var/lib/hamal": str(lib),
        "dir /data": f"dir {lib / 'redis'}", "@redis:": "@127.0.0.1:",
        "6379": str(redis_port), "9464": str(metrics_port), "5555": str(flower_port),
    }  # fmt: skip
    (etc / "redis.conf").write_text(_mapped((etc / "redis.conf").read_text(), paths))
    secrets = {"HAMAL_REDIS_PASSWORD": password, "HAMAL_FLOWER_PASSWORD": flower_password}
    doc = interpolate(yaml.safe_load(COMPOSE.read_text()), secrets)
    services = [Service(name, spec, paths) for name, spec in doc["services"].items()]
    venv_bin = str(Path(sys.executable).parent)
    base_env = {
        "PATH": f"{venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        # What each container has on its own: a /tmp of its own for the beat's heartbeat.
        "HAMAL_BEAT_HEARTBEAT_FILE": str(tmp_path / "beat-heartbeat.json"),
        # The reference config's defaults, as the container paths it names.
        "HAMAL_DEFAULT_LOG_DIR": str(logs),
        "HAMAL_DEFAULT_HAMAL_LIB_DIR": str(lib),
        "HAMAL_DEFAULT_HAMAL_INFO_PATH": str(lib / "hamal_info"),
        "HAMAL_TARGET_PATH": str(lib / "store"),
    }
    out = tmp_path / "out"
    out.mkdir()
    try:
        redis_service = next(s for s in services if s.name == "redis")
        redis_service.start(base_env, out)  # depends_on: redis healthy first
        _wait_healthy([redis_service], base_env)
        for service in services:
            if service is not redis_service:
                service.start(base_env, out)
        found = _wait_healthy(services, base_env)
    finally:
        codes = {s.name: s.stop() for s in reversed(services)}
    assert set(found) == {s.name for s in services}, found
    assert "holds the lock" in found["beat"], found["beat"]
    for name, line in found.items():
        if name.startswith("worker-"):
            assert line.startswith(f"worker {name[len('worker-') :]}@") and "answers" in line
    assert found["metrics"].startswith(f"metrics: http://127.0.0.1:{metrics_port}/metrics")
    assert found["flower"] == f"flower: http://127.0.0.1:{flower_port}/healthcheck answers 'OK'"
    # Stopped by SIGTERM, every service ends on its own (no SIGKILL needed).
    assert all(code is not None for code in codes.values()), codes
    written = "".join(p.read_text(errors="replace") for p in out.glob("*.out"))
    written += "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    assert password not in written and flower_password not in written


def _wait_healthy(services: list[Service], base_env: dict[str, str]) -> dict[str, str]:
    """Run each healthcheck until it passes, as compose does on its interval."""
    found: dict[str, str] = {}
    last: dict[str, str] = {}
    deadline = time.monotonic() + 150
    while len(found) < len(services):
        for service in services:
            if service.name not in found:
                ok, line = service.healthy(base_env)
                (found if ok else last)[service.name] = line
        if time.monotonic() > deadline:
            raise AssertionError(
                f"never healthy: { {k: v for k, v in last.items() if k not in found} }"
            )
        if len(found) < len(services):
            time.sleep(1.0)  # a healthcheck's interval: compose polls too
    return found
