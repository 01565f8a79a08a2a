"""The `keyval drone` daemon: a thin trio shell around the drone's state and handlers.

It logs in as its principal, serves kv.* requests on `--listen`, writes through to the db in
batches, reseeds granted slots from the db, and heartbeats the commander for its grant.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from keyval import net, observe
from keyval.client.config import Endpoint, parse_commanders
from keyval.drone.handlers import DroneHandler
from keyval.drone.heartbeat import Heartbeater
from keyval.drone.links import Dialer, ServiceLink
from keyval.drone.reseed import Reseeder
from keyval.drone.state import DroneState, Limits
from keyval.drone.twopc import IN_DOUBT_RETRY_AFTER_MS, participant
from keyval.drone.vote import VoteFile
from keyval.keys import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES
from keyval.nodeconfig import ConfigError, NodeOptions, split_address, write_ready_file
from wire.channel import PeerInfo, ServerAuth
from wire.errors import ServiceError

log = logging.getLogger("keyval.drone")

DEFAULT_LISTEN = "127.0.0.1:6240"
DEFAULT_DB_NAME = "db"

# The drone's persisted election vote, inside --data.
VOTE_FILE_NAME = "vote.json"

# Largest limits an operator may set: a key or value must fit one 1 MiB frame with its envelope.
MAX_KEY_BYTES_LIMIT = 64 * 1024
MAX_VALUE_BYTES_LIMIT = 768 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class DroneSettings:
    db: str
    commanders: tuple[Endpoint, ...]
    db_name: str = DEFAULT_DB_NAME
    limits: Limits = dataclasses.field(default_factory=Limits)
    # Where the drone keeps its election vote (vote.json); None: in memory only (tests), so a
    # restarted drone could vote twice in one term.
    data: Path | None = None


def _int_option(options: NodeOptions, key: str, default: int, maximum: int) -> int:
    value = options.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key.replace('_', '-')} must be an integer, not {value!r}") from None
    if not 0 < number <= maximum:
        raise ConfigError(f"{key.replace('_', '-')} must be 1..{maximum}, not {number}")
    return number


def _commander_entries(raw: Any) -> list[str]:
    """--commander may repeat, each a comma list; a TOML file may give a string or a list."""
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError("commander must be HOST:PORT strings")
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def settings_from_options(options: NodeOptions) -> DroneSettings:
    """The drone's own settings; raises ConfigError naming the bad option."""
    db = options.get("db")
    if not isinstance(db, str) or not db:
        raise ConfigError("missing --db HOST:PORT (the database interface)")
    split_address(db)
    entries = _commander_entries(options.get("commander"))
    if not entries:
        raise ConfigError("missing --commander HOST:PORT (repeat it or give a comma list)")
    limits = Limits(
        max_key_bytes=_int_option(
            options, "max_key_bytes", DEFAULT_MAX_KEY_BYTES, MAX_KEY_BYTES_LIMIT
        ),
        max_value_bytes=_int_option(
            options, "max_value_bytes", DEFAULT_MAX_VALUE_BYTES, MAX_VALUE_BYTES_LIMIT
        ),
    )
    return DroneSettings(
        db=db,
        commanders=parse_commanders(entries),
        db_name=str(options.get("db_name") or DEFAULT_DB_NAME),
        limits=limits,
        data=options.data,
    )


@dataclasses.dataclass
class Security:
    """How the drone proves itself and checks callers: tickets in production, PSK in tests."""

    dial: Dialer
    server_auth: Callable[[], ServerAuth]
    revoked: Callable[[PeerInfo], bool] | None = None


async def _ticket_security(options: NodeOptions, nursery: trio.Nursery) -> Security:
    from auth.client import Credentials
    from auth.service import ServiceIdentity
    from keyval.client.links import TicketDialer

    credentials = Credentials(options.name, options.key, options.authority, options.authority_key)
    identity = ServiceIdentity(credentials)
    await identity.start(nursery)
    return Security(TicketDialer(credentials), identity.server_auth, identity.revoked)


class Drone:
    """One running drone. `state` is exposed for tests and the admin's statistics."""

    def __init__(self, name: str, settings: DroneSettings, security: Security) -> None:
        self.settings = settings
        self.security = security
        self.db = ServiceLink(security.dial, settings.db, settings.db_name)
        self.state = DroneState(name, self.db, settings.limits)
        self.reseeder = Reseeder(self.state, self.db)
        self.heartbeater: Heartbeater | None = None
        self.address = ""

    async def run(
        self, listen: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve on `listen` (TCP) and run the background tasks until cancelled."""
        handler = DroneHandler(self.state)
        serve = partial(
            net.serve, listen, self.security.server_auth, handler, revoked=self.security.revoked
        )
        try:
            async with trio.open_nursery() as nursery:
                address: str = await nursery.start(serve)
                await self.start_background(nursery, address)
                log.info("drone %s serving on %s", self.state.name, address)
                task_status.started(address)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def start_background(self, nursery: trio.Nursery, address: str) -> None:
        """Start the batch loop and the heartbeats; `address` is what clients are told."""
        self.address = address
        await nursery.start(self.state.batcher.run)
        vote_file = None
        if self.settings.data is not None:
            self.settings.data.mkdir(parents=True, exist_ok=True)
            vote_file = VoteFile(self.settings.data / VOTE_FILE_NAME)
        self.heartbeater = Heartbeater(
            self.state,
            self.reseeder,
            self.settings.commanders,
            self.security.dial,
            address,
            vote_file=vote_file,
        )
        nursery.start_soon(self.heartbeater.run, nursery)
        nursery.start_soon(self._recover_in_doubt)

    async def _recover_in_doubt(self) -> None:
        """Keep asking the db about transactions left in doubt (voted, no decision heard, the db
        unreachable past recovery's bound), so their keys unlock once the db is back."""
        recovering = participant(self.state)
        while True:
            await trio.sleep(IN_DOUBT_RETRY_AFTER_MS / 1000)
            try:
                await recovering.resolve_in_doubt()
            except ServiceError as error:  # still in doubt: the db is away; try again later
                log.info("2PC recovery: %s", error.message)

    async def aclose(self) -> None:
        await self.db.aclose()


async def run_drone(
    options: NodeOptions,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    security: Security | None = None,
) -> None:
    """Run the drone daemon until cancelled; `task_status.started(bound_address)` once serving.

    `security` replaces ticket login (tests pass pre-shared-key auth)."""
    settings = settings_from_options(options)
    async with trio.open_nursery() as nursery:
        metrics = await observe.start_node(nursery, options.name, "drone", options.metrics)
        if security is None:
            security = await _ticket_security(options, nursery)
        drone = Drone(options.name, settings, security)
        metrics.slots_owned.set_function(lambda: len(drone.state.table.held_slots()))
        metrics.keys.set_function(drone.state.store.key_count)
        address = await nursery.start(drone.run, options.listen)
        write_ready_file(options.ready_file, address)
        task_status.started(address)
