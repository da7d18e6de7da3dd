"""The beat scheduler: RedBeat, made to outlive a flushed, restarted or unreachable Redis.

RedBeat 2.4.2 takes its lock once (in beat_init) and writes the schedule once (at start).
After a FLUSHALL the active beat dies on its next lock extend (LockNotOwnedError,
sibson/redbeat#230), and a standby that then takes the free lock finds no schedule to
run; a dropped connection ends the beat as well (#285). Here every tick first makes sure
this beat holds the lock (extending it, or taking it when it is free) and that the
schedule is in Redis, and a Redis error costs one tick, not the process.

Only the holder of the lock emits, and taking it is one SET NX: two beats never both
send a scan.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import kombu.exceptions
import redis
from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, RedBeatScheduler, get_redis

logger = logging.getLogger("celery.beat")

# Redis unreachable, restarting or still loading its AOF: try again on the next tick.
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
)


# Each tick says how it went here, for the healthcheck (`python -m hamal_workers.health
# beat`): a beat that ticks and reaches Redis is healthy, holding the lock or standing by.
HEARTBEAT_ENV = "HAMAL_BEAT_HEARTBEAT_FILE"
DEFAULT_HEARTBEAT = "/tmp/hamal-beat-heartbeat.json"


_heartbeat_failed: set[str] = set()


def heartbeat_path() -> str:
    return os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT


def write_heartbeat(*, redis_ok: bool, active: bool) -> None:
    record = {"at": time.time(), "redis": redis_ok, "active": active, "pid": os.getpid()}
    path = heartbeat_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        # The healthcheck then reports the beat unhealthy, which it is not: say why once.
        if path not in _heartbeat_failed:
            _heartbeat_failed.add(path)
            logger.warning("beat: cannot write its heartbeat %s: %s", path, exc)


class HamalScheduler(RedBeatScheduler):  # type: ignore[misc]
    _redis_down = False
    _standing_by = False

    def setup_schedule(self) -> None:
        try:
            super().setup_schedule()
        except REDIS_DOWN as exc:
            # The first tick that reaches Redis writes the schedule instead.
            logger.warning("beat: Redis unavailable at start (%s); will write the schedule", exc)

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            interval = self._tick_if_active(min=min, **kwargs)
        except REDIS_DOWN as exc:
            if not self._redis_down:
                logger.warning("beat: Redis unavailable (%s); retrying every tick", exc)
            self._redis_down = True
            write_heartbeat(redis_ok=False, active=False)
            return float(self.max_interval)
        except redis.exceptions.LockNotOwnedError:
            # Lost between our extend and RedBeat's own, before anything was sent.
            self.lock = None
            write_heartbeat(redis_ok=True, active=False)
            return float(self.max_interval)
        if self._redis_down:
            logger.info("beat: Redis is back")
            self._redis_down = False
        write_heartbeat(redis_ok=True, active=self.lock is not None)
        return interval

    def close(self) -> None:
        # Releasing the lock needs Redis: a beat stopping while it is gone just lets it expire.
        with contextlib.suppress(redis.RedisError):
            super().close()

    def _tick_if_active(self, **kwargs: Any) -> float:
        if not self._hold_lock():
            return float(self.max_interval)
        if self._schedule_missing():
            logger.warning("beat: schedule missing from Redis (flushed?); writing it again")
            super().setup_schedule()
        return float(super().tick(**kwargs))

    def _hold_lock(self) -> bool:
        """Extend the lock this beat holds, or take it if no beat does."""
        if self.lock is not None:
            try:
                self.lock.extend(int(self.lock_timeout))
                return True
            except redis.exceptions.LockNotOwnedError:
                logger.warning("beat: lost the lock (Redis flushed or restarted?)")
                self.lock = None
        return self._take_free_lock()

    def _take_free_lock(self) -> bool:
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        # The same lock RedBeat makes in beat_init: extending sets the ttl, not adds to it.
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            if not self._standing_by:
                logger.info("beat: another beat holds the lock; standing by")
            self._standing_by = True
            return False
        logger.info("beat: Acquired lock")
        self._standing_by = False
        self.lock = lock
        return True

    def _schedule_missing(self) -> bool:
        """True when an entry of app.conf.beat_schedule is not (all) in Redis."""
        conf = self.app.redbeat_conf
        with get_redis(self.app).pipeline() as pipe:
            for name in conf.schedule:
                entry_key = self.Entry.generate_key(self.app, name)
                pipe.hexists(entry_key, "definition")
                pipe.zscore(conf.schedule_key, entry_key)
            answers = pipe.execute()
        return any(answer is None or answer is False for answer in answers)
