"""The commander daemon in-process with the real authority and db, over loopback TCP.

Real sockets need the real clock (trio's autojump clock would jump while a socket waits), so
these tests use short real waits, each under a `fail_after` bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from auth.bootstrap import add_principal, init_authority
from auth.client import Credentials
from auth.daemon import run_authority
from keyval import net
from keyval.commander import run_commander
from keyval.drone.vote import Reply, Voter
from keyval.grants import NUM_SLOTS, Grant
from keyval.messages import (
    AwaitGrant,
    Ballot,
    BallotReply,
    Drain,
    GetMap,
    Heartbeat,
    HeartbeatReply,
    MapChange,
    MoveSlot,
    Rebalance,
    Register,
    Registered,
    Released,
    SlotMap,
    SlotMoved,
)
from keyval.nodeconfig import NodeOptions
from keyval.timing import drone_lease_ms
from wire.errors import BadRequest, NotFound, NotLeader, Unauthorized, Unavailable

dbserver = pytest.importorskip("keyval.dbserver", reason="keyval.dbserver (run_db) not built yet")

PRINCIPALS = {
    "db": "db",
    "commander-1": "commander",
    "drone-1": "drone",
    "drone-2": "drone",
    "admin": "admin",
    "client": "client",
}
WAIT_S = 10.0  # bound on any one wait for the cluster to converge


@dataclass
class Cluster:
    root: Path
    authority: str
    authority_key: str
    db: str
    commander: str
    nursery: trio.Nursery
    opened: list[net.Connection]

    def options(self, name: str, **extra: object) -> NodeOptions:
        return NodeOptions(
            name=name,
            key=self.root / "keys" / f"{name}.key",
            authority=self.authority,
            authority_key=self.authority_key,
            listen="127.0.0.1:0",
            data=self.root / name,
            extra=dict(extra),
        )

    async def connect(self, name: str) -> net.Connection:
        credentials = Credentials(
            name, self.root / "keys" / f"{name}.key", self.authority, self.authority_key
        )
        auth = await credentials.client_auth("commander-1")
        connection = await net.open_connection(self.commander, auth)
        self.opened.append(connection)
        return connection


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    info = init_authority(tmp_path / "auth")
    (tmp_path / "keys").mkdir()
    for name, role in PRINCIPALS.items():
        add_principal(tmp_path / "auth", name, role, tmp_path / "keys" / f"{name}.key")
    async with trio.open_nursery() as nursery:
        authority = await nursery.start(run_authority, tmp_path / "auth", "127.0.0.1:0")
        partial = Cluster(tmp_path, authority, info.public_key_hex, "", "", nursery, [])
        partial.db = await nursery.start(dbserver.run_db, partial.options("db"))
        partial.commander = await nursery.start(
            run_commander, partial.options("commander-1", db=partial.db)
        )
        for name in ("drone-1", "drone-2"):  # the electorate: they elect commander-1
            nursery.start_soon(keep_voting, await partial.connect(name), name)
        with trio.fail_after(WAIT_S):
            while True:
                try:
                    await (await partial.connect("client")).request(GetMap())
                    break
                except NotLeader:
                    await trio.sleep(0.02)
        yield partial
        for connection in partial.opened:
            await connection.aclose()
        nursery.cancel_scope.cancel()


async def keep_voting(connection: net.Connection, name: str) -> None:
    """A drone's election side (the real Voter): vote, then echo the leader's replies, so the
    leader keeps its lease on the majority however long a test pauses between heartbeats."""
    voter = Voter(name)
    while True:
        ballot = Ballot(name, voter.term, voter.voted_for, voter.ack_for("commander-1"))
        try:
            reply = await connection.request(ballot)
        except Unavailable:
            if connection.is_closed:  # the fixture's teardown closed it: the test is over
                return
            raise
        assert isinstance(reply, BallotReply)
        decision = voter.on_reply(Reply(reply.commander, reply.role, reply.term, reply.sent_ms))
        voter.on_heartbeat_reply(reply.commander, reply.sent_ms)
        if decision is None:
            await trio.sleep(0.05)


class DroneClient:
    """A drone's commander side only: register, heartbeat, remember each grant and when."""

    def __init__(self, connection: net.Connection, name: str) -> None:
        self.connection = connection
        self.name = name
        self.incarnation = 0
        self.grants: list[tuple[float, Grant]] = []  # (send time, grant)

    async def register(self) -> None:
        reply = await self.connection.request(Register(self.name, "127.0.0.1:6250"))
        assert isinstance(reply, Registered)
        self.incarnation = reply.incarnation

    async def beat(self) -> Grant:
        return (await self.beat_reply()).grant

    async def beat_reply(self) -> HeartbeatReply:
        sent_at = trio.current_time()
        reply = await self.connection.request(Heartbeat(self.name, self.incarnation, {}, []))
        assert isinstance(reply, HeartbeatReply)
        assert reply.grant.drone == self.name
        self.grants.append((sent_at, reply.grant))
        return reply

    async def beat_until(self, slots: int) -> Grant:
        with trio.fail_after(WAIT_S):
            while (grant := await self.beat()).slots() != slots:
                await trio.sleep(0.05)
        return grant


