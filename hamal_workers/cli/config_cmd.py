"""`hamal config check` and `hamal config show`: validate hamal.conf, print what is in effect."""

from __future__ import annotations

import argparse
import sys

from hamal_workers.cli.common import add_config_option, load_settings
from hamal_workers.config import KEYS, SECTIONS, Settings, ini_text
from hamal_workers.targets.encryption import KeyFileError, load_key_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="check or show hamal.conf")
    commands = parser.add_subparsers(dest="config_command", required=True)
    check = commands.add_parser(
        "check", help="validate hamal.conf and the HAMAL_* overrides; exit 2 on any problem"
    )
    add_config_option(check)
    check.set_defaults(func=check_config)
    show = commands.add_parser("show", help="print the effective settings, secrets masked")
    add_config_option(show)
    show.set_defaults(func=show_config)


def check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    _print_warnings(settings)
    if settings.target.encryption_key_file:
        # Read now, not at the first sync: a key file is the one thing a restore cannot do without.
        try:
            load_key_file(settings.target.encryption_key_file)
        except KeyFileError as exc:
            print(f"{settings.path}: {exc}", file=sys.stderr)
            return 2
    if settings.mass.mass_endpoint:
        # Without Mass' public key every task would be refused: say so now.
        from hamal_workers.mass import MassError, load_public_key

        try:
            load_public_key(settings.mass.public_key_path)
        except MassError as exc:
            print(f"{settings.path}: {exc}", file=sys.stderr)
            return 2
    print(f"{settings.path}: OK ({len(SECTIONS)} sections, {len(KEYS)} keys)")
    return 0


def show_config(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    _print_warnings(settings)
    overrides = ", ".join(settings.env_overrides) or "none"
    print(f"# effective settings of {settings.path}")
    print(f"# overridden by environment variables: {overrides}")
    print()
    print(ini_text(settings.masked()), end="")
    return 0


def _print_warnings(settings: Settings) -> None:
    # On stderr, so `hamal config show > file` still writes a clean config.
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
