"""The authority, a service and clients over keyval.net (memory streams, autojump clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from auth.authority import ANONYMOUS_ROLE
from auth.client import Credentials
from auth.handshake import AuthorityServerAuth
from auth.messages import PrincipalSetEnabled
from auth.roles import require_role
from auth.service import REVOCATION_REFRESH_S, ServiceIdentity
from keyval import net
from tests.auth.helpers import T0, Setup, make_setup
from tests.auth.memnet import MemoryNet
from wire.channel import PeerInfo
from wire.errors import AuthenticationError, Unauthorized, Unavailable
from wire.messages import Message, Ok, Ping, message


@message("test.auth.heartbeat")
class Heartbeat(Message):
    """Stands in for a drone-only request."""


def fake_now() -> float:
    return T0 + trio.current_time()


class Cluster:
    def __init__(self, setup: Setup, network: MemoryNet) -> None:
        self.setup = setup
        self.net = network
        authority = setup.authority

        async def handle(peer: PeerInfo, msg: Message) -> Message:
            return authority.handle(peer, msg, fake_now())

        def revoked(peer: PeerInfo) -> bool:
            principal = authority.registry.get(peer.name)
            return peer.role != ANONYMOUS_ROLE and (principal is None or not principal.enabled)

        network.serve("auth:6230", lambda: AuthorityServerAuth(authority), handle, revoked)

    def credentials(self, name: str) -> Credentials:
        return Credentials(
            name,
            self.setup.key_path(name),
            "auth:6230",
            self.setup.authority.keys.info.public_key_hex,
            clock=fake_now,
            connect=self.net.connect,
        )

    async def start_drone(self, nursery: trio.Nursery, name: str) -> ServiceIdentity:
        identity = ServiceIdentity(self.credentials(name), clock=fake_now)
        await identity.start(nursery)

        async def handle(peer: PeerInfo, msg: Message) -> Message:
            if isinstance(msg, Heartbeat):
                require_role(peer, "drone", action="heartbeat")
            return Ok()

        self.net.serve(name, identity.server_auth, handle, identity.revoked)
        return identity

    async def connect(self, client: str, service: str) -> net.Connection:
        auth = await self.credentials(client).client_auth(service)
        return await self.net.connect(service, auth)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        yield Cluster(make_setup(tmp_path), MemoryNet(nursery, fake_now))
        nursery.cancel_scope.cancel()


async def test_client_reaches_service_with_tickets(
    cluster: Cluster, autojump_clock: object
) -> None:
    async with trio.open_nursery() as nursery:
        await cluster.start_drone(nursery, "drone-1")
        connection = await cluster.connect("alice", "drone-1")
        assert connection.peer.name == "drone-1" and connection.peer.role == "drone"
        assert isinstance(await connection.request(Ping()), Ok)
        with pytest.raises(Unauthorized, match="heartbeat needs role drone"):
            await connection.request(Heartbeat())
        assert isinstance(await connection.request(Ping()), Ok)  # still served
        drone = await cluster.connect("drone-2", "drone-1")
        assert isinstance(await drone.request(Heartbeat()), Ok)
        nursery.cancel_scope.cancel()


async def test_credentials_are_shared_by_many_tasks(
    cluster: Cluster, autojump_clock: object
) -> None:
    creds = cluster.credentials("alice")
    async with trio.open_nursery() as nursery:
        await cluster.start_drone(nursery, "drone-1")
        results: list[object] = []

        async def one() -> None:
            results.append(await creds.client_auth("drone-1"))

        async with trio.open_nursery() as inner:
            for _ in range(10):
                inner.start_soon(one)
        assert len({id(r._ticket) for r in results}) == 1  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


async def test_credentials_renew_before_expiry(cluster: Cluster, autojump_clock: object) -> None:
    creds = cluster.credentials("alice")
    first = await creds.client_auth("drone-1")
    await trio.sleep(3600 * 0.81)
    second = await creds.client_auth("drone-1")
    assert first.hello() != second.hello()


async def test_login_errors_reach_the_client(cluster: Cluster, autojump_clock: object) -> None:
    cluster.setup.authority.registry.set_enabled("bob", False)
    with pytest.raises(Unauthorized, match="'bob' is disabled"):
        await cluster.credentials("bob").client_auth("drone-1")
    wrong = cluster.credentials("alice")
    wrong.key_path = cluster.setup.key_path("bob")
    with pytest.raises(Unauthorized, match="signature does not match"):
        await wrong.client_auth("drone-1")


async def test_revoked_principal_is_cut_off_within_the_bound(
    cluster: Cluster, autojump_clock: object
) -> None:
    async with trio.open_nursery() as nursery:
        await cluster.start_drone(nursery, "drone-1")
        alice_auth = await cluster.credentials("alice").client_auth("drone-1")
        alice = await cluster.net.connect("drone-1", alice_auth)
        bob = await cluster.connect("bob", "drone-1")
        assert isinstance(await alice.request(Ping()), Ok)
        admin = await cluster.credentials("root").authority_connection()
        await admin.request(PrincipalSetEnabled(name="alice", enabled=False))
        disabled_at = trio.current_time()
        while True:
            try:
                await alice.request(Ping())
            except Unauthorized as error:
                assert "'alice' has been revoked" in error.message
                break
            await trio.sleep(0.1)
        poll_step_s = 0.1
        assert trio.current_time() - disabled_at <= REVOCATION_REFRESH_S + poll_step_s
        with pytest.raises(Unavailable):  # the connection was closed
            await alice.request(Ping())
        assert isinstance(await bob.request(Ping()), Ok)  # everyone else is served
        with pytest.raises(AuthenticationError, match="'alice' is disabled"):
            await cluster.net.connect("drone-1", alice_auth)  # its ticket no longer opens
        nursery.cancel_scope.cancel()
