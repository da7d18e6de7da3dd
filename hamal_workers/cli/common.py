"""What every `hamal` subcommand shares: the --config option and loading settings."""

from __future__ import annotations

import argparse
import os

from hamal_workers.config import Settings, config_path, load


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
