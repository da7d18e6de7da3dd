"""`hamal key new FILE` and `hamal key id FILE`: the master key of chunks encrypted at rest."""

from __future__ import annotations

import argparse
import sys

from hamal_workers.targets.encryption import KeyFileError, load_key_file, new_key_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("key", help="make or identify an encryption key file")
    commands = parser.add_subparsers(dest="key_command", required=True)
    new = commands.add_parser(
        "new", help="write a new random master key to FILE (mode 0600; never overwrites)"
    )
    new.add_argument("file", metavar="FILE")
    new.set_defaults(func=cmd_new)
    ident = commands.add_parser(
        "id", help="print the key id of FILE (what a store's format.json records)"
    )
    ident.add_argument("file", metavar="FILE")
    ident.set_defaults(func=cmd_id)


def cmd_new(args: argparse.Namespace) -> int:
    try:
        cipher = new_key_file(args.file)
    except KeyFileError as exc:
        print(f"hamal key new: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: new key, id {cipher.key_id}")
    print(
        "keep a copy of this file away from the store: without it, no encrypted restore "
        "point can be read"
    )
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    try:
        cipher = load_key_file(args.file)
    except KeyFileError as exc:
        print(f"hamal key id: {exc}", file=sys.stderr)
        return 1
    print(cipher.key_id)
    return 0
