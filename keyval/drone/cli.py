"""`keyval drone`: flags, config resolution, and the one-line start-up errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from auth.keys import KeyFileError
from keyval.drone.daemon import (
    DEFAULT_DB_NAME,
    DEFAULT_LISTEN,
    run_drone,
    settings_from_options,
)
from keyval.drone.vote import VoteFileError
from keyval.nodeconfig import ConfigError, add_identity_arguments, resolve
from keyval.observe import setup_logging
from wire.errors import WireError

ROLE_KEYS = ("db", "commander", "db_name", "max_key_bytes", "max_value_bytes")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "drone",
        help="run a drone (holds slots in memory, serves clients)",
        description="Run a drone: serves the hash slots the commander grants it, in memory, "
        "writing every change through to the db.",
    )
    add_identity_arguments(parser, listen_default=DEFAULT_LISTEN)
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="the drone's data directory (its election vote, kept across restarts)",
    )
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
        settings_from_options(options)  # report bad flags before starting anything
    except ConfigError as error:
        print(f"keyval drone: {error}", file=sys.stderr)
        return 2
    setup_logging(options.name, options.log_level, json=options.log_json)
    try:
        trio.run(run_drone, options)
    except (Exception, BaseExceptionGroup) as error:
        found = _startup_error(error)
        if found is None:
            raise
        code, message = found
        print(f"keyval drone: {message}", file=sys.stderr)
        return code
    return 0


def _startup_error(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an error that means 'cannot start as configured'."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(error, ConfigError):
        return 2, str(error)
    if isinstance(error, VoteFileError):
        return 1, f"cannot start: {error} (refusing to risk voting twice in a term)"
    if isinstance(error, OSError | KeyFileError):
        return 1, f"cannot start: {error}"
    if isinstance(error, WireError):
        return 1, f"cannot start: {error.code}: {error.message}"
    return None
