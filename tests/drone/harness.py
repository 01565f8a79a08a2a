"""Wiring for drone tests: the real db service, a fake commander, and a drone, on a memory net.

Everything runs in one trio process over `trio.testing.memory_stream_pair` streams with the
real keyval.net connection code and pre-shared-key channel auth (tickets need a running
authority; the PSK stand-in is what datapath-shared.md allows). The db is keyval.db.service.
Database (the handler keyval.dbserver.run_db serves) on SQLite in the test's tmp_path.

Time: the db runs SQLite in a worker thread. trio's MockClock with autojump_threshold=0 would
jump virtual time while that thread works (the run loop looks idle) and fire request
deadlines spuriously, so tests use MockClock with a small positive threshold (AUTOJUMP_S):
virtual time still skips every idle wait, but only after that much real idleness.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from keyval import net
from keyval.client.config import Endpoint
from keyval.db.service import Database
from keyval.db.sqlite import SqliteBackend
from keyval.drone.daemon import Drone, DroneSettings, Security
from keyval.drone.handlers import DroneHandler
from keyval.drone.links import Dialer, Link
from keyval.drone.state import Limits
from keyval.grants import Grant, sign_grant
from keyval.messages import (
    DbGrantKey,
    DbGrantKeyReply,
    DbReadSlot,
    DbSlotPage,
    GetMap,
    Heartbeat,
    HeartbeatReply,
    Register,
    Registered,
    SlotMap,
)
from wire.channel import PeerInfo, PskClientAuth, PskServerAuth, ServerAuth
from wire.errors import BadRequest, NotFound, Unavailable
from wire.messages import Message

PSK = os.urandom(32)
ROLES = {
    "db": "db",
    "commander-1": "commander",
    "drone-1": "drone",
    "client": "client",
    "admin": "admin",
    "other-drone": "drone",
}
DB_ADDRESS = "db.test:1"
COMMANDER_ADDRESS = "commander.test:1"
DRONE_ADDRESS = "drone.test:1"

# Real idle time before the mock clock jumps: longer than any SQLite call in the db's thread.
AUTOJUMP_S = 0.05

Handler = Callable[[PeerInfo, Message], Awaitable[Message]]


def server_auth(name: str) -> ServerAuth:
    keys = {principal: (role, PSK) for principal, role in ROLES.items()}
    return PskServerAuth(keys, server_name=name, server_role=ROLES[name])


class MemoryNet:
    """Addresses to handlers; each dial is a fresh memory stream pair served in `nursery`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.servers: dict[str, tuple[str, Handler]] = {}
        self.down: set[str] = set()

    def add(self, address: str, name: str, handler: Handler) -> None:
        self.servers[address] = (name, handler)

    def dialer(self, principal: str) -> Dialer:
        async def dial(address: str, service: str, *, timeout: float) -> Link:
            if address in self.down or address not in self.servers:
                raise Unavailable(f"no route to {address}")
            name, handler = self.servers[address]
            client_stream, server_stream = trio.testing.memory_stream_pair()
            self.nursery.start_soon(net.serve_stream, server_stream, server_auth(name), handler)
            auth = PskClientAuth(principal, ROLES[principal], PSK)
            return await net.Connection.from_stream(client_stream, auth, timeout=timeout)

        return dial


class FakeCommander:
    """Registers one drone and answers its heartbeats with a grant signed by the db's key."""

    def __init__(self, grant_key: bytes, drone: str = "drone-1") -> None:
        self.grant_key = grant_key
        self.drone = drone
        self.term = 1
        self.ranges: tuple[tuple[int, int, int], ...] = ()
        self.silent = False  # when True, heartbeats fail: the drone's lease lapses
        self.incarnation = 1
        self.heartbeats = 0
        self.map_version = 1
        self.others: list[tuple[int, int, str, int]] = []

    def grant(self) -> Grant:
        return sign_grant(Grant(self.drone, self.term, self.ranges, 0), self.grant_key)

    def give(self, *ranges: tuple[int, int, int]) -> None:
        self.ranges = tuple(sorted(ranges))
        self.map_version += 1

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        if isinstance(msg, Register):
            return Registered(incarnation=self.incarnation, heartbeat_ms=100, lease_ms=600)
        if isinstance(msg, Heartbeat):
            if self.silent:
                raise Unavailable("commander unreachable (test)")
            if msg.incarnation != self.incarnation:
                raise NotFound("unknown incarnation")
            self.heartbeats += 1
            return HeartbeatReply(grant=self.grant(), map_version=self.map_version)
        if isinstance(msg, GetMap):
            mine = [(f, last, self.drone, e) for f, last, e in self.ranges]
            return SlotMap(
                term=self.term,
                version=self.map_version,
                ranges=sorted(mine + self.others),
                drones={self.drone: DRONE_ADDRESS, "drone-2": "drone2.test:1"},
            )
        raise BadRequest(f"fake commander does not answer {msg.TYPE}")


