"""The Celery app: settings from hamal.conf, queues, routes, reliability, logging hooks.

Settings come from $HAMAL_CONF (else /etc/hamal/hamal.conf), read once per process,
so every process started with the same file derives the same visibility timeout.
"""

from __future__ import annotations

import contextlib
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
    "hamal_workers.tasks.gc",
    "hamal_workers.tasks.mass",
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
    if sender is not None:
        _presence.start(sender.hostname, queues, int(getattr(sender, "concurrency", 1) or 1))


class _Presence:
    """This worker's presence key in Redis: the scan tells a dead worker from a slow queue.

    Renewed by a thread of the worker's main process, the one that holds the messages it
    took from the queues; it expires when that process dies, whatever its children do.
    """

    def __init__(self) -> None:
        self.hostname = ""
        self._state: Any = None
        self._stop = threading.Event()

    @property
    def state(self) -> Any:
        if self._state is None:
            from hamal_workers.state import State

            timeout = settings.redis.socket_timeout
            self._state = State.from_url(settings.redis.url, timeout)
        return self._state

    def start(self, hostname: str, queues: list[str], concurrency: int) -> None:
        self.hostname = hostname
        ttl = float(settings.worker.lease_timeout)
        threading.Thread(
            target=self._run, args=(queues, concurrency, ttl), name="hamal-presence", daemon=True
        ).start()

    def _run(self, queues: list[str], concurrency: int, ttl: float) -> None:
        import logging

        import redis

        while True:
            try:
                self.state.worker_alive(self.hostname, queues, concurrency, ttl)
            except redis.RedisError as exc:
                logging.getLogger("hamal.period").warning("presence: %s", exc)
            if self._stop.wait(ttl / 3):
                return

    def stop(self) -> None:
        self._stop.set()
        if self.hostname:
            with contextlib.suppress(Exception):
                self.state.worker_gone(self.hostname)

    def taken(self, request: Any) -> None:
        """A message left the queue for this worker (it may wait for a free process)."""
        import redis

        kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
        worker = str(getattr(request, "hostname", "") or self.hostname)
        try:
            if request.name == "hamal.disk.sync":
                self.state.disk_received(kwargs.get("run_id", ""), kwargs.get("disk", ""), worker)
        except redis.RedisError:
            pass  # only a hint for the repairs; they fall back on timeouts


_presence = _Presence()


@signals.task_received.connect
def _message_taken(request: Any = None, **_: Any) -> None:
    if request is not None:
        _presence.taken(request)


@signals.worker_shutdown.connect
def _worker_gone(**_: Any) -> None:
    _presence.stop()


@signals.worker_process_shutdown.connect
def _pool_process_gone(**_: Any) -> None:
    # A pool process ends without interpreter-exit handlers: log out of the platforms here.
    from hamal_workers.platforms.shared import close_process_shared

    close_process_shared()


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
