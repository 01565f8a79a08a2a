"""Three real drones, the real db service and a real client in one trio process.

The network is memory streams running the real keyval.net code with pre-shared-key channel
auth; the db is keyval.db.service.Database on SQLite in the test's tmp dir; a small fake
commander hands each drone a grant for one third of the slots (epoch 1) and answers map
look-ups. Time: as in tests/drone/harness.py, MockClock with a small positive autojump
threshold, because SQLite works in a thread the run loop cannot see.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from keyval import net
from keyval.client.aio import AsyncClient, client_from_settings
from keyval.client.config import ClientSettings, Endpoint
from keyval.db.service import Database
from keyval.db.sqlite import SqliteBackend
from keyval.drone.daemon import Drone, DroneSettings, Security
from keyval.drone.handlers import DroneHandler
from keyval.drone.twopc import Participant, participant
from keyval.grants import Grant, sign_grant
from keyval.keys import NUM_SLOTS, key_slot
from keyval.messages import (
    DbGrantKey,
    DbGrantKeyReply,
    DbRegisterTerm,
    DbSaveMap,
    GetMap,
    Heartbeat,
    HeartbeatReply,
    Register,
    Registered,
    SlotMap,
)
from wire.channel import PeerInfo, PskClientAuth, PskServerAuth, ServerAuth
from wire.errors import BadRequest, Unavailable
from wire.messages import Message

PSK = os.urandom(32)
DRONES = ("drone-1", "drone-2", "drone-3")
ROLES = {"db": "db", "commander-1": "commander", "client": "client"} | dict.fromkeys(
    DRONES, "drone"
)
DB_ADDRESS = "db.test:1"
COMMANDER_ADDRESS = "commander.test:1"

# Real idle time before the mock clock jumps: longer than any SQLite call in the db's thread.
AUTOJUMP_S = 0.05

# Virtual seconds the clock may skip past a deadline while that thread works on a loaded machine.
CLOCK_SLACK_S = 3.0

Handler = Callable[[PeerInfo, Message], Awaitable[Message]]


def address_of(drone: str) -> str:
    return f"{drone}.test:1"


# Slots each drone holds: few, because each is reseeded from SQLite one read at a time.
SLOTS_PER_DRONE = 32


def ranges_of(drone: str) -> tuple[tuple[int, int, int], ...]:
    """A small range of slots each, spread over the slot space, epoch 1."""
    first = DRONES.index(drone) * (NUM_SLOTS // len(DRONES))
    return ((first, first + SLOTS_PER_DRONE - 1, 1),)


def owner_of(key: str) -> str | None:
    slot = key_slot(key)
    return next(
        (d for d in DRONES if any(f <= s <= t for f, t, _ in ranges_of(d) for s in [slot])), None
    )


def keys_on(drone: str, count: int, prefix: str = "k") -> list[str]:
    found: list[str] = []
    index = 0
    while len(found) < count:
        key = f"{prefix}{index}"
        if owner_of(key) == drone:
            found.append(key)
        index += 1
    return found


class MemoryNet:
    """Addresses to handlers; each dial is a fresh memory stream pair served in `nursery`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.servers: dict[str, tuple[str, Handler]] = {}
        self.nurseries: dict[str, trio.Nursery] = {}  # where an address's connections run
        self.down: set[str] = set()
        self.dead: set[str] = set()  # principals that can no longer dial out

    def down_names(self) -> set[str]:
        return {self.servers[address][0] for address in self.down if address in self.servers}

    def dialer(self, principal: str) -> MemoryDialer:
        return MemoryDialer(self, principal)


class MemoryDialer:
    """Dials `MemoryNet` addresses as `principal` (fits both the drone's and client's Dialer)."""

    def __init__(self, memory: MemoryNet, principal: str) -> None:
        self.memory = memory
        self.principal = principal

    async def __call__(self, address: str, service: str, *, timeout: float) -> net.Connection:
        if self.principal in self.memory.dead:
            raise Unavailable(f"{self.principal} is dead")
        if address in self.memory.down or address not in self.memory.servers:
            raise Unavailable(f"no route to {address}")
        name, handler = self.memory.servers[address]
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery = self.memory.nurseries.get(address, self.memory.nursery)
        nursery.start_soon(net.serve_stream, server_stream, server_auth_for(name), handler)
        client_auth = PskClientAuth(self.principal, ROLES[self.principal], PSK)
        return await net.Connection.from_stream(client_stream, client_auth, timeout=timeout)


