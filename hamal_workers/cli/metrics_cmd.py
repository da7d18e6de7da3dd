"""`hamal metrics`: serve the fleet's Prometheus metrics (hamal_workers/metrics.py)."""

from __future__ import annotations

import argparse
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app

from hamal_workers.cli.common import add_config_option, guarded, load_settings
from hamal_workers.metrics import HamalCollector
from hamal_workers.state import State


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "metrics", help="serve Prometheus metrics on [metrics] listen_address:port"
    )
    add_config_option(p)
    p.add_argument("--port", type=int, help="instead of [metrics] port (0: any free port)")
    p.add_argument("--once", action="store_true", help="print one scrape on stdout and exit")
    p.set_defaults(func=guarded("metrics", cmd_metrics))


class _QuietHandler(WSGIRequestHandler):
    # One line per scrape would be most of the log; errors still go to stderr.
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


def cmd_metrics(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    # No ping: the exporter starts while Redis is down and says so (hamal_redis_up 0).
    timeout = settings.redis.socket_timeout
    client = redis.Redis.from_url(
        settings.redis.url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HamalCollector(lambda: State(client)))
    if args.once:
        from prometheus_client import generate_latest

        sys.stdout.write(generate_latest(registry).decode())
        return 0
    port = settings.metrics.port if args.port is None else args.port
    server: WSGIServer = make_server(
        settings.metrics.listen_address, port, make_wsgi_app(registry), handler_class=_QuietHandler
    )
    host, bound = server.server_address[:2]
    print(f"hamal metrics: serving http://{host}:{bound}/metrics", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
