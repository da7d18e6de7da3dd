"""Source platforms, one module each, behind platforms/base.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hamal_workers.platforms.base import Platform, PlatformError

if TYPE_CHECKING:
    from hamal_workers.config import Settings


def enabled_platforms(settings: Settings) -> list[str]:
    """Platforms the scan looks at: those whose section configures a source."""
    names = []
    if settings.local.inventory:
        names.append("local")
    return names


def open_platform(name: str, settings: Settings) -> Platform:
    if name == "local":
        from hamal_workers.platforms.local import LocalPlatform

        return LocalPlatform(settings.local.inventory, settings.default.hamal_lib_dir)
    raise PlatformError(f"platform {name!r} is not available in this version")


def release_cpu_ms_per_mb(name: str, settings: Settings) -> int:
    """[period] *_release_cpu_time applies to the platform whose reads it throttles."""
    if name == "vmware":
        return settings.period.vmware_release_cpu_time
    if name == "ceph":
        return settings.period.openstack_release_cpu_time
    if name == "local":
        return settings.local.release_cpu_time
    return 0