def assert_never_two_owners(first: DroneClient, second: DroneClient) -> None:
    """No slot was held by both drones at once, each counting its lease as a drone does."""
    lease_s = drone_lease_ms(600) / 1000
    for sent_a, grant_a in first.grants:
        for sent_b, grant_b in second.grants:
            if abs(sent_a - sent_b) >= lease_s:
                continue
            for slot_range in grant_a.ranges:
                for slot in (slot_range[0], slot_range[1]):
                    assert grant_b.epoch_of(slot) is None, f"slot {slot} held twice"


async def test_register_heartbeat_grant_map_and_rebalance(cluster: Cluster) -> None:
    one = DroneClient(await cluster.connect("drone-1"), "drone-1")
    await one.register()
    grant = await one.beat_until(NUM_SLOTS)
    assert grant.ranges == ((0, NUM_SLOTS - 1, 1),) and grant.mac

    client = await cluster.connect("client")
    reply = await client.request(GetMap())
    assert isinstance(reply, SlotMap)
    assert reply.ranges == [(0, NUM_SLOTS - 1, "drone-1", 1)]
    assert reply.drones == {"drone-1": "127.0.0.1:6250"} and reply.leader == "commander-1"

    two = DroneClient(await cluster.connect("drone-2"), "drone-2")
    await two.register()
    with trio.fail_after(WAIT_S):
        while (await two.beat()).slots() != NUM_SLOTS // 2:
            await one.beat()
            await trio.sleep(0.05)
    assert (await one.beat()).slots() == NUM_SLOTS // 2
    assert_never_two_owners(one, two)

    # drone-1 stops heartbeating: after its lease, drone-2 holds everything.
    await two.beat_until(NUM_SLOTS)
    with pytest.raises(NotFound):
        await one.beat()
    assert_never_two_owners(one, two)


async def test_bad_input_is_refused_with_clear_errors(cluster: Cluster) -> None:
    one = DroneClient(await cluster.connect("drone-1"), "drone-1")
    with pytest.raises(Unauthorized, match="names must match"):
        await one.connection.request(Register("drone-2", "127.0.0.1:1"))
    await one.register()
    await one.beat_until(NUM_SLOTS)
    with pytest.raises(BadRequest, match="already live"):
        await one.connection.request(Register("drone-1", "127.0.0.1:1"))
    with pytest.raises(NotFound):
        await one.connection.request(Heartbeat("drone-1", one.incarnation + 1, {}, []))

    client = await cluster.connect("client")
    with pytest.raises(Unauthorized, match="role drone"):
        await client.request(Register("client", "127.0.0.1:1"))
    with pytest.raises(Unauthorized, match="role admin"):
        await client.request(MoveSlot(1, "drone-1"))

    admin = await cluster.connect("admin")
    with pytest.raises(NotFound):
        await admin.request(MoveSlot(1, "drone-9"))
    with pytest.raises(BadRequest, match="no other drone"):
        await admin.request(Drain("drone-1"))
    reply = await client.request(GetMap())
    assert isinstance(reply, SlotMap) and reply.ranges == [(0, NUM_SLOTS - 1, "drone-1", 1)]


