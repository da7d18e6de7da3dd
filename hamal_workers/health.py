"""Healthchecks of the compose services: exit 0 when the service really works, else 1.

    python -m hamal_workers.health worker QUEUE      the worker QUEUE@<this host> answers a
                                                     ping (it consumes from its queues then)
    python -m hamal_workers.health beat              the beat ticked lately and reached Redis
                                                     (holding the RedBeat lock or standing by)
    python -m hamal_workers.health metrics           `hamal metrics` answers and reads Redis
    python -m hamal_workers.health flower            Flower answers, through its basic auth

Each prints one line saying what it found; docker-compose shows `Up (healthy)` only when it
exits 0 (docker-compose-hamal.yaml). They read the same hamal.conf and HAMAL_* variables as
the service they check, and never print a URL's password.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
import urllib.request

from hamal_workers.beat import heartbeat_path
from hamal_workers.config import load, mask_url


def worker(queue: str) -> tuple[bool, str]:
    from hamal_workers.celery_app import app

    node = f"{queue}@{socket.gethostname()}"
    answers = app.control.ping(destination=[node], timeout=5.0)
    if answers:
        return True, f"worker {node} answers"
    return False, f"worker {node} does not answer a ping within 5 s"


def beat(stale_after_s: float) -> tuple[bool, str]:
    path = heartbeat_path()
    try:
        with open(path) as f:
            record = json.load(f)
        age = time.time() - float(record["at"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"beat: no heartbeat in {path} ({exc})"
    if age > stale_after_s:
        return False, f"beat: last tick {age:.0f} s ago (more than {stale_after_s:.0f} s)"
    if not record.get("redis"):
        return False, "beat: its last tick could not reach Redis"
    role = "holds the lock" if record.get("active") else "stands by"
    return True, f"beat: ticked {age:.1f} s ago, {role}"


def metrics(address: str, port: int) -> tuple[bool, str]:
    url = f"http://{address}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
    except OSError as exc:
        return False, f"metrics: {url}: {exc}"
    if "hamal_redis_up 1.0" not in text:
        return False, f"metrics: {url} answers, but Redis does not"
    return True, f"metrics: {url} answers"


def flower() -> tuple[bool, str]:
    """Flower answers its /healthcheck, through its own basic auth (FLOWER_BASIC_AUTH)."""
    port = os.environ.get("FLOWER_PORT", "5555")
    url = f"http://127.0.0.1:{port}/healthcheck"
    request = urllib.request.Request(url)
    credentials = os.environ.get("FLOWER_BASIC_AUTH", "").split(",")[0]
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = answer.read().decode()
    except OSError as exc:
        return False, f"flower: {url}: {exc}"
    return body.strip() == "OK", f"flower: {url} answers {body.strip()[:40]!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamal_workers.health")
    sub = parser.add_subparsers(dest="service", required=True)
    sub.add_parser("worker").add_argument("queue")
    sub.add_parser("beat")
    sub.add_parser("metrics")
    sub.add_parser("flower")
    args = parser.parse_args(argv)
    try:
        settings = load(os.environ.get("HAMAL_CONF", "/etc/hamal/hamal.conf"))
        if args.service == "worker":
            ok, line = worker(args.queue)
        elif args.service == "flower":
            ok, line = flower()
        elif args.service == "beat":
            # The beat wakes at least every min(5, interval) s; three missed ticks is stuck.
            ok, line = beat(3 * min(5, settings.period.interval) + 5)
        else:
            # Listening on every address: ask it on loopback, from inside its container.
            address = settings.metrics.listen_address
            local = "127.0.0.1" if address == "0.0.0.0" else address
            ok, line = metrics(local, settings.metrics.port)
    except Exception as exc:  # noqa: BLE001 - a healthcheck answers, it does not crash
        ok, line = False, f"{args.service}: {type(exc).__name__}: {exc}"
    print(mask_url(line))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
