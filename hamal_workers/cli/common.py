"""What every `hamal` subcommand shares: --config, settings, Redis, and how a failure is said.

A command fails with one line on stderr naming what is wrong and a non-zero exit status; a
traceback is only for bugs.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import kombu.exceptions
import redis

from hamal_workers.config import Settings, config_path, load, mask_url
from hamal_workers.platforms.base import PlatformError
from hamal_workers.targets.base import TargetError

Command = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 1."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps `hamal --config X sub` working: the subparser only sets it when given.
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="hamal.conf to use (default: $HAMAL_CONF, else /etc/hamal/hamal.conf)",
    )


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from --config, else $HAMAL_CONF, else /etc/hamal/hamal.conf; raises ConfigError."""
    return load(config_path(getattr(args, "config", None), os.environ), os.environ)


def guarded(name: str, command: Command) -> Command:
    """Expected failures become one line `hamal <name>: <what>` and exit 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (CommandError, TargetError, PlatformError, OSError) as exc:
            print(f"hamal {name}: {one_line(str(exc))}", file=sys.stderr)
            return 1

    return run


def one_line(text: str) -> str:
    """`text` on one line with any URL password masked: an error may quote a child's output."""
    return " ".join(mask_url(text).split())


# --- Redis ------------------------------------------------------------------------------


def open_redis(settings: Settings) -> redis.Redis:
    """A client of [redis] url that has answered PING; use inside `redis_errors`."""
    timeout = settings.redis.socket_timeout
    client = redis.Redis.from_url(
        settings.redis.url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    client.ping()
    return client


@contextmanager
def redis_errors(settings: Settings) -> Iterator[None]:
    """Turns a Redis or broker failure inside into a CommandError naming the Redis and why."""
    where = mask_url(settings.redis.url)
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
        raise CommandError(f"cannot reach Redis at {where}: {_why_unreachable(exc)}") from None
    except redis.RedisError as exc:
        raise CommandError(f"error from Redis at {where}: {exc}") from None


def _why_unreachable(exc: BaseException) -> str:
    for cause in _causes(exc):
        if isinstance(cause, redis.AuthenticationError):
            return "authentication failed (wrong or missing password in [redis] url)"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, redis.TimeoutError | TimeoutError):
            return "timed out"
        if isinstance(cause, socket.gaierror):
            return "unknown host"
    return str(exc) or type(exc).__name__


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
