"""`keyval commander`: flags, config file, clear start-up errors, then the trio daemon."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from auth.keys import KeyFileError
from keyval.commander.daemon import CommanderSettings, run_commander
from keyval.nodeconfig import ConfigError, add_identity_arguments, resolve
from keyval.observe import setup_logging
from keyval.timing import HEARTBEAT_MS, LEASE_MS
from wire.errors import WireError

LISTEN_DEFAULT = "127.0.0.1:6232"
ROLE_KEYS = ("db", "db_name", "expect_drones", "heartbeat_ms", "lease_ms")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "commander",
        help="run a commander: slot map, heartbeats, failure detection, grants",
        description="Run a commander daemon. It registers a term with the db, resumes the "
        "persisted slot map, and grants slots to live drones.",
    )
    add_identity_arguments(parser, listen_default=LISTEN_DEFAULT)
    parser.add_argument("--data", metavar="DIR", help="the commander's data directory")
    parser.add_argument("--db", metavar="HOST:PORT", help="the database interface")
    parser.add_argument("--db-name", metavar="NAME", help="the db's principal name (default db)")
    parser.add_argument(
        "--expect-drones",
        type=int,
        metavar="N",
        help="on a fresh cluster, wait for N drones before the first slot assignment (default 1)",
    )
    parser.add_argument(
        "--heartbeat-ms", type=int, metavar="MS", help=f"heartbeat period (default {HEARTBEAT_MS})"
    )
    parser.add_argument(
        "--lease-ms", type=int, metavar="MS", help=f"grant lease length (default {LEASE_MS})"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        options = resolve(args, role_keys=ROLE_KEYS)
        CommanderSettings.from_options(options)
    except (ConfigError, ValueError) as error:
        print(f"keyval commander: {error}", file=sys.stderr)
        return 2
    setup_logging(options.name, options.log_level, json=options.log_json)
    try:
        trio.run(run_commander, options)
    except (OSError, KeyFileError) as error:
        print(f"keyval commander: {error}", file=sys.stderr)
        return 1
    except WireError as error:
        print(f"keyval commander: {error.code}: {error.message}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print("keyval commander: the db did not answer at start-up", file=sys.stderr)
        return 1
    return 0
