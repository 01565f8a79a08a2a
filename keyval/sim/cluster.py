"""A whole keyval cluster inside one `trio.run`, over the simulated network.

Every node is the real daemon: the ticket authority (`auth.daemon.run_authority`), the db
(`keyval.dbserver.run_db` on SQLite in a file), the commander (`keyval.commander.run_commander`)
and the drones (`keyval.drone.run_drone`). Each node's task sets `keyval.net.TRANSPORT` to a
`SimTransport` that dials and listens as that node on the `Network`, so the daemons run
unchanged and every byte between them crosses the simulated network.

A node runs in its own cancel scope. `kill` breaks its streams (the network) and cancels its
tasks (the process): what it had in memory is gone; what it wrote to disk (the db file, the
authority's directory) stays, and `start` runs it again from there. Addresses are fixed per
node (`drone-1:6240`), so a restarted node is found where it was.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from auth.bootstrap import add_principal, init_authority
from auth.daemon import run_authority
from keyval import net
from keyval.client.config import ClientSettings, parse_commanders
from keyval.commander.daemon import run_commander
from keyval.dbserver import run_db
from keyval.drone.daemon import run_drone
from keyval.nodeconfig import NodeOptions
from keyval.sim.network import Network, SimListener

logger = logging.getLogger(__name__)

AUTHORITY = "authority"
DB = "db"
CLIENT = "client"
ADMIN = "admin"

# The default ports of docs/architecture.md, on per-node host names.
AUTHORITY_PORT = 6230
DB_PORT = 6231
FIRST_COMMANDER_PORT = 6232
FIRST_DRONE_PORT = 6240

# A node that has not started serving within this much virtual time is broken: a start-up
# waits for the authority and the db, which the harness starts first.
NODE_START_TIMEOUT_S = 60.0


class SimClusterError(RuntimeError):
    """The harness was misused: an unknown node, starting a running node."""


class SimTransport:
    """`keyval.net.Transport` for one node of the simulated network."""

    def __init__(self, network: Network, node: str) -> None:
        self.network = network
        self.node = node

    async def connect(self, address: str) -> trio.abc.Stream:
        return await self.network.connect(self.node, address)

    async def listen(self, address: str) -> tuple[Sequence[trio.abc.Listener[Any]], str]:
        listener: SimListener = self.network.listen(self.node, address)
        return [listener], listener.address


NodeMain = Callable[..., Awaitable[None]]


@dataclass(eq=False)
class SimNode:
    name: str
    role: str
    address: str
    main: Callable[[], tuple[NodeMain, tuple[Any, ...]]]  # what to run: (function, args)
    scope: trio.CancelScope | None = None
    running: bool = False
    starts: int = 0
    crashes: list[str] = field(default_factory=list)  # unexpected exits, for the report


class SimCluster:
    """The nodes of one simulated cluster. Use inside `trio.run` with a `SimClock`."""

    def __init__(
        self,
        root: Path,
        network: Network,
        nursery: trio.Nursery,
        *,
        drones: int = 3,
        lease_ms: int | None = None,
    ) -> None:
        if drones < 1:
            raise SimClusterError("a cluster needs at least one drone")
        self.root = root
        self.network = network
        self.nursery = nursery
        self.drone_names = [f"drone-{index}" for index in range(1, drones + 1)]
        self.commander_names = ["commander-1"]
        self.lease_ms = lease_ms
        self.nodes: dict[str, SimNode] = {}
        self.authority_key = ""
        self._prepare()

    # ------------------------------------------------------------------ set-up

    def _key(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key"

    def _prepare(self) -> None:
        authority_dir = self.root / "auth"
        (self.root / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
        info = init_authority(authority_dir)
        self.authority_key = info.public_key_hex
        principals = [(DB, "db"), (CLIENT, "client"), (ADMIN, "admin")]
        principals += [(name, "commander") for name in self.commander_names]
        principals += [(name, "drone") for name in self.drone_names]
        for name, role in principals:
            add_principal(authority_dir, name, role, self._key(name))
        for name in [AUTHORITY, DB, CLIENT, ADMIN, *self.commander_names, *self.drone_names]:
            self.network.add_node(name)
        authority_address = f"{AUTHORITY}:{AUTHORITY_PORT}"
        self._add(AUTHORITY, "auth", authority_address, self._authority_main(authority_dir))
        db_address = f"{DB}:{DB_PORT}"
        self._add(DB, "db", db_address, self._options_main(run_db, DB, db_address, {}))
        commander_addresses = []
        for index, name in enumerate(self.commander_names):
            address = f"{name}:{FIRST_COMMANDER_PORT + index}"
            commander_addresses.append(address)
            extra: dict[str, Any] = {"db": db_address, "expect_drones": len(self.drone_names)}
            if self.lease_ms is not None:
                extra["lease_ms"] = self.lease_ms
            main = self._options_main(run_commander, name, address, extra)
            self._add(name, "commander", address, main)
        self.commander_addresses = commander_addresses
        for index, name in enumerate(self.drone_names):
            address = f"{name}:{FIRST_DRONE_PORT + index}"
            extra = {"db": db_address, "commander": commander_addresses}
            self._add(name, "drone", address, self._options_main(run_drone, name, address, extra))

    def _add(
        self,
        name: str,
        role: str,
        address: str,
        main: Callable[[], tuple[NodeMain, tuple[Any, ...]]],
    ) -> None:
        self.nodes[name] = SimNode(name, role, address, main)

    def _authority_main(self, data: Path) -> Callable[[], tuple[NodeMain, tuple[Any, ...]]]:
        return lambda: (run_authority, (data, f"{AUTHORITY}:{AUTHORITY_PORT}"))

    def _options_main(
        self, function: NodeMain, name: str, address: str, extra: dict[str, Any]
    ) -> Callable[[], tuple[NodeMain, tuple[Any, ...]]]:
        def main() -> tuple[NodeMain, tuple[Any, ...]]:
            return function, (self.options(name, address, extra),)

        return main

    def options(self, name: str, listen: str, extra: dict[str, Any]) -> NodeOptions:
        return NodeOptions(
            name=name,
            key=self._key(name),
            authority=f"{AUTHORITY}:{AUTHORITY_PORT}",
            authority_key=self.authority_key,
            listen=listen,
            data=self.root / name,
            extra=dict(extra),
        )

    def client_settings(self, name: str = CLIENT, *, ack: str = "durable") -> ClientSettings:
        """Settings for a client principal (`client` or `admin`) reaching this cluster."""
        return ClientSettings(
            commanders=parse_commanders(list(self.commander_addresses), self.commander_names),
            ack=ack,
            identity=self.options(name, "", {}),
        )

    # ------------------------------------------------------------------ running

    def node(self, name: str) -> SimNode:
        node = self.nodes.get(name)
        if node is None:
            raise SimClusterError(f"no node named {name!r}")
        return node

    async def start_all(self) -> None:
        for name in [AUTHORITY, DB, *self.commander_names, *self.drone_names]:
            await self.start(name)

    async def start(self, name: str) -> None:
        """Run `name` (again, from its durable state) and wait until it serves."""
        node = self.node(name)
        if node.running:
            raise SimClusterError(f"{name} is already running")
        self.network.restart(name)
        self.network.resume(name)
        with trio.fail_after(NODE_START_TIMEOUT_S):
            await self.nursery.start(self._run, node)

    async def _run(self, node: SimNode, *, task_status: trio.TaskStatus[None]) -> None:
        net.TRANSPORT.set(SimTransport(self.network, node.name))  # this task and its children
        function, args = node.main()
        node.running = True
        node.starts += 1
        started = False
        try:
            with trio.CancelScope() as scope:
                node.scope = scope
                async with trio.open_nursery() as inner:
                    await inner.start(functools.partial(function, *args))
                    started = True
                    task_status.started()
        except Exception as error:  # a daemon that dies is a finding, not a harness crash
            if not started:
                raise
            node.crashes.append(f"{type(error).__name__}: {error}")
            logger.info("%s exited: %r", node.name, error)
        finally:
            node.running = False
            node.scope = None

    def kill(self, name: str) -> None:
        """Crash `name`: streams break, tasks stop, memory is lost; its files stay."""
        node = self.node(name)
        self.network.kill(name)
        if node.scope is not None:
            node.scope.cancel()

    def pause(self, name: str) -> None:
        self.network.pause(name)

    def resume(self, name: str) -> None:
        self.network.resume(name)

    def crashes(self) -> dict[str, list[str]]:
        return {name: node.crashes for name, node in self.nodes.items() if node.crashes}
