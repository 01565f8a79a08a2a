"""Shared set-up for the auth tests: a real data directory, real keys, real channels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from auth import keys
from auth.authority import Authority, AuthorityConfig
from auth.bootstrap import add_principal, init_authority
from auth.datadir import load_authority_dir
from auth.handshake import AuthorityClientAuth, AuthorityServerAuth
from auth.login import finish_login, start_login
from auth.messages import LoginReply, TicketReply, TicketRequest
from auth.principals import Registry
from wire.channel import (
    ClientAuth,
    ClientChannel,
    HandshakeDone,
    PeerInfo,
    ServerAuth,
    ServerChannel,
)

T0 = 1_800_000_000.0  # a fixed "now" for state-machine tests
ANONYMOUS = PeerInfo(name="", role="anonymous")

PRINCIPALS = {
    "alice": "client",
    "bob": "client",
    "drone-1": "drone",
    "drone-2": "drone",
    "db-1": "db",
    "root": "admin",
}


@dataclasses.dataclass
class Setup:
    data_dir: Path
    key_dir: Path
    authority: Authority

    def key_path(self, name: str) -> Path:
        return self.key_dir / f"{name}.key"

    def private_key(self, name: str) -> keys.Ed25519PrivateKey:
        return keys.load_private_key(self.key_path(name))


def make_setup(tmp_path: Path, config: AuthorityConfig | None = None) -> Setup:
    data_dir = tmp_path / "authority"
    key_dir = tmp_path / "keys"
    key_dir.mkdir(parents=True)
    init_authority(data_dir)
    for name, role in PRINCIPALS.items():
        prefixes = ("alice/",) if name == "alice" else ()
        add_principal(data_dir, name, role, key_dir / f"{name}.key", prefixes=prefixes)
    authority = Authority(load_authority_dir(data_dir), Registry(data_dir), config)
    return Setup(data_dir, key_dir, authority)


def handshake(
    client_auth: ClientAuth, server_auth: ServerAuth, now: float
) -> tuple[PeerInfo, PeerInfo]:
    """Run the channel handshake in memory; return (peer seen by server, peer seen by client).

    Raises what the channel raises (AuthenticationError for a refused ticket)."""
    client = ClientChannel(client_auth)
    server = ServerChannel(server_auth, now=now)
    server_peer = client_peer = None
    for _ in range(4):
        server.receive_data(client.data_to_send())
        event = server.next_event()
        if isinstance(event, HandshakeDone):
            server_peer = event.peer
        client.receive_data(server.data_to_send())
        event = client.next_event()
        if isinstance(event, HandshakeDone):
            client_peer = event.peer
        if server_peer is not None and client_peer is not None:
            return server_peer, client_peer
    raise AssertionError("handshake did not finish")


def login(setup: Setup, name: str, now: float) -> tuple[LoginReply, bytes]:
    pending = start_login(name, setup.authority.id, setup.private_key(name), now)
    reply = setup.authority.handle(ANONYMOUS, pending.request, now)
    assert isinstance(reply, LoginReply)
    return reply, finish_login(pending, reply)


def tgt_peer(setup: Setup, name: str, now: float) -> PeerInfo:
    reply, session_key = login(setup, name, now)
    public = keys.public_key_from_hex(setup.authority.keys.info.public_key_hex)
    client_auth = AuthorityClientAuth(public, tgt=reply.tgt, session_key=session_key)
    server_peer, _ = handshake(client_auth, AuthorityServerAuth(setup.authority), now)
    return server_peer


def service_ticket(setup: Setup, client: str, service: str, now: float) -> TicketReply:
    reply = setup.authority.handle(tgt_peer(setup, client, now), TicketRequest(service), now)
    assert isinstance(reply, TicketReply)
    return reply
