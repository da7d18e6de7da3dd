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
    return {
        "HAMAL_LOCAL_INVENTORY": "",
        "HAMAL_FUSION_COMPUTE_VRM_HOST": "127.0.0.1",
        "HAMAL_FUSION_COMPUTE_VRM_PORT": str(sim.port),
        "HAMAL_FUSION_COMPUTE_USER": sim.user,
        "HAMAL_FUSION_COMPUTE_PASSWORD": sim.password,
        "HAMAL_FUSION_COMPUTE_CA_FILE": str(sim.ca_file),
        "HAMAL_FUSION_COMPUTE_LOCAL_HOST_IP": "127.0.0.1",
        **extra,
    }


def fusion_settings(sim: Any, redis_port: int, **extra: str) -> Settings:
    """Settings as a worker of a fleet on this VRM and this Redis would load them."""
    env = {**fusion_env(sim, **extra), "HAMAL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    return load(str(REFERENCE_CONF), env)
