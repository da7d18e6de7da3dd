"""No secret reaches an output or a file: a fleet whose every credential is a canary.

The Redis of this fleet requires a password, and hamal.conf holds a canary in every setting
that can carry a credential. Every `hamal` command, every Celery introspection command, a
worker and a beat run against it; then their outputs, the log directory and the lib directory
are searched for each canary as written and as URL-encoded.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
import redis
from celery import Celery

from hamal_workers.config import KEYS, Key
from hamal_workers.localfleet import LocalFleet, wait_for
from hamal_workers.simulators.local_vms import ImageLayout, make_inventory
from tests.integration.conftest import TESTRUN, Events

MiB = 1024 * 1024
TINY = ImageLayout(size=4 * MiB, random_bytes=MiB, compressible_bytes=MiB, zero_bytes=0, piece=MiB)
# Characters URL-encoding changes, so both forms are looked for.
REDIS_PASSWORD = "c4nary-redis/pw+1%"
MASS_PASSWORD = "c4nary-mass:pw@2"
SECRET_KEYS = [key for key in KEYS if key.secret]


def canary_of(key: Key) -> str:
    return f"c4nary-{key.name}-3"


CANARIES = [REDIS_PASSWORD, MASS_PASSWORD] + [canary_of(key) for key in SECRET_KEYS]

INSPECTIONS = ["conf", "stats", "active", "reserved", "scheduled", "registered", "report"]


def mass_public_key(directory: Path) -> Path:
    """Mass mode needs Mass' public key (config check reads it); any Ed25519 one will do."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = Ed25519PrivateKey.generate().public_key()
    path = directory / "mass-public-key.pem"
    path.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return path


def canary_config(fleet: LocalFleet) -> Path:
    sections = {
        "mass": [
            f"mass_endpoint = https://hamal:{quote(MASS_PASSWORD, safe='')}@127.0.0.1:9/api",
            "hyper_exporter_id = exporter-canary",
            f"public_key_path = {mass_public_key(fleet.root)}",
        ],
        "redis": [f"url = {fleet.redis_url}"],
    }
    for key in SECRET_KEYS:
        sections.setdefault(key.section, []).append(f"{key.name} = {canary_of(key)}")
    # A secret key set alone is refused: an S3 secret needs its (public) access key id.
    sections["s3"].append("access_key = AKIA-not-a-secret")
    path = fleet.root / "hamal.conf"
    path.write_text(
        "".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())
    )
    return path


@pytest.fixture
def canary_fleet(request: pytest.FixtureRequest) -> Iterator[LocalFleet]:
    root = TESTRUN / request.node.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fleet = LocalFleet(root, redis_password=REDIS_PASSWORD)
    fleet.start_redis()  # its own, on a free port: the session Redis has no password
    fleet.config = canary_config(fleet)
    fleet.overrides = {
        "HAMAL_LOCAL_INVENTORY": str(root / "inventory"),
        "HAMAL_PERIOD_INTERVAL": "5",
    }
    make_inventory(root / "inventory", vms=1, disks=1, layout=TINY)
    yield fleet
    fleet.stop_all()


