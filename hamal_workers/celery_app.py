"""The Celery app: settings from hamal.conf, queues, routes, reliability, logging hooks.

Settings come from $HAMAL_CONF (else /etc/hamal/hamal.conf), read once per process,
so every process started with the same file derives the same visibility timeout.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from celery import Celery, signals

import beat_schedule
from hamal_workers.config import ConfigError, Settings, celery_settings, config_path, load
from hamal_workers.info import ProcessInfo, ensure_lib_dir
from hamal_workers.logs import celery_logging_hook

TASK_MODULES = [
    "hamal_workers.tasks.scan",
    "hamal_workers.tasks.vm_sync",
    "hamal_workers.tasks.disk_sync",
    "hamal_workers.tasks.finalize",
]


def _settings_or_exit() -> Settings:
    try:
        return load(config_path(None, os.environ), os.environ)
    except ConfigError as exc:
        # A worker started with a bad config says what is wrong, not a traceback.
        for line in exc.problems:
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def _role() -> str:
    """What this process is, for log lines and the info file."""
    args = sys.argv[1:]
    for role in ("worker", "beat"):
        if role in args:
            return role
    return "client"


settings = _settings_or_exit()
app = Celery("hamal_workers", include=TASK_MODULES)
app.conf.update(celery_settings(settings))
app.conf.beat_schedule = beat_schedule.build(settings)

signals.setup_logging.connect(celery_logging_hook(settings, _role()), weak=False)
_info = ProcessInfo()


def _keep_info_current() -> None:
    # Readers tell a live process from a dead one by how recent its entry is.
    while not _info_stop.wait(float(settings.period.interval)):
        _info.refresh()


_info_stop = threading.Event()


@signals.worker_ready.connect
def _register_worker(sender: Any = None, **_: Any) -> None:
    ensure_lib_dir(settings)
    queues = [q.name for q in sender.app.amqp.queues.consume_from.values()] if sender else []
    _info.register(settings, "worker", queues)
    _warn_unless_noeviction()
    threading.Thread(target=_keep_info_current, name="hamal-info", daemon=True).start()


def _warn_unless_noeviction() -> None:
    """kombu keeps queue bindings in Redis keys: an evicting Redis silently loses them."""
    import logging

    import redis

    log = logging.getLogger("hamal.period")
    try:
        policy = redis.Redis.from_url(settings.redis.url).config_get("maxmemory-policy")
    except redis.RedisError as exc:  # CONFIG may be disabled on managed Redis
        log.info("could not read Redis maxmemory-policy (%s); it must be noeviction", exc)
        return
    value = policy.get("maxmemory-policy", b"")
    value = value.decode() if isinstance(value, bytes) else str(value)
    if value != "noeviction":
        log.warning(
            "Redis maxmemory-policy is %r: set it to noeviction, or queued tasks and "
            "checkpoints can be evicted under memory pressure",
            value,
        )


@signals.beat_init.connect
def _register_beat(sender: Any = None, **_: Any) -> None:
    ensure_lib_dir(settings)
    _info.register(settings, "beat", [])
    threading.Thread(target=_keep_info_current, name="hamal-info", daemon=True).start()
