"""Service tickets: issue (TGS), open at the service, and every way one is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from auth import keys
from auth.authority import AuthorityConfig
from auth.handshake import ServiceKeyring, TicketClientAuth, TicketServerAuth
from auth.messages import PrincipalList, ServiceState, ServiceStateRequest, TicketRequest
from auth.roles import check_key_permission, require_role
from auth.tickets import TicketError, live_key_versions
from tests.auth.helpers import T0, Setup, handshake, make_setup, service_ticket, tgt_peer
from wire import codec
from wire.channel import PeerInfo
from wire.errors import AuthenticationError, NotFound, Unauthorized


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path)


def keyring_for(setup: Setup, service: str, now: float) -> ServiceKeyring:
    """What ServiceIdentity does: log in as the service and fetch its keys."""
    state = setup.authority.handle(tgt_peer(setup, service, now), ServiceStateRequest(), now)
    assert isinstance(state, ServiceState)
    role = setup.authority.registry.require(service).role.value
    keyring = ServiceKeyring(service, role, skew_s=state.skew_s)
    keyring.update(state.keys, state.revoked)
    return keyring


def connect(setup: Setup, client: str, service: str, now: float, at: float) -> PeerInfo:
    reply = service_ticket(setup, client, service, now)
    client_auth = TicketClientAuth(
        reply.service, reply.service_role, reply.ticket, reply.session_key
    )
    server_peer, client_peer = handshake(
        client_auth, TicketServerAuth(keyring_for(setup, service, at)), at
    )
    assert client_peer.name == service  # mutual: the client learns who answered
    return server_peer


def test_ticket_authenticates_client_to_service_and_back(setup: Setup) -> None:
    peer = connect(setup, "alice", "drone-1", T0, T0 + 60)
    assert (peer.name, peer.role, peer.permissions) == ("alice", "client", ("alice/",))
    assert peer.expires_at == T0 + 3600


def test_ticket_lifetime_is_configurable_and_bounded_by_the_tgt(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, AuthorityConfig(ticket_lifetime_s=600, tgt_lifetime_s=300))
    assert service_ticket(setup, "alice", "drone-1", T0).expires_at == T0 + 300


def test_expired_service_ticket_is_refused(setup: Setup) -> None:
    with pytest.raises(AuthenticationError, match="expired 1 s ago"):
        connect(setup, "alice", "drone-1", T0, T0 + 3601)


def test_ticket_for_another_service_is_refused(setup: Setup) -> None:
    reply = service_ticket(setup, "alice", "drone-1", T0)
    auth = TicketClientAuth("drone-2", "drone", reply.ticket, reply.session_key)
    with pytest.raises(AuthenticationError, match="ticket is for service 'drone-1', not 'drone-2'"):
        handshake(auth, TicketServerAuth(keyring_for(setup, "drone-2", T0)), T0)


def test_ticket_under_a_rotated_out_key_is_refused_after_its_grace(tmp_path: Path) -> None:
    config = AuthorityConfig(key_rotation_s=600, ticket_lifetime_s=900, tgt_lifetime_s=7200)
    setup = make_setup(tmp_path, config)
    start = 600 * 3_000_000.0  # the first second of a key period
    reply = service_ticket(setup, "alice", "drone-1", start)
    auth = TicketClientAuth("drone-1", "drone", reply.ticket, reply.session_key)
    # After a rotation the previous key still opens tickets (they are still valid).
    handshake(auth, TicketServerAuth(keyring_for(setup, "drone-1", start + 800)), start + 800)
    # Once every ticket under it has expired (period end + lifetime) the key is gone.
    later = start + 600 + 900
    with pytest.raises(
        AuthenticationError, match="key version 3000000, which 'drone-1' has retired"
    ):
        handshake(auth, TicketServerAuth(keyring_for(setup, "drone-1", later)), later)


def test_live_key_versions_cover_grace_and_the_next_period() -> None:
    assert live_key_versions(1000.0, rotation_s=600, lifetime_s=900) == [0, 1, 2]
    assert live_key_versions(1500.0, rotation_s=600, lifetime_s=900) == [1, 2, 3]


@pytest.mark.parametrize("position", [-1, -20, 12])
def test_tampered_ticket_is_refused(setup: Setup, position: int) -> None:
    reply = service_ticket(setup, "alice", "drone-1", T0)
    service, version, nonce, ciphertext = codec.decode(reply.ticket)[1:]
    flipped = bytearray(ciphertext)
    flipped[position] ^= 1
    forged = codec.encode_canonical(["keyval-ticket-1", service, version, nonce, bytes(flipped)])
    auth = TicketClientAuth("drone-1", "drone", forged, reply.session_key)
    with pytest.raises(AuthenticationError, match="fails its integrity check"):
        handshake(auth, TicketServerAuth(keyring_for(setup, "drone-1", T0)), T0)


def test_ticket_header_cannot_be_moved_to_another_version(setup: Setup) -> None:
    reply = service_ticket(setup, "alice", "drone-1", T0)
    service, version, nonce, ciphertext = codec.decode(reply.ticket)[1:]
    forged = codec.encode_canonical(["keyval-ticket-1", service, version + 1, nonce, ciphertext])
    keyring = keyring_for(setup, "drone-1", T0)
    with pytest.raises(TicketError, match="integrity"):
        keyring.open(forged, T0)


@pytest.mark.parametrize("garbage", [b"", b"\xff\x00", codec.encode([1, 2]), None, "text"])
def test_garbage_ticket_is_refused(setup: Setup, garbage: object) -> None:
    with pytest.raises(TicketError):
        keyring_for(setup, "drone-1", T0).open(garbage, T0)


def test_stolen_ticket_without_the_session_key_fails(setup: Setup) -> None:
    reply = service_ticket(setup, "alice", "drone-1", T0)
    thief = TicketClientAuth("drone-1", "drone", reply.ticket, os.urandom(32))
    with pytest.raises(AuthenticationError, match="could not prove"):
        handshake(thief, TicketServerAuth(keyring_for(setup, "drone-1", T0)), T0)


def test_client_cannot_act_as_a_drone(setup: Setup) -> None:
    peer = connect(setup, "alice", "drone-1", T0, T0)
    with pytest.raises(Unauthorized, match="needs role drone; principal 'alice' has role 'client'"):
        require_role(peer, "drone", action="heartbeat")
    require_role(connect(setup, "drone-2", "drone-1", T0, T0), "drone")


def test_role_in_a_ticket_cannot_be_changed_by_its_holder(setup: Setup) -> None:
    # The role is inside the sealed contents: only flipping ciphertext bits could change it,
    # which the integrity check catches (test_tampered_ticket_is_refused). The header carries
    # only service and key version.
    reply = service_ticket(setup, "alice", "drone-1", T0)
    assert b"client" not in reply.ticket


def test_key_prefix_permissions(setup: Setup) -> None:
    alice = connect(setup, "alice", "drone-1", T0, T0)
    check_key_permission(alice, "alice/x")
    check_key_permission(alice, b"alice/y")
    for key in ("bob/x", b"bob", "alic", 7):
        with pytest.raises(Unauthorized, match="may only use keys starting with 'alice/'"):
            check_key_permission(alice, key)
    check_key_permission(connect(setup, "bob", "drone-1", T0, T0), "anything")


def test_tickets_only_for_service_principals(setup: Setup) -> None:
    alice = tgt_peer(setup, "alice", T0)
    for target in ("bob", "nobody"):
        with pytest.raises(NotFound, match="no service principal"):
            setup.authority.handle(alice, TicketRequest(target), T0)


def test_only_services_get_ticket_keys_and_only_admins_manage(setup: Setup) -> None:
    alice = tgt_peer(setup, "alice", T0)
    with pytest.raises(Unauthorized, match="needs role commander or db or drone"):
        setup.authority.handle(alice, ServiceStateRequest(), T0)
    with pytest.raises(Unauthorized, match="needs role admin"):
        setup.authority.handle(tgt_peer(setup, "drone-1", T0), PrincipalList(), T0)


def test_revoked_principal_is_refused_by_a_service(setup: Setup) -> None:
    reply = service_ticket(setup, "alice", "drone-1", T0)
    setup.authority.registry.set_enabled("alice", False)
    keyring = keyring_for(setup, "drone-1", T0 + 1)
    assert keyring.is_revoked("alice") and not keyring.is_revoked("bob")
    auth = TicketClientAuth("drone-1", "drone", reply.ticket, reply.session_key)
    with pytest.raises(AuthenticationError, match="'alice' is disabled"):
        handshake(auth, TicketServerAuth(keyring), T0 + 1)
    connect(setup, "bob", "drone-1", T0, T0 + 1)  # everyone else is still served


def test_authority_dir_holds_no_principal_private_key(setup: Setup) -> None:
    own = {"authority.key", "ticket-master.key"}
    for path in setup.data_dir.iterdir():
        text = path.read_bytes()
        if path.name in own:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            continue
        assert b"PRIVATE KEY" not in text, path
        for key_file in setup.key_dir.iterdir():
            seed = keys.load_private_key(key_file).private_bytes_raw()
            assert key_file.read_bytes() not in text
            assert seed not in text and seed.hex().encode() not in text, (path, key_file)
    assert stat.S_IMODE(setup.key_path("alice").stat().st_mode) == 0o600
