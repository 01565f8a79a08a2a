"""A real commander (keyval.commander's state machine and request handler) served over
keyval.net on in-memory streams, for the admin tool to talk to under trio's autojump clock.

What is not real here: drones are heartbeats sent straight into the commander's handler by a
task (no slot data), and the db is `MapStore`, which keeps saved maps in a list. The commander
code paths the admin tool drives (get_map, move, drain, role checks, map saves, lease
blocking on a move) are the daemon's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import trio
import trio.testing

from keyval import net
from keyval.admin.remote import AdminRemote
from keyval.client.config import ClientSettings, Endpoint
from keyval.client.links import Link
from keyval.commander.daemon import Commander
from keyval.commander.state import CommanderState
from keyval.messages import Heartbeat, Register, Registered
from keyval.timing import HEARTBEAT_MS
from wire.channel import PeerInfo, PskClientAuth, PskServerAuth

PSK = b"k" * 32
GRANT_KEY = b"g" * 32
COMMANDER = "commander-1"
PRINCIPALS = {"admin": ("admin", PSK), "client": ("client", PSK)}


class MapStore:
    """Stands in for the db's DbSaveMap: accepts every save and remembers it."""

    def __init__(self) -> None:
        self.saves: list[tuple[int, int, list[tuple[int, int, str, int]]]] = []

    async def save_map(self, term: int, version: int, ranges: list[Any]) -> None:
        self.saves.append((term, version, list(ranges)))


@dataclasses.dataclass
class MemoryDialer:
    """Dial the commander over a memory stream pair with a pre-shared key."""

    commander: Commander
    nursery: trio.Nursery
    name: str = "admin"
    role: str = "admin"
    refuse: bool = False  # act as an unreachable commander

    async def __call__(self, address: str, service: str, *, timeout: float) -> Link:
        if self.refuse:
            raise OSError(f"connection refused by {address}")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server_auth = PskServerAuth(PRINCIPALS, server_name=COMMANDER, server_role="commander")
        self.nursery.start_soon(net.serve_stream, server_stream, server_auth, self.commander.handle)
        return await net.Connection.from_stream(
            client_stream, PskClientAuth(self.name, self.role, PSK), timeout=timeout
        )


class Cluster:
    """A running commander with `drones` heartbeating drones."""

    def __init__(self, nursery: trio.Nursery, drones: int) -> None:
        self.nursery = nursery
        self.store = MapStore()
        state = CommanderState(
            name=COMMANDER, term=1, now=trio.current_time(), expect_drones=drones
        )
        self.commander = Commander(state, GRANT_KEY, self.store)  # type: ignore[arg-type]
        self.incarnations: dict[str, int] = {}
        self.stopped: set[str] = set()
        self.drone_names = [f"drone-{index}" for index in range(1, drones + 1)]

    async def start(self) -> None:
        for name in self.drone_names:
            await self.add_drone(name)
        self.nursery.start_soon(self.commander.run_ticker)
        self.nursery.start_soon(self._heartbeats)
        while self.commander.state.saved_version == 0:
            await trio.sleep(HEARTBEAT_MS / 1000)

    async def add_drone(self, name: str) -> None:
        peer = PeerInfo(name=name, role="drone")
        reply = await self.commander.handle(peer, Register(drone=name, address=f"{name}:6240"))
        if not isinstance(reply, Registered):
            raise RuntimeError(f"register answered {reply!r}")
        self.incarnations[name] = reply.incarnation

    async def _heartbeats(self) -> None:
        while True:
            for name, incarnation in list(self.incarnations.items()):
                if name in self.stopped:
                    continue
                peer = PeerInfo(name=name, role="drone")
                load = {"keys": 10, "bytes": 2048, "ops_per_s": 1.5}
                await self.commander.handle(
                    peer, Heartbeat(drone=name, incarnation=incarnation, load=load, ready=[])
                )
            await trio.sleep(HEARTBEAT_MS / 1000)

    def remote(
        self, *, name: str = "admin", role: str = "admin", refuse: bool = False
    ) -> AdminRemote:
        settings = ClientSettings(commanders=(Endpoint(COMMANDER, "memory:1"),))
        dialer = MemoryDialer(self.commander, self.nursery, name, role, refuse)
        return AdminRemote(settings, dialer)
