"""The ClientAuth / ServerAuth plug-ins of wire.channel, and a service's keyring. No I/O.

To a service (drone, db, commander): the client sends its service ticket in ClientHello; the
service opens it with its ticket key and both ends key the channel with the ticket's session
key (mixed with the X25519 secret by the channel). Each side's Finished proves it holds that
key, so the client also learns it reached the real service: only the authority and that
service can open the ticket.

To the authority: the authority signs the handshake hash with its Ed25519 key and the client
checks it against the pinned public key; with a TGT the channel is also keyed with the TGT's
session key, which authenticates the client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from auth.authority import AUTHORITY_ROLE, TRANSCRIPT_SIGNATURE_LABEL, Authority
from auth.tickets import TicketContents, TicketError, check_times, open_ticket, read_header
from wire.channel import PeerInfo
from wire.errors import AuthenticationError

# --- to the authority ----------------------------------------------------------------------


class AuthorityClientAuth:
    """Connect to the authority: anonymously (to log in) or with a TGT and its session key."""

    def __init__(
        self,
        authority_public_key: Ed25519PublicKey,
        *,
        tgt: bytes | None = None,
        session_key: bytes = b"",
    ) -> None:
        self._public_key = authority_public_key
        self._tgt = tgt
        self._session_key = session_key

    def hello(self) -> dict[str, Any]:
        return {} if self._tgt is None else {"ticket": self._tgt}

    def secret(self) -> bytes:
        return self._session_key

    def check_server(self, info: dict[str, Any], transcript_hash: bytes) -> PeerInfo:
        signature, authority_id = info.get("signature"), info.get("authority_id")
        if type(signature) is not bytes or type(authority_id) is not str:
            raise AuthenticationError("the server did not sign the handshake; not an authority")
        try:
            self._public_key.verify(signature, TRANSCRIPT_SIGNATURE_LABEL + transcript_hash)
        except InvalidSignature:
            raise AuthenticationError(
                "the server's handshake signature does not match the pinned authority key; "
                "wrong address, a stale authority_key in the config, or an impostor"
            ) from None
        return PeerInfo(name=authority_id, role=AUTHORITY_ROLE)


class AuthorityServerAuth:
    """The authority's side of one connection."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    def accept(self, hello: dict[str, Any], now: float) -> tuple[PeerInfo, bytes]:
        return self._authority.accept(hello, now)

    def server_info(self, transcript_hash: bytes) -> dict[str, Any]:
        return self._authority.server_info(transcript_hash)


# --- to a service --------------------------------------------------------------------------


class TicketClientAuth:
    """Connect to `service` with a service ticket from the authority."""

    def __init__(self, service: str, service_role: str, ticket: bytes, session_key: bytes) -> None:
        self.service = service
        self.service_role = service_role
        self._ticket = ticket
        self._session_key = session_key

    def hello(self) -> dict[str, Any]:
        return {"ticket": self._ticket}

    def secret(self) -> bytes:
        return self._session_key

    def check_server(self, info: dict[str, Any], transcript_hash: bytes) -> PeerInfo:
        # The server proves it opened the ticket with its Finished (the channel checks that);
        # here we only make sure it claims to be the service we asked a ticket for.
        name = info.get("name")
        if name != self.service:
            raise AuthenticationError(
                f"connected to {name!r} but the ticket is for {self.service!r}; "
                "check the address you connected to"
            )
        return PeerInfo(name=self.service, role=self.service_role)


class ServiceKeyring:
    """A service's ticket-opening keys (by version) and the revocation list."""

    def __init__(self, service: str, role: str, *, skew_s: float) -> None:
        self.service = service
        self.role = role
        self.skew_s = skew_s
        self._keys: dict[int, bytes] = {}
        self._revoked: frozenset[str] = frozenset()

    def update(self, keys: Iterable[tuple[int, bytes]], revoked: Iterable[str]) -> None:
        self._keys = dict(keys)
        self._revoked = frozenset(revoked)

    @property
    def key_versions(self) -> list[int]:
        return sorted(self._keys)

    def is_revoked(self, name: str) -> bool:
        return name in self._revoked

    def open(self, ticket: Any, now: float) -> TicketContents:
        """Open and check a ticket presented to this service. Raises TicketError."""
        header = read_header(ticket)
        if header.service != self.service:
            raise TicketError(
                f"ticket is for service {header.service!r}, not {self.service!r}; ask the "
                f"authority for a ticket for {self.service!r}"
            )
        key = self._keys.get(header.key_version)
        if key is None:
            raise TicketError(self._missing_key_reason(header.key_version))
        contents = open_ticket(key, ticket)
        check_times(contents, now, skew_s=self.skew_s)
        if contents.client in self._revoked:
            raise TicketError(
                f"principal {contents.client!r} is disabled (revoked); an admin can re-enable "
                "it with `keyval principal enable`"
            )
        return contents

    def _missing_key_reason(self, version: int) -> str:
        if not self._keys:
            return f"service {self.service!r} has no ticket keys yet (still starting); retry"
        if version < min(self._keys):
            return (
                f"ticket is sealed under key version {version}, which {self.service!r} has "
                "retired (every ticket under it has expired); get a new ticket"
            )
        return (
            f"ticket is sealed under key version {version}, newer than {self.service!r} "
            "knows; it refreshes its keys from the authority shortly, retry"
        )


class TicketServerAuth:
    """A service's side of one connection."""

    def __init__(self, keyring: ServiceKeyring) -> None:
        self._keyring = keyring

    def accept(self, hello: dict[str, Any], now: float) -> tuple[PeerInfo, bytes]:
        try:
            contents = self._keyring.open(hello.get("ticket"), now)
        except TicketError as error:
            raise AuthenticationError(str(error)) from None
        peer = PeerInfo(
            name=contents.client,
            role=contents.role,
            permissions=contents.permissions,
            expires_at=contents.expires_at,
        )
        return peer, contents.session_key

    def server_info(self, transcript_hash: bytes) -> dict[str, Any]:
        return {"name": self._keyring.service, "role": self._keyring.role}
