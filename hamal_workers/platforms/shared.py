"""What a worker process keeps across its tasks for a platform: connections and sessions.

A vCenter session, a Keystone token, a librados connection (which starts threads) are
worth one per process, not one per task.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_shared: dict[tuple[object, ...], Any] = {}


def process_shared(kind: str, settings: object, make: Callable[[], Any]) -> Any:
    """The `kind` object of this process for these (frozen, hashable) settings."""
    key = (kind, os.getpid(), settings)  # never a handle inherited across fork
    with _lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = make()
        return found


_closers: list[Callable[[], None]] = []


def at_process_exit(close: Callable[[], None]) -> None:
    """Run `close` (a logout) when this process ends: at interpreter exit, and when Celery
    stops a pool process, which ends without running interpreter-exit handlers."""
    _closers.append(close)
    atexit.register(close)


def close_process_shared() -> None:
    """Log out of every session this process holds; each closer may run twice (harmless)."""
    while _closers:
        close = _closers.pop()
        with contextlib.suppress(Exception):
            close()