class Cluster:
    def __init__(self, nursery: trio.Nursery, data: Path, limits: Limits | None = None) -> None:
        self.net = MemoryNet(nursery)
        self.db = Database(SqliteBackend(data / "keyval.sqlite3"))
        self.net.add(DB_ADDRESS, "db", self.db.handle)
        self.nursery = nursery
        self.limits = limits or Limits()
        self.commander: FakeCommander
        self.drone: Drone

    async def start(self) -> None:
        await self.db.open()
        await self.nursery.start(self.db.run)
        # The commander fetches the grant key from the db, as role commander.
        connection = await self.net.dialer("commander-1")(DB_ADDRESS, "db", timeout=5)
        reply = await connection.request(DbGrantKey(), timeout=5)
        assert isinstance(reply, DbGrantKeyReply)
        self.commander = FakeCommander(reply.key)
        self.net.add(COMMANDER_ADDRESS, "commander-1", self.commander)
        settings = DroneSettings(
            db=DB_ADDRESS,
            commanders=(Endpoint("commander-1", COMMANDER_ADDRESS),),
            limits=self.limits,
        )
        security = Security(self.net.dialer("drone-1"), lambda: server_auth("drone-1"))
        self.drone = Drone("drone-1", settings, security)
        self.net.add(DRONE_ADDRESS, "drone-1", DroneHandler(self.drone.state))
        await self.drone.start_background(self.nursery, DRONE_ADDRESS)

    async def client(self, principal: str = "client") -> Link:
        return await self.net.dialer(principal)(DRONE_ADDRESS, "drone-1", timeout=5)

    async def grant_and_wait(self, *ranges: tuple[int, int, int]) -> None:
        """Give the drone these ranges and wait until it has loaded them all."""
        self.commander.give(*ranges)
        wanted = {(f, last, e) for f, last, e in ranges}
        with trio.fail_after(5):
            while True:
                ready = self.drone.state.table.ready_ranges()
                slots_ready = {(s, e) for f, last, e in ready for s in range(f, last + 1)}
                if all((s, e) in slots_ready for f, last, e in wanted for s in range(f, last + 1)):
                    return
                await trio.sleep(0.05)

    async def db_request(self, principal: str, msg: Message) -> Message:
        connection = await self.net.dialer(principal)(DB_ADDRESS, "db", timeout=5)
        try:
            return await connection.request(msg, timeout=5)
        finally:
            await connection.aclose()

    def grant_for(self, drone: str, *ranges: tuple[int, int, int]) -> Grant:
        return sign_grant(Grant(drone, 1, tuple(ranges), 0), self.commander.grant_key)

    async def db_rows(self, slot: int) -> dict[bytes, tuple[object, int]]:
        """What the db holds for `slot` (read as another drone would after a move)."""
        grant = self.grant_for("drone-1", *self.commander.ranges)
        reply = await self.db_request("drone-1", DbReadSlot(grant=grant, slot=slot))
        assert isinstance(reply, DbSlotPage) and reply.done
        return {key: (value, version) for key, value, version in reply.items}


@contextlib.asynccontextmanager
async def serving_cluster(
    mock_clock: trio.testing.MockClock, data: Path, slot: int
) -> AsyncIterator[Cluster]:
    """A started cluster whose drone serves `slot` (epoch 1); torn down on exit."""
    mock_clock.autojump_threshold = AUTOJUMP_S
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, data)
        await cluster.start()
        await cluster.grant_and_wait((slot, slot, 1))
        yield cluster
        nursery.cancel_scope.cancel()
    await cluster.db.aclose()
