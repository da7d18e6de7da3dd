"""How the FusionCompute tests point the proxy at the project's simulator."""

from __future__ import annotations

import hashlib
from typing import Any

from hamal_workers.config import Settings, load
from hamal_workers.localfleet import REFERENCE_CONF

MiB = 1 << 20


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fusion_env(sim: Any, **extra: str) -> dict[str, str]:
    """The fleet's environment for this VRM (local platform off)."""
    return {"HAMAL_LOCAL_INVENTORY": "", **sim.hamal_env(), **extra}


def fusion_settings(sim: Any, redis_port: int, **extra: str) -> Settings:
    """Settings as a worker of a fleet on this VRM and this Redis would load them."""
    env = {**fusion_env(sim, **extra), "HAMAL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    return load(str(REFERENCE_CONF), env)


def operator(sim: Any) -> Any:
    """A requests session logged in to the VRM as its operator would be (not the proxy)."""
    import requests

    session = requests.Session()
    session.verify = str(sim.ca_file)
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace `verify`
    answer = session.post(f"{sim.start()}/service/session", headers={
        "X-Auth-User": sim.user, "X-Auth-Key": sim.password, "X-ENCRIPT-ALGORITHM": "1",
        "X-Auth-UserType": "2"})  # fmt: skip
    answer.raise_for_status()
    session.headers["X-Auth-Token"] = answer.headers["X-Auth-Token"]
    return session


def operator_snapshot(sim: Any, session: Any, vm: str, name: str) -> dict[str, Any]:
    """A snapshot the operator takes; the answer's {urn, uri, taskUri}."""
    vm_uri = next(v["uri"] for v in sim.admin_vms() if v["uuid"] == vm)
    made = session.post(f"{sim.start()}{vm_uri}/snapshots", json={"name": name, "type": "normal"})
    made.raise_for_status()
    return dict(made.json())
