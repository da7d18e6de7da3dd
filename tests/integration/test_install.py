"""install_hamal.sh, update_sync_proxy.sh and uninstall_hamal.sh under a temporary root, with
a stand-in for docker-compose that records what it is asked and answers `ps` like it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)

STANDIN = '''#!{python}
"""docker-compose, as far as the scripts use it: -f FILE --env-file ENV, then a command."""
import json, os, sys
import yaml
args = sys.argv[1:]
file = args[args.index("-f") + 1]
env_file = args[args.index("--env-file") + 1]
command = [a for i, a in enumerate(args) if i > args.index("--env-file") + 1]
env = dict(line.strip().split("=", 1) for line in open(env_file) if "=" in line)
with open(os.environ["STANDIN_LOG"], "a") as log:
    log.write(json.dumps({{"command": command, "version": env.get("HAMAL_VERSION")}}) + "\\n")
services = list(yaml.safe_load(open(file))["services"])
if command[:2] == ["config", "--services"]:
    print("\\n".join(services))
elif command[:1] == ["ps"]:
    bad = env.get("HAMAL_VERSION") == os.environ.get("STANDIN_BAD_VERSION")
    print("NAME   SERVICE   STATUS")
    for s in services:
        print(f"hamal-{{s}}-1   {{s}}   Up 9 seconds ({{'unhealthy' if bad else 'healthy'}})")
'''


def release(tmp: Path, version: str) -> Path:
    """A copy of this source tree that builds `version`."""
    dest = tmp / f"release-{version}"
    shutil.copytree(
        REPO, dest,
        ignore=shutil.ignore_patterns(".venv", ".git", ".testrun*", ".bench", ".demo", ".chaos",
                                      "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                                      ".hypothesis", "mutants", "build"),
    )  # fmt: skip
    pyproject = dest / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('version = "0.1.0"', f'version = "{version}"')
    )
    init = dest / "hamal_workers" / "__init__.py"
    init.write_text(init.read_text().replace('"0.1.0"', f'"{version}"'))
    return dest


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )


def calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_install_update_roll_back_and_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    standin = tmp_path / "docker-compose"
    standin.write_text(STANDIN.format(python=sys.executable))
    standin.chmod(standin.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "compose.log"
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "HAMAL_ROOT": str(root),
        "DOCKER_COMPOSE": str(standin), "STANDIN_LOG": str(log), "HAMAL_HEALTH_TIMEOUT": "0",
    }  # fmt: skip
    first, second = release(tmp_path, "0.1.0"), release(tmp_path, "0.2.0")
    opt, etc = root / "opt" / "hamal", root / "etc" / "hamal"

    done = run(first / "deploy" / "install_hamal.sh", env)
    assert done.returncode == 0, done.stdout + done.stderr
    venv = opt / "hamal-venv"
    for name in ("bin", "etc", "include", "lib", "project_etc", "tools", "pyvenv.cfg",
                 "version", "hamal3-changelog.txt"):  # fmt: skip
        assert (venv / name).exists(), name
    for name in ("docker-compose-hamal.yaml", "update_sync_proxy.sh", "uninstall_hamal.sh"):
        assert (opt / name).is_file(), name
    assert (venv / "version").read_text().strip() == "0.1.0"
    shown = subprocess.run(
        [str(venv / "bin" / "hamal"), "--version"], capture_output=True, text=True
    )
    assert shown.stdout.strip() == "hamal 0.1.0"
    assert (etc / "hamal.conf").read_text() == (REPO / "etc" / "hamal" / "hamal.conf").read_text()
    dotenv = opt / ".env"
    assert stat.S_IMODE(dotenv.stat().st_mode) == 0o600
    password = dict(line.split("=", 1) for line in dotenv.read_text().splitlines())
    assert len(password["HAMAL_REDIS_PASSWORD"]) >= 32 and password["HAMAL_VERSION"] == "0.1.0"
    assert password["HAMAL_REDIS_PASSWORD"] not in done.stdout + done.stderr
    assert (root / "var" / "log" / "hamal").is_dir() and (root / "var" / "lib" / "hamal").is_dir()
    assert [c["command"] for c in calls(log)] == [["up", "-d"]]

    # Again: nothing rebuilt, the operator's config and the password kept.
    (etc / "hamal.conf").write_text(
        (etc / "hamal.conf").read_text() + "\n# edited by an operator\n"
    )
    built = (venv / "version").stat().st_mtime_ns
    again = run(first / "deploy" / "install_hamal.sh", env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "hamal-venv 0.1.0 is in place" in again.stdout
    assert (venv / "version").stat().st_mtime_ns == built
    assert (etc / "hamal.conf").read_text().endswith("# edited by an operator\n")
    assert dotenv.read_text() == "\n".join(f"{k}={v}" for k, v in password.items()) + "\n"

    # An update whose services never turn healthy is rolled back.
    bad = run(opt / "update_sync_proxy.sh", {**env, "STANDIN_BAD_VERSION": "0.2.0"}, str(second))
    assert bad.returncode == 1
    assert "update to 0.2.0 failed and was rolled back to 0.1.0" in bad.stderr
    assert (venv / "version").read_text().strip() == "0.1.0"
    assert "HAMAL_VERSION=0.1.0" in dotenv.read_text()
    assert calls(log)[-1] == {"command": ["up", "-d"], "version": "0.1.0"}

    # A good one: the new venv, the compose file restarted on it, the config untouched.
    good = run(opt / "update_sync_proxy.sh", env, str(second))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "updated from 0.1.0 to 0.2.0" in good.stdout
    assert (venv / "version").read_text().strip() == "0.2.0"
    assert {"command": ["up", "-d"], "version": "0.2.0"} in calls(log)
    assert (etc / "hamal.conf").read_text().endswith("# edited by an operator\n")

    # Uninstall keeps the config and the logs; --purge removes them; twice is fine.
    gone = run(opt / "uninstall_hamal.sh", env)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert calls(log)[-1]["command"] == ["down"]
    assert not opt.exists() and (etc / "hamal.conf").exists()
    purge = run(first / "deploy" / "uninstall_hamal.sh", env, "--purge")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not etc.exists() and not (root / "var" / "log" / "hamal").exists()