async def test_admin_live_move_hands_the_slot_over_on_release(cluster: Cluster) -> None:
    one = DroneClient(await cluster.connect("drone-1"), "drone-1")
    two = DroneClient(await cluster.connect("drone-2"), "drone-2")
    await one.register()
    await two.register()
    admin = await cluster.connect("admin")
    with trio.fail_after(WAIT_S):
        while (await one.beat()).slots() + (await two.beat()).slots() != NUM_SLOTS:
            await trio.sleep(0.05)
    epoch = (await one.beat()).epoch_of(0)
    assert epoch is not None
    with pytest.raises(BadRequest, match="not being released"):
        await one.connection.request(Released("drone-1", one.incarnation, 0, epoch))

    change = await admin.request(MoveSlot(0, "drone-2"))
    assert isinstance(change, MapChange) and change.version >= 2
    with pytest.raises(BadRequest, match="already moving"):
        await admin.request(MoveSlot(0, "drone-2"))
    assert (await two.beat_reply()).importing == [0]
    granted: list[Grant] = []

    async def await_grant() -> None:
        reply = await two.connection.request(AwaitGrant("drone-2", two.incarnation, [0]))
        assert isinstance(reply, HeartbeatReply)
        granted.append(reply.grant)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(await_grant)
        with trio.fail_after(WAIT_S):
            while (await one.beat_reply()).release != [0]:
                await two.beat()  # a live drone heartbeats while it long-polls
                await trio.sleep(0.01)
        assert (await one.beat()).epoch_of(0) == epoch  # still the source's until it releases
        with pytest.raises(BadRequest, match="under epoch"):
            await one.connection.request(Released("drone-1", one.incarnation, 0, epoch + 5))
        released_at = trio.current_time()
        moved = await one.connection.request(Released("drone-1", one.incarnation, 0, epoch))
    handover_s = trio.current_time() - released_at
    assert isinstance(moved, SlotMoved)
    assert (moved.slot, moved.owner, moved.epoch) == (0, "drone-2", epoch + 1)
    assert granted and granted[0].epoch_of(0) == epoch + 1  # no wait for drone-1's lease
    assert handover_s < 1.0
    assert (await one.beat()).epoch_of(0) is None
    reply = await admin.request(GetMap())
    assert isinstance(reply, SlotMap) and reply.ranges[0] == (0, 0, "drone-2", epoch + 1)


async def test_rebalance_and_drain_by_admin(cluster: Cluster) -> None:
    one = DroneClient(await cluster.connect("drone-1"), "drone-1")
    await one.register()
    await one.beat_until(NUM_SLOTS)
    admin = await cluster.connect("admin")
    assert isinstance(await admin.request(Rebalance()), MapChange)
    two = DroneClient(await cluster.connect("drone-2"), "drone-2")
    await two.register()
    with trio.fail_after(WAIT_S):
        while (await two.beat()).slots() != NUM_SLOTS // 2:
            await one.beat()
            await trio.sleep(0.05)
    assert isinstance(await admin.request(Drain("drone-2")), MapChange)
    with trio.fail_after(WAIT_S):
        while (await one.beat()).slots() != NUM_SLOTS:
            await two.beat()
            await trio.sleep(0.05)
    assert (await two.beat()).slots() == 0
    assert_never_two_owners(one, two)
    client = await cluster.connect("client")
    with pytest.raises(Unauthorized, match="role admin"):
        await client.request(Rebalance())
