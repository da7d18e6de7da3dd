"""What every Hamal task shares: settings, Redis state, target, platforms, retry rules.

Retries are Celery's own (`autoretry_for` with exponential backoff and jitter) and only
for transient errors: Redis or broker connection trouble, a platform saying "later".
Anything else fails the disk or run with its message.
"""

from __future__ import annotations

import functools
import logging
import socket

import kombu.exceptions
import redis
from celery import Task

from hamal_workers.config import Settings
from hamal_workers.engine.pipeline import EngineSettings
from hamal_workers.logs import vm_logger
from hamal_workers.platforms import spec
from hamal_workers.platforms.base import Platform, TransientPlatformError
from hamal_workers.state import State
from hamal_workers.targets import open_target
from hamal_workers.targets.base import Target

# Priorities on the `period` queue (Redis: 0 is served first). Work that finishes or
# repairs never waits behind the fan-out of a thousand VMs' syncs.
PRIORITY_CONTROL = 0  # scan, finalize
PRIORITY_MANUAL = 3  # `hamal sync`: an operator is waiting
PRIORITY_SCHEDULED = 6  # the scan's requests
# The longest a retry may wait (Celery's retry_backoff_max): the scan allows for it.
RETRY_BACKOFF_MAX_S = 600


class TransientError(Exception):
    """A failure worth retrying: the same call may work a little later."""


# Only these are retried; anything else fails the disk or run with its message.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
    TransientError,
    TransientPlatformError,
)


class HamalTask(Task):  # type: ignore[misc]
    abstract = True
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 5
    retry_backoff_max = RETRY_BACKOFF_MAX_S
    retry_jitter = True
    max_retries = 5

    @property
    def settings(self) -> Settings:
        from hamal_workers.celery_app import settings

        return settings

    @functools.cached_property
    def state(self) -> State:
        redis_settings = self.settings.redis
        timeout = redis_settings.socket_timeout
        return State.from_url(redis_settings.url, timeout)

    @functools.cached_property
    def target(self) -> Target:
        return open_target(self.settings)

    def platform(self, name: str, vm_id: str = "") -> Platform:
        """A platform session: use it in `with`, so it is released on every exit path.

        In Mass mode a VM's platform is opened with the connection of its Mass task.
        """
        from hamal_workers.mass_sources import open_for_vm

        return open_for_vm(self.settings, self.state, name, vm_id)

    @property
    def lease_ttl(self) -> float:
        return float(self.settings.worker.lease_timeout)

    def engine_settings(self, platform: str) -> EngineSettings:
        s = self.settings
        platform_spec = spec(platform)
        writers = s.target.writers
        cap = platform_spec.max_writers(s)
        return EngineSettings(
            readers=s.data_sync_v2.pre_disk_readers_count,
            writers=min(writers, cap) if cap else writers,
            release_cpu_ms_per_mb=platform_spec.release_cpu_ms_per_mb(s),
            checkpoint_every_s=float(s.data_sync_v2.fsync_period_frequency),
            fsync_timeout_s=float(s.data_sync_v2.fsync_timeout),
            progress_every_s=float(s.period.task_update_wait_time),
        )

    def vm_log(self, vm_name: str, vm_id: str) -> logging.Logger:
        return vm_logger(self.settings, vm_name, vm_id)

    @property
    def worker_name(self) -> str:
        return str(getattr(self.request, "hostname", None) or socket.gethostname())