class Commander:
    """Grants each drone its ranges; tells clients the whole map; can move a drone's slots."""

    def __init__(self, grant_key: bytes) -> None:
        self.grant_key = grant_key
        self.ranges = {drone: ranges_of(drone) for drone in DRONES}
        self.version = 1

    def move(self, source: str, target: str) -> tuple[tuple[int, int, int], ...]:
        """Give `source`'s ranges to `target` under the next epoch; the new map's ranges."""
        moved = tuple((first, last, epoch + 1) for first, last, epoch in self.ranges[source])
        self.ranges[source] = ()
        self.ranges[target] = tuple(sorted(self.ranges[target] + moved))
        self.version += 1
        return moved

    def map_ranges(self) -> list[tuple[int, int, str, int]]:
        return sorted((f, last, d, e) for d, ranges in self.ranges.items() for f, last, e in ranges)

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        if isinstance(msg, Register):
            return Registered(incarnation=1, heartbeat_ms=100, lease_ms=600)
        if isinstance(msg, Heartbeat):
            grant = Grant(msg.drone, 1, self.ranges.get(msg.drone, ()), 0)
            return HeartbeatReply(grant=sign_grant(grant, self.grant_key), map_version=1)
        if isinstance(msg, GetMap):
            drones = {d: address_of(d) for d in DRONES}
            return SlotMap(term=1, version=self.version, ranges=self.map_ranges(), drones=drones)
        raise BadRequest(f"the test commander does not answer {msg.TYPE}")


class Cluster:
    def __init__(self, nursery: trio.Nursery, data: Path) -> None:
        self.nursery = nursery
        self.net = MemoryNet(nursery)
        self.db = Database(SqliteBackend(data / "keyval.sqlite3"))
        self.net.servers[DB_ADDRESS] = ("db", self.db.handle)
        self.drones: dict[str, Drone] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self) -> None:
        await self.db.open()
        await self.nursery.start(self.db.run)
        connection = await self.net.dialer("commander-1")(DB_ADDRESS, "db", timeout=5)
        reply = await connection.request(DbGrantKey(), timeout=5)
        if not isinstance(reply, DbGrantKeyReply):
            raise RuntimeError("no grant key")
        await connection.aclose()
        self.commander = Commander(reply.key)
        self.net.servers[COMMANDER_ADDRESS] = ("commander-1", self.commander)
        for name in DRONES:
            await self.nursery.start(self._run_drone, name)
        await self.wait_loaded()

    async def _run_drone(self, name: str, *, task_status: trio.TaskStatus[None]) -> None:
        """One drone, its background tasks and its served connections, in a nursery of its own
        (cancelling it is a SIGKILL: nothing of the drone runs on)."""
        settings = DroneSettings(
            db=DB_ADDRESS, commanders=(Endpoint("commander-1", COMMANDER_ADDRESS),)
        )
        security = Security(self.net.dialer(name), functools.partial(server_auth_for, name))
        drone = Drone(name, settings, security)
        self.drones[name] = drone
        async with trio.open_nursery() as inner:
            self.scopes[name] = inner.cancel_scope
            self.net.nurseries[address_of(name)] = inner
            self.net.servers[address_of(name)] = (name, DroneHandler(drone.state))
            await drone.start_background(inner, address_of(name))
            task_status.started()

    def kill(self, name: str) -> None:
        """As SIGKILL would: unreachable, silent, its tasks gone. Shielded tasks (a vote's
        outcome) still finish, but cannot reach anyone, and give up recovering at once."""
        self.participant(name).recovery_max_ms = 0
        self.net.down.add(address_of(name))
        self.net.dead.add(name)
        self.scopes[name].cancel()

    async def move(self, source: str, target: str) -> None:
        """Give a (dead) drone's slots to another: save the map (raising the fences) first."""
        self.commander.move(source, target)
        link = await self.link("commander-1", DB_ADDRESS)
        await link.request(DbRegisterTerm("commander-1", 1), timeout=5)
        await link.request(
            DbSaveMap(1, self.commander.version, self.commander.map_ranges()), timeout=5
        )
        await link.aclose()
        await self.wait_loaded()

    async def wait_loaded(self) -> None:
        with trio.fail_after(10):
            while not all(
                self._loaded(name) for name in DRONES if name not in self.net.down_names()
            ):
                await trio.sleep(0.05)

    def _loaded(self, name: str) -> bool:
        ready = self.drones[name].state.table.ready_ranges()
        return sorted(ready) == sorted(self.commander.ranges[name])

    def participant(self, drone: str) -> Participant:
        return participant(self.drones[drone].state)

    def client(self) -> AsyncClient:
        settings = ClientSettings(commanders=(Endpoint("commander-1", COMMANDER_ADDRESS),))
        return client_from_settings(settings, self.net.dialer("client"), rng=random.Random(3))

    async def link(self, principal: str, address: str) -> net.Connection:
        return await self.net.dialer(principal)(address, "", timeout=5)


def server_auth_for(name: str) -> ServerAuth:
    keys = {p: (role, PSK) for p, role in ROLES.items()}
    return PskServerAuth(keys, server_name=name, server_role=ROLES[name])
