"""`keyval drone`: flags, config resolution, and the one-line start-up errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import trio

from keyval.drone.daemon import DEFAULT_DB_NAME, DEFAULT_LISTEN, run_drone
from keyval.nodeconfig import ConfigError, add_identity_arguments, resolve

ROLE_KEYS = ("db", "commander", "db_name", "max_key_bytes", "max_value_bytes")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "drone",
        help="run a drone (holds slots in memory, serves clients)",
        description="Run a drone: serves the hash slots the commander grants it, in memory, "
        "writing every change through to the db.",
    )
    add_identity_arguments(parser, listen_default=DEFAULT_LISTEN)
    group = parser.add_argument_group("drone")
    group.add_argument("--db", metavar="HOST:PORT", help="the database interface")
    group.add_argument(
        "--commander",
        metavar="HOST:PORT",
        action="append",
        help="a commander ([NAME@]HOST:PORT); repeat it or give a comma list",
    )
    group.add_argument(
        "--db-name", help=f"principal name of the db service (default {DEFAULT_DB_NAME})"
    )
    group.add_argument("--max-key-bytes", type=int, help="key size limit (default 1024)")
    group.add_argument("--max-value-bytes", type=int, help="value size limit (default 524288)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        options = resolve(args, role_keys=ROLE_KEYS)
        from keyval.drone.daemon import settings_from_options

        settings_from_options(options)  # report bad flags before starting anything
    except ConfigError as error:
        print(f"keyval drone: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        trio.run(run_drone, options)
    except ConfigError as error:
        print(f"keyval drone: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"keyval drone: cannot start: {error}", file=sys.stderr)
        return 1
    return 0
