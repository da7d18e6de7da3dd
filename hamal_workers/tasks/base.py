"""What every Hamal task shares: settings, Redis state, target, platforms, retry rules."""

from __future__ import annotations

import functools
import logging
import socket
from typing import Any

import kombu.exceptions
import redis
from celery import Task

from hamal_workers.config import Settings
from hamal_workers.engine.pipeline import EngineSettings
from hamal_workers.logs import vm_logger
from hamal_workers.platforms import open_platform, release_cpu_ms_per_mb
from hamal_workers.platforms.base import Platform
from hamal_workers.state import State
from hamal_workers.targets import open_target
from hamal_workers.targets.base import Target


class TransientError(Exception):
    """A failure worth retrying: the same call may work a little later."""


# Only these are retried; anything else fails the disk or run with its message.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
    TransientError,
)


class HamalTask(Task):  # type: ignore[misc]
    abstract = True
    retry_backoff = True
    retry_backoff_max = 600
    retry_jitter = True
    max_retries = 5

    @property
    def settings(self) -> Settings:
        from hamal_workers.celery_app import settings

        return settings

    @functools.cached_property
    def state(self) -> State:
        return State.from_url(self.settings.redis.url)

    @functools.cached_property
    def target(self) -> Target:
        return open_target(self.settings)

    def platform(self, name: str) -> Platform:
        return open_platform(name, self.settings)

    @property
    def lease_ttl(self) -> float:
        return float(self.settings.worker.lease_timeout)

    def engine_settings(self, platform: str) -> EngineSettings:
        s = self.settings
        return EngineSettings(
            readers=s.data_sync_v2.pre_disk_readers_count,
            writers=s.fusion_compute.max_writer_num,
            release_cpu_ms_per_mb=release_cpu_ms_per_mb(platform, s),
            checkpoint_every_s=float(s.data_sync_v2.fsync_period_frequency),
            fsync_timeout_s=float(s.data_sync_v2.fsync_timeout),
            progress_every_s=float(s.period.task_update_wait_time),
        )

    def vm_log(self, vm_name: str, vm_id: str) -> logging.Logger:
        return vm_logger(self.settings, vm_name, vm_id)

    @property
    def worker_name(self) -> str:
        return str(getattr(self.request, "hostname", None) or socket.gethostname())

    def progress(self, **meta: Any) -> None:
        if not self.request.called_directly:
            self.update_state(state="PROGRESS", meta=meta)
