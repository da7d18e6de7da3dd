"""The `hamal` command. Each subcommand group lives in its own module with a `register`."""

from __future__ import annotations

import argparse
import sys

from hamal_workers import __version__


def build_parser() -> argparse.ArgumentParser:
    from hamal_workers.cli import (
        config_cmd,
        key_cmd,
        metrics_cmd,
        points_cmd,
        prune_cmd,
        sync_cmd,
    )

    parser = argparse.ArgumentParser(prog="hamal", description="Hamal sync proxy")
    parser.add_argument("--version", action="version", version=f"hamal {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="hamal.conf to use (default: $HAMAL_CONF, else /etc/hamal/hamal.conf)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (config_cmd, key_cmd, metrics_cmd, points_cmd, prune_cmd, sync_cmd):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hamal_workers.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
