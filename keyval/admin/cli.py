"""`keyval admin`: the REPL without a command, one command and exit with one.

    keyval admin [--config F]                         # the REPL
    keyval admin [--config F] COMMAND ... [--json]     # one-shot

The config is --config (after `admin` or before it, `keyval --config F admin`), else
$KEYVAL_CONFIG: a client config naming an admin principal (`keyval cluster up` writes
DIR/admin.toml). One-shot exit codes: 0 done, 1 the command failed, 2 a bad command line or
config; the failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import trio
from rich.console import Console

from auth.client import Credentials
from auth.keys import KeyFileError
from keyval.admin.actions import execute, local_result
from keyval.admin.errors import AdminError, UsageError, describe
from keyval.admin.grammar import Invocation, parse_words
from keyval.admin.remote import AdminRemote
from keyval.admin.render import render, render_json
from keyval.admin.repl import COMMAND_ERRORS, run_repl
from keyval.admin.results import Result
from keyval.client.config import settings_from_options
from keyval.client.links import TicketDialer
from keyval.nodeconfig import ConfigError, client_config_path, load_client_config

PROG = "keyval admin"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "admin",
        help="the admin REPL, or one admin command",
        description="Without COMMAND: an interactive REPL. With one: run it and exit "
        "(add --json for JSON). 'keyval admin help' lists the commands.",
    )
    parser.add_argument(
        "--config", dest="admin_config", metavar="F", help="admin config (default $KEYVAL_CONFIG)"
    )
    parser.add_argument("--json", dest="admin_json", action="store_true", help="print JSON")
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...")
    parser.set_defaults(func=main)


def config_path(args: argparse.Namespace) -> str:
    explicit = getattr(args, "admin_config", None) or getattr(args, "config", None)
    return str(client_config_path(explicit or os.environ.get("KEYVAL_CONFIG")))


def remote_from_config(path: str) -> AdminRemote:
    """Log in as the config's principal (tickets from its authority) to its commanders."""
    options = load_client_config(client_config_path(path))
    settings = settings_from_options(options)
    credentials = Credentials(options.name, options.key, options.authority, options.authority_key)
    return AdminRemote(settings, TicketDialer(credentials), credentials=credentials)


def main(args: argparse.Namespace) -> int:
    words = list(args.words)
    try:
        if not words:
            path = config_path(args)
            load_client_config(client_config_path(path))  # fail before the REPL starts
            return run_repl(lambda: remote_from_config(path))
        if args.admin_json:
            words.append("--json")
        return run_oneshot(words, lambda: remote_from_config(config_path(args)))
    except UsageError as error:
        return _fail(error, 2)
    except (ConfigError, KeyFileError) as error:
        return _fail(error, 2)


def run_oneshot(words: list[str], open_remote: Callable[[], AdminRemote]) -> int:
    invocation = parse_words(words)
    console = Console(highlight=False)
    result = local_result(invocation)
    if result is not None:
        return show(invocation, result, console)

    async def run() -> int:
        remote = open_remote()
        try:
            return await run_invocation(invocation, remote, console)
        finally:
            await remote.aclose()

    return trio.run(run)


async def run_invocation(invocation: Invocation, remote: AdminRemote, console: Console) -> int:
    """Run one command, print its result (JSON on stdout with --json); return the exit code."""
    try:
        result = await execute(invocation, remote, lambda text: None)
    except UsageError as error:
        return _fail(error, 2)
    except COMMAND_ERRORS as error:
        return _fail(error, 1)
    return show(invocation, result, console)


def show(invocation: Invocation, result: Result, console: Console) -> int:
    if invocation.json_output:
        print(render_json(result), flush=True)
    else:
        render(result, console)
    return 0


def _fail(error: BaseException, code: int) -> int:
    if isinstance(error, trio.TooSlowError):
        error = AdminError("timed out waiting for the cluster")
    print(f"{PROG}: {describe(error)}", file=sys.stderr, flush=True)
    return code
