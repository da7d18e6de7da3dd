"""What a worker process keeps across its tasks for a platform: connections and sessions.

A vCenter session, a Keystone token, a librados connection (which starts threads) are
worth one per process, not one per task.
"""

from __future__ import annotations

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
