"""Targets: where restore points are kept. `open_target` picks one from the settings."""

from __future__ import annotations

from typing import Protocol

from hamal_workers.targets.base import Target, TargetError
from hamal_workers.targets.chunkstore import ChunkStore

__all__ = ["open_target"]


class _TargetSettings(Protocol):
    @property
    def type(self) -> str: ...

    @property
    def path(self) -> str: ...


class _Settings(Protocol):
    @property
    def target(self) -> _TargetSettings: ...


def open_target(settings: _Settings, *, create: bool = True) -> Target:
    """The target the settings name. create=False: a missing store is an error, not a new one."""
    kind = settings.target.type
    if kind == "local":
        return ChunkStore(settings.target.path, create=create)
    raise TargetError(f"target type {kind!r} is not supported by this version (supported: local)")