def run(fleet: LocalFleet, *command: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        list(command),
        env=env or fleet.env(),
        cwd=fleet.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"


def hamal(fleet: LocalFleet, *args: str, env: dict[str, str] | None = None) -> str:
    return run(fleet, sys.executable, "-m", "hamal_workers.cli", *args, env=env)


def celery(fleet: LocalFleet, *args: str) -> str:
    return run(fleet, sys.executable, "-m", "celery", *args)


def wait_answering(fleet: LocalFleet, names: list[str]) -> None:
    """Until every named worker answers a ping, asked through this fleet's Redis."""
    app = Celery("canary-test", broker=fleet.redis_url, set_as_current=False)
    wanted = {f"{name}@{socket.gethostname()}" for name in names}

    def answering() -> bool:
        replies = app.control.ping(destination=sorted(wanted), timeout=0.5)
        return {name for reply in replies for name in reply} == wanted

    wait_for(answering, 60, f"workers {', '.join(sorted(wanted))} to answer ping", every=0.2)
    app.close()


def hamal_outputs(fleet: LocalFleet) -> dict[str, str]:
    malformed = {
        **fleet.env(),
        "HAMAL_REDIS_URL": f"redis://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:99999999/0",
    }
    outputs = {
        "hamal config check": hamal(fleet, "config", "check"),
        "hamal config show": hamal(fleet, "config", "show"),
        "hamal config check, malformed URL": hamal(fleet, "config", "check", env=malformed),
        "hamal status": hamal(fleet, "status"),
        "hamal points": hamal(fleet, "points"),
        "hamal points --vm": hamal(fleet, "points", "--vm", "vm01"),
        "hamal sync": hamal(fleet, "sync", "--vm", "vm01"),
        "hamal sync --wait": hamal(fleet, "sync", "--vm", "vm01", "--wait", "--timeout", "2"),
        "hamal sync unknown VM": hamal(fleet, "sync", "--vm", "nope"),
        "hamal verify": hamal(fleet, "verify", "--vm", "vm01"),
        "hamal restore, no such disk": hamal(
            fleet, "restore", "--vm", "vm01", "--disk", "nope", "--to", str(fleet.root / "x")
        ),
        "hamal restore, no arguments": hamal(fleet, "restore"),
    }
    assert "OK (" in outputs["hamal config check"]
    assert "auth_key = ***" in outputs["hamal config show"]
    assert "Running syncs" in outputs["hamal status"]
    return outputs


def celery_outputs(fleet: LocalFleet) -> dict[str, str]:
    outputs = {
        f"celery inspect {what}": celery(
            fleet, "-A", "hamal_workers", "inspect", what, "--timeout", "2"
        )
        for what in INSPECTIONS
    }
    outputs["celery report"] = celery(fleet, "report")
    outputs["celery report -A"] = celery(fleet, "-A", "hamal_workers", "report")
    outputs["celery status"] = celery(fleet, "-A", "hamal_workers", "status")
    # The commands did show what may hold a secret, else the search proves nothing.
    assert "redbeat_redis_url" in outputs["celery inspect conf"], outputs["celery inspect conf"]
    assert "redbeat_redis_url" in outputs["celery report -A"], outputs["celery report -A"]
    assert "broker" in outputs["celery inspect stats"], outputs["celery inspect stats"]
    assert "2 nodes online" in outputs["celery status"], outputs["celery status"]
    return outputs


def files_under(*folders: Path) -> dict[str, bytes]:
    return {
        str(path): path.read_bytes()
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file()
    }


def leaks(texts: dict[str, bytes]) -> list[str]:
    forms = {
        form
        for canary in CANARIES
        for form in (canary, quote(canary, safe=""), quote_plus(canary), quote(canary))
    }
    return [
        f"{form!r} in {name}"
        for name, data in texts.items()
        for form in sorted(forms)
        if form.encode() in data
    ]


@pytest.mark.timeout(600)
def test_no_canary_reaches_an_output_a_log_or_the_lib_directory(canary_fleet: LocalFleet) -> None:
    fleet = canary_fleet
    events = Events(redis.Redis.from_url(fleet.redis_url))
    fleet.start_worker("period", ["period"], concurrency=1)
    fleet.start_worker("local", ["local"], concurrency=1)
    wait_answering(fleet, ["period", "local"])
    fleet.start_beat()
    events.wait(lambda event: event["event"] == "scan", 60, "the beat's first scan")

    outputs = hamal_outputs(fleet) | celery_outputs(fleet)
    events.pubsub.close()
    fleet.stop_all()  # so their last lines are written too

    texts = {name: text.encode() for name, text in outputs.items()}
    texts |= files_under(fleet.root / "log", fleet.root / "lib", fleet.root / "proc")
    assert any(name.endswith("hamal-period.log") for name in texts)
    assert leaks(texts) == []
