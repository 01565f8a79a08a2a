"""`keyval db`: the database interface daemon (flags, start-up errors, the trio main).

    keyval db --config db.toml --data DIR [--backend postgresql://...]
              [--batch-max-ops N] [--batch-max-delay-ms MS]

It opens the store first (a wrong backend URL or an unreachable server is a one-line error
and a non-zero exit before anything else happens), logs in to the authority, and serves
drones and commanders over keyval.net with keyval.db.service.Database as the handler.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import trio

from auth.client import Credentials
from auth.keys import KeyFileError
from auth.service import ServiceIdentity
from keyval import net, observe
from keyval.db.backend import BackendConfigError, StorageError, open_backend
from keyval.db.service import DEFAULT_BATCH_MAX_DELAY_MS, DEFAULT_BATCH_MAX_OPS, Database
from keyval.nodeconfig import (
    ConfigError,
    NodeOptions,
    add_identity_arguments,
    resolve,
    write_ready_file,
)
from keyval.observe import setup_logging
from wire.errors import WireError

logger = logging.getLogger("keyval.db")

LISTEN_DEFAULT = "127.0.0.1:6231"
ROLE_KEYS = ("backend", "batch_max_ops", "batch_max_delay_ms")

# Bounds on the group-commit knobs: a batch of one op is no batching, and a transaction of
# more than 16384 ops holds the writer lock too long; waiting over 100 ms for company adds
# more latency than any disk saves.
MAX_BATCH_OPS = 16384
MAX_BATCH_DELAY_MS = 100.0


@dataclass(frozen=True)
class DbSettings:
    backend: str | None
    batch_max_ops: int
    batch_max_delay_ms: float

    @classmethod
    def from_options(cls, options: NodeOptions) -> DbSettings:
        """Raise ConfigError on a value out of bounds."""
        backend = options.get("backend")
        max_ops = options.get("batch_max_ops", DEFAULT_BATCH_MAX_OPS)
        delay_ms = options.get("batch_max_delay_ms", DEFAULT_BATCH_MAX_DELAY_MS)
        if isinstance(max_ops, bool) or not isinstance(max_ops, int):
            raise ConfigError(f"batch-max-ops must be an integer, not {max_ops!r}")
        if not 1 <= max_ops <= MAX_BATCH_OPS:
            raise ConfigError(f"batch-max-ops must be within 1..{MAX_BATCH_OPS}, not {max_ops}")
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, int | float):
            raise ConfigError(f"batch-max-delay-ms must be a number, not {delay_ms!r}")
        if not 0 <= delay_ms <= MAX_BATCH_DELAY_MS:
            raise ConfigError(
                f"batch-max-delay-ms must be within 0..{MAX_BATCH_DELAY_MS}, not {delay_ms}"
            )
        if backend is not None and not isinstance(backend, str):
            raise ConfigError("backend must be a URL string")
        return cls(backend, max_ops, float(delay_ms))


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "db",
        help="run the database interface: durable store, group commit, fencing",
        description="Run the database interface daemon. Stores every acknowledged write in "
        "SQLite (one file in --data DIR, the default) or PostgreSQL (--backend URL), holds "
        "the commander term, the slot map and the grant key.",
    )
    add_identity_arguments(parser, listen_default=LISTEN_DEFAULT)
    parser.add_argument("--data", metavar="DIR", help="data directory (the SQLite file)")
    parser.add_argument(
        "--backend",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB or sqlite:///FILE (default: SQLite in --data)",
    )
    parser.add_argument(
        "--batch-max-ops",
        type=int,
        metavar="N",
        help=f"close a group commit at N ops (default {DEFAULT_BATCH_MAX_OPS})",
    )
    parser.add_argument(
        "--batch-max-delay-ms",
        type=float,
        metavar="MS",
        help=f"close a group commit MS after its first op (default {DEFAULT_BATCH_MAX_DELAY_MS})",
    )
    parser.set_defaults(func=main)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(args: argparse.Namespace) -> int:
    try:
        options = resolve(args, role_keys=ROLE_KEYS)
        DbSettings.from_options(options)
    except ConfigError as error:
        print(f"keyval db: {error}", file=sys.stderr)
        return 2
    setup_logging(options.name, options.log_level, json=options.log_json)
    try:
        trio.run(run_db, options)
    except BackendConfigError as error:
        print(f"keyval db: {one_line(error)}", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"keyval db: cannot open the store: {one_line(error)}", file=sys.stderr)
        return 1
    except (OSError, KeyFileError) as error:
        print(f"keyval db: {one_line(error)}", file=sys.stderr)
        return 1
    except WireError as error:
        print(f"keyval db: {error.code}: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


async def run_db(
    options: NodeOptions, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve as the db until cancelled. Raises BackendConfigError or StorageError at start-up."""
    settings = DbSettings.from_options(options)
    backend = open_backend(settings.backend, options.data)
    database = Database(
        backend,
        batch_max_ops=settings.batch_max_ops,
        batch_max_delay_ms=settings.batch_max_delay_ms,
    )
    await database.open()
    logger.info("db store %s open", backend.description)
    credentials = Credentials(options.name, options.key, options.authority, options.authority_key)
    try:
        async with trio.open_nursery() as nursery:
            await observe.start_node(nursery, options.name, "db", options.metrics)
            identity = ServiceIdentity(credentials)
            await identity.start(nursery)
            await nursery.start(database.run)
            bound = await nursery.start(
                functools.partial(net.serve, revoked=identity.revoked),
                options.listen,
                identity.server_auth,
                database.handle,
            )
            logger.info("db %s serving on %s", options.name, bound)
            write_ready_file(options.ready_file, bound)
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            await database.aclose()
