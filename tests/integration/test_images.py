"""Dockerfile.worker and Dockerfile.beat without a Docker engine: their shape, and their RUN
steps (scripts of deploy/image/) run here -- system packages, the user, the project's venv
with the Debian bindings -- so a broken install step fails here, not in a build."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.test_install import release

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = (REPO / dockerfile).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


@pytest.mark.parametrize("role", ["worker", "beat"])
def test_each_image_is_bookworm_built_by_tested_scripts_and_runs_unprivileged(role: str) -> None:
    steps = instructions(f"Dockerfile.{role}")
    assert steps[0] == ("FROM", "debian:bookworm-slim")
    runs = [arg for op, arg in steps if op == "RUN"]
    for run in runs:
        script = re.match(r"bash /build/(\S+)", run)
        assert script, run
        assert (REPO / script.group(1)).is_file(), run
    assert any(f"project.sh /src /opt/hamal/hamal-venv {role}" in r for r in runs)
    assert ("COPY", ". /src") in steps  # the same build context: the same version in both
    assert [arg for op, arg in steps if op == "USER"] == ["hamal"]
    compose = yaml.safe_load((REPO / "docker-compose-hamal.yaml").read_text())
    images = {name: s["image"] for name, s in compose["services"].items() if name != "redis"}
    wanted = "hamal-beat" if role == "beat" else "hamal-worker"
    users = [n for n, image in images.items() if image.startswith(f"{wanted}:")]
    assert users and all(images[n].endswith(":${HAMAL_VERSION:-latest}") for n in users)


def test_the_run_steps_install_what_the_services_import(tmp_path: Path) -> None:
    image = REPO / "deploy" / "image"
    for role in ("beat", "worker"):
        done = subprocess.run(["bash", str(image / "system-packages.sh"), role],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    # The user, in a copy of this machine's /etc files; twice changes nothing.
    prefix = tmp_path / "image-root"
    (prefix / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if Path("/etc", name).exists():
            shutil.copy(Path("/etc", name), prefix / "etc" / name)
    for _ in range(2):
        done = subprocess.run(["bash", str(image / "user.sh")], env={"PREFIX": str(prefix),
                              "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    users = [line for line in (prefix / "etc" / "passwd").read_text().splitlines()
             if line.startswith("hamal:")]  # fmt: skip
    assert users == ["hamal:x:10001:10001::/var/lib/hamal:/usr/sbin/nologin"]

    # The project's venv of the worker: the Debian bindings and the disk task import.
    src = release(tmp_path, "0.1.0")
    venv = tmp_path / "hamal-venv"
    done = subprocess.run(["bash", str(image / "project.sh"), str(src), str(venv), "worker"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"image-worker: hamal 0.1.0 in {venv}" in done.stdout
