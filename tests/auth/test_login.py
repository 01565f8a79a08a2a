"""The AS exchange and the TGT handshake, driven through the state machine with a fake now."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from auth import keys
from auth.authority import AuthorityConfig
from auth.handshake import AuthorityClientAuth, AuthorityServerAuth
from auth.login import finish_login, start_login
from auth.messages import LoginReply, TicketRequest
from tests.auth.helpers import ANONYMOUS, T0, Setup, handshake, login, make_setup, tgt_peer
from wire.errors import AuthenticationError, Unauthorized


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path)


def refuse(setup: Setup, request: object, now: float = T0) -> str:
    with pytest.raises(Unauthorized) as caught:
        setup.authority.handle(ANONYMOUS, request, now)  # type: ignore[arg-type]
    return caught.value.message


def test_login_ok_gives_a_tgt_that_authenticates_the_principal(setup: Setup) -> None:
    reply, session_key = login(setup, "alice", T0)
    assert reply.role == "client"
    assert reply.expires_at == T0 + 3600
    assert len(session_key) == 32
    peer = tgt_peer(setup, "alice", T0 + 10)
    assert (peer.name, peer.role, peer.permissions) == ("alice", "client", ("alice/",))


def test_login_reply_is_readable_only_by_the_requester(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0)
    reply = setup.authority.handle(ANONYMOUS, pending.request, T0)
    assert isinstance(reply, LoginReply)
    eavesdropper = start_login("alice", setup.authority.id, setup.private_key("alice"), T0)
    with pytest.raises(AuthenticationError, match="integrity"):
        finish_login(
            dataclasses.replace(pending, ephemeral_private=eavesdropper.ephemeral_private), reply
        )


def test_wrong_key_is_refused(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("bob"), T0)
    assert "signature does not match the registered key of 'alice'" in refuse(
        setup, pending.request
    )


def test_unknown_principal_is_refused(setup: Setup) -> None:
    pending = start_login("mallory", setup.authority.id, keys.generate_private_key(), T0)
    assert "unknown principal 'mallory'" in refuse(setup, pending.request)


def test_login_for_another_authority_is_refused(setup: Setup) -> None:
    pending = start_login("alice", "auth-0000", setup.private_key("alice"), T0)
    assert "addressed to authority 'auth-0000'" in refuse(setup, pending.request)


def test_disabled_principal_cannot_log_in(setup: Setup) -> None:
    setup.authority.registry.set_enabled("alice", False)
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0)
    assert "'alice' is disabled" in refuse(setup, pending.request)


def test_stale_timestamp_is_refused(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0 - 121)
    assert "121 s behind" in refuse(setup, pending.request)


def test_future_timestamp_beyond_skew_is_refused(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0 + 300)
    assert "300 s ahead" in refuse(setup, pending.request)


def test_timestamp_within_skew_is_accepted(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0 + 119)
    assert isinstance(setup.authority.handle(ANONYMOUS, pending.request, T0), LoginReply)


def test_skew_window_is_configurable(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, AuthorityConfig(skew_s=10))
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0 - 11)
    assert "allowed 10 s" in refuse(setup, pending.request)


def test_replayed_login_is_refused(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0)
    setup.authority.handle(ANONYMOUS, pending.request, T0)
    assert "replays a nonce" in refuse(setup, pending.request, T0 + 5)


def test_tampered_login_is_refused(setup: Setup) -> None:
    pending = start_login("alice", setup.authority.id, setup.private_key("alice"), T0)
    forged = dataclasses.replace(pending.request, timestamp=T0 + 1)
    assert "signature does not match" in refuse(setup, forged)


def test_expired_tgt_is_refused_at_the_handshake(setup: Setup) -> None:
    reply, session_key = login(setup, "alice", T0)
    public = keys.public_key_from_hex(setup.authority.keys.info.public_key_hex)
    client_auth = AuthorityClientAuth(public, tgt=reply.tgt, session_key=session_key)
    with pytest.raises(AuthenticationError, match="expired 1 s ago"):
        handshake(client_auth, AuthorityServerAuth(setup.authority), T0 + 3601)


def test_tgt_of_a_principal_disabled_later_stops_working(setup: Setup) -> None:
    reply, session_key = login(setup, "alice", T0)
    setup.authority.registry.set_enabled("alice", False)
    public = keys.public_key_from_hex(setup.authority.keys.info.public_key_hex)
    client_auth = AuthorityClientAuth(public, tgt=reply.tgt, session_key=session_key)
    with pytest.raises(AuthenticationError, match="disabled"):
        handshake(client_auth, AuthorityServerAuth(setup.authority), T0 + 1)


def test_stolen_tgt_without_its_session_key_fails_the_handshake(setup: Setup) -> None:
    reply, _ = login(setup, "alice", T0)
    public = keys.public_key_from_hex(setup.authority.keys.info.public_key_hex)
    thief = AuthorityClientAuth(public, tgt=reply.tgt, session_key=bytes(32))
    with pytest.raises(AuthenticationError, match="could not prove the shared secret"):
        handshake(thief, AuthorityServerAuth(setup.authority), T0 + 1)


def test_client_refuses_an_authority_with_another_key(setup: Setup, tmp_path: Path) -> None:
    impostor = make_setup(tmp_path / "other")
    public = keys.public_key_from_hex(setup.authority.keys.info.public_key_hex)
    with pytest.raises(AuthenticationError, match="pinned authority key"):
        handshake(AuthorityClientAuth(public), AuthorityServerAuth(impostor.authority), T0)


def test_anonymous_peer_cannot_ask_for_tickets(setup: Setup) -> None:
    assert "log in first" in refuse(setup, TicketRequest("drone-1"))
