"""The `keyval` command line: one argparse tree, one module per group of subcommands.

Each module named in `COMMAND_MODULES` has `register(subparsers)`, which adds its subcommands
and sets `func` (a callable taking the parsed namespace and returning an exit code) on each.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from keyval.observe.gctune import tune_gc

COMMAND_MODULES = (
    "keyval.cli_data",  # get / put / del / scan one-shots
    "auth.cli",  # auth daemon, principal management
    "keyval.dbserver",  # db daemon
    "keyval.drone",  # drone daemon
    "keyval.commander",  # commander daemon
    "keyval.cluster",  # cluster up / add-drone
    "keyval.commander.cli_slots",  # keyval slots
    "keyval.admin",  # admin REPL and one-shots
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyval",
        description="keyval: a hash-slot sharded, in-memory, transactional key-value cluster.",
    )
    parser.add_argument(
        "--config",
        metavar="F",
        help="client config file (default: $KEYVAL_CONFIG)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:
                continue  # that group of commands is not built yet
            raise
        register = getattr(module, "register", None)
        if register is None:
            continue  # a package under construction that has no commands yet
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    tune_gc()  # after every command module is imported: see keyval.observe.gctune
    try:
        code = func(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
