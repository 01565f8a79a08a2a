"""Messages spoken with the ticket authority (all named "auth.*")."""

from __future__ import annotations

import dataclasses

from wire.messages import Message, message


@message("auth.login")
class LoginRequest(Message):
    """AS exchange. `signature` is Ed25519 over auth.login.login_payload(...) of the rest."""

    name: str
    authority_id: str
    timestamp: float  # the client's wall clock, seconds since the epoch
    nonce: bytes
    ephemeral_public: bytes  # X25519: the session key comes back sealed to it
    signature: bytes


@message("auth.login_reply")
class LoginReply(Message):
    """A ticket-granting ticket and its session key, sealed to the login's one-time X25519 key."""

    tgt: bytes  # opaque to the client
    expires_at: float
    role: str
    ephemeral_public: bytes  # the authority's X25519 half
    sealed_session_key: bytes  # ChaCha20-Poly1305 under the X25519 shared secret


@message("auth.ticket")
class TicketRequest(Message):
    """TGS exchange, sent over a channel authenticated with the TGT."""

    service: str


@message("auth.ticket_reply")
class TicketReply(Message):
    """A service ticket (opaque to the client) and its session key, sealed under the TGT session."""

    service: str
    service_role: str
    ticket: bytes
    session_key: bytes  # confidential: the channel is keyed with the TGT's session key
    expires_at: float


@message("auth.service_state")
class ServiceStateRequest(Message):
    """A service asks for its ticket-opening keys and the revocation list."""


@message("auth.service_state_reply")
class ServiceState(Message):
    """A service's ticket-opening keys by version, the revoked principals, the skew window."""

    service: str
    keys: list[tuple[int, bytes]]  # (key version, key), oldest first
    revoked: list[str]  # names of disabled principals
    skew_s: float


@message("auth.principal")
class PrincipalEntry(Message):
    """One principal as the registry holds it: name, role, Ed25519 public key, enabled, key
    prefixes.
    """

    name: str
    role: str
    public_key: bytes
    enabled: bool
    prefixes: list[str] = dataclasses.field(default_factory=list)


@message("auth.principal_add")
class PrincipalAdd(Message):
    """Admin: register a principal. Only the public key travels; the private key stays home."""

    name: str
    role: str
    public_key: bytes
    prefixes: list[str] = dataclasses.field(default_factory=list)


@message("auth.principal_list")
class PrincipalList(Message):
    """Admin: list every principal."""

    pass


@message("auth.principal_list_reply")
class PrincipalListReply(Message):
    """Every principal the authority knows."""

    principals: list[PrincipalEntry]


@message("auth.electorate")
class ElectorateRequest(Message):
    """Commander: the enabled drone principals, the electorate of commander elections."""


@message("auth.electorate_reply")
class ElectorateReply(Message):
    """The enabled drone principals: the electorate of commander elections."""

    drones: list[str]


@message("auth.principal_enable")
class PrincipalSetEnabled(Message):
    """Admin: disable (revoke) or re-enable a principal."""

    name: str
    enabled: bool


@message("auth.principal_rotate")
class PrincipalRotate(Message):
    """Admin: replace a principal's public key (its new private key stays with the caller)."""

    name: str
    public_key: bytes
