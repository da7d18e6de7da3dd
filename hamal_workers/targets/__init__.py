"""Targets: where restore points are kept, one module each, found through the registry below.

A target module defines `SPEC = TargetSpec(type=..., open=...)` at its top level, with its
heavy imports (boto3, ...) inside `open`. Adding a target is that module, its `[target]
type` choice and its config section: nothing to edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from hamal_workers.targets.base import Target, TargetError

__all__ = ["TargetSpec", "open_target"]


@dataclass(frozen=True)
class TargetSpec:
    type: str  # the value of [target] type that selects it
    # open(settings, create): the target; create=False makes a missing store an error.
    open: Callable[[Any, bool], Target]


@cache
def registry() -> dict[str, TargetSpec]:
    specs: dict[str, TargetSpec] = {}
    for module in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SPEC", None)
        if isinstance(spec, TargetSpec):
            specs[spec.type] = spec
    return specs


def open_target(settings: Any, *, create: bool = True) -> Target:
    """The target the settings name. create=False: a missing store is an error, not a new one."""
    kind = settings.target.type
    spec = registry().get(kind)
    if spec is None:
        known = ", ".join(sorted(registry()))
        raise TargetError(f"target type {kind!r} is not supported by this version ({known})")
    return spec.open(settings, create)
