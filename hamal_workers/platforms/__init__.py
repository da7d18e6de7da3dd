"""Source platforms: one module each, found through the registry below.

A platform module defines `SPEC = PlatformSpec(...)` at its top level and keeps its heavy
imports (pyvmomi, rbd, ...) inside the factory, so that listing the registry is cheap.
Adding a platform is that module plus its config section: no list to edit here, nor of
queues (each platform's disk tasks go to the Celery queue named after it).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from hamal_workers.platforms.base import Platform, PlatformError

if TYPE_CHECKING:
    from hamal_workers.config import Settings


@dataclass(frozen=True)
class PlatformSpec:
    """What the rest of Hamal needs to know of a platform without opening it."""

    name: str  # the registry key, the Celery queue of its disk tasks, the points' platform
    enabled: Callable[[Settings], bool]  # does hamal.conf configure a source of this kind?
    create: Callable[[Settings], Platform]
    # [period] *_release_cpu_time: milliseconds slept per MB read from this platform.
    release_cpu_ms_per_mb: Callable[[Settings], int] = lambda settings: 0
    # A cap on the writer threads of its disk syncs, when the platform has one.
    max_writers: Callable[[Settings], int | None] = lambda settings: None


@cache
def registry() -> dict[str, PlatformSpec]:
    specs: dict[str, PlatformSpec] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SPEC", None)
        if isinstance(spec, PlatformSpec):
            specs[spec.name] = spec
    return dict(sorted(specs.items()))


def spec(name: str) -> PlatformSpec:
    try:
        return registry()[name]
    except KeyError:
        known = ", ".join(registry()) or "none"
        raise PlatformError(f"platform {name!r} is not available (known: {known})") from None


def platform_names() -> list[str]:
    return list(registry())


def enabled_platforms(settings: Settings) -> list[str]:
    """Platforms the scan looks at: those whose section configures a source."""
    return [name for name, s in registry().items() if s.enabled(settings)]


def open_platform(name: str, settings: Settings) -> Platform:
    """A platform session; use it in `with`, so it is released on every exit path."""
    return spec(name).create(settings)
