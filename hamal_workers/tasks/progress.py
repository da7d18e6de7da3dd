"""Progress of disk tasks where operators look: `celery inspect active` and Redis.

The worker's main process answers `inspect active` from its request objects, which
know nothing of what the child process has done; this Request adds the progress the
child last recorded in Redis, so `celery -A hamal_workers inspect active` shows it.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

_state = None


def _shared_state() -> Any:
    global _state
    if _state is None:
        from hamal_workers.celery_app import settings
        from hamal_workers.state import State

        _state = State.from_url(settings.redis.url)
    return _state


def disk_progress(fields: dict[str, str]) -> dict[str, Any]:
    done = int(float(fields.get("done_bytes") or 0))
    total = int(float(fields.get("total_bytes") or 0))
    return {
        "state": fields.get("state", ""),
        "done_bytes": done,
        "total_bytes": total,
        "percent": round(100.0 * done / total, 1) if total else 0.0,
    }


class DiskSyncRequest(Request):  # type: ignore[misc]
    def info(self, safe: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = super().info(safe=safe)
        kwargs = self._kwargs if isinstance(self._kwargs, dict) else {}
        hamal: dict[str, Any] = {
            "vm": kwargs.get("vm_name"),
            "disk": kwargs.get("disk"),
            "run_id": kwargs.get("run_id"),
        }
        try:
            status = _shared_state().disk(kwargs["run_id"], kwargs["disk"])
            hamal.update(disk_progress(status.fields))
        except Exception as exc:  # noqa: BLE001 - inspect must answer even without Redis
            hamal["progress_error"] = type(exc).__name__
        info["hamal"] = hamal
        return info
