"""The ticket authority as a state machine: handshakes and requests in, replies out.

No sockets, no clock: every call takes `now` (seconds since the epoch). The trio daemon
(auth.daemon) feeds it. The registry it is given persists itself on every change.

Connections to the authority come in two kinds:
- anonymous (ClientHello auth `{}`): may only send `auth.login`;
- with a TGT (`{"ticket": tgt}`): the channel is keyed with the TGT's session key and the
  peer is the principal named in it.
Either way the authority signs the handshake hash with its Ed25519 key (`server_info`), and
clients pin that public key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from auth import principals as principals_module
from auth.datadir import AuthorityKeys
from auth.keys import public_key_from_bytes
from auth.login import NONCE_BYTES, X25519_PUBLIC_BYTES, seal_login_reply, verify_login_signature
from auth.messages import (
    ElectorateReply,
    ElectorateRequest,
    LoginRequest,
    PrincipalAdd,
    PrincipalEntry,
    PrincipalList,
    PrincipalListReply,
    PrincipalRotate,
    PrincipalSetEnabled,
    ServiceState,
    ServiceStateRequest,
    TicketReply,
    TicketRequest,
)
from auth.principals import SERVICE_ROLES, Principal, PrincipalError, Registry, Role
from auth.replay import ReplayCache, ReplayCacheFull
from auth.tickets import (
    AUTHORITY_SERVICE,
    TicketContents,
    TicketError,
    TicketHeader,
    check_times,
    derive_ticket_key,
    key_version_at,
    live_key_versions,
    new_session_key,
    open_ticket,
    read_header,
    seal_ticket,
)
from wire.channel import PeerInfo
from wire.errors import AuthenticationError, BadRequest, NotFound, Unauthorized, Unavailable
from wire.messages import Message, Ok

ANONYMOUS_ROLE = "anonymous"  # a connection that has not logged in: may only log in
AUTHORITY_ROLE = "auth"
TRANSCRIPT_SIGNATURE_LABEL = b"keyval authority transcript v1\x00"

# Kerberos allows 5 minutes of clock skew; we default to 2 (the issue's ±120 s).
DEFAULT_SKEW_S = 120.0
# A TGT is renewed by logging in again, which the client can always do (it holds its key), so
# a short life bounds what a stolen TGT is worth. Service tickets: the example, 1 h.
DEFAULT_TGT_LIFETIME_S = 3600.0
DEFAULT_TICKET_LIFETIME_S = 3600.0
# Ticket keys rotate hourly; a key is kept until the last ticket under it has expired.
DEFAULT_KEY_ROTATION_S = 3600.0
# Live login nonces: one per login within a 2 x skew window. 100k logins in 4 minutes is far
# beyond any cluster's need and bounds the cache at ~20 MB.
DEFAULT_REPLAY_CACHE_ENTRIES = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorityConfig:
    skew_s: float = DEFAULT_SKEW_S
    tgt_lifetime_s: float = DEFAULT_TGT_LIFETIME_S
    ticket_lifetime_s: float = DEFAULT_TICKET_LIFETIME_S
    key_rotation_s: float = DEFAULT_KEY_ROTATION_S
    replay_cache_entries: int = DEFAULT_REPLAY_CACHE_ENTRIES

    def __post_init__(self) -> None:
        for name in ("skew_s", "tgt_lifetime_s", "ticket_lifetime_s", "key_rotation_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


_Handler = Callable[["Authority", PeerInfo, Any, float], Message]


class Authority:
    def __init__(
        self, keys: AuthorityKeys, registry: Registry, config: AuthorityConfig | None = None
    ) -> None:
        self.keys = keys
        self.registry = registry
        self.config = config or AuthorityConfig()
        self._replay = ReplayCache(self.config.replay_cache_entries)

    @property
    def id(self) -> str:
        return self.keys.info.id

    # --- the handshake (ServerAuth) ---

    def accept(self, hello: Mapping[str, Any], now: float) -> tuple[PeerInfo, bytes]:
        """Who a connecting peer is: anonymous, or the principal its TGT names."""
        if "ticket" not in hello:
            return PeerInfo(name="", role=ANONYMOUS_ROLE), b""
        try:
            contents = self._open_tgt(hello["ticket"], now)
        except TicketError as error:
            raise AuthenticationError(str(error)) from None
        self._require_enabled(contents.client, AuthenticationError)
        peer = PeerInfo(
            name=contents.client,
            role=contents.role,
            permissions=contents.permissions,
            expires_at=contents.expires_at,
        )
        return peer, contents.session_key

    def server_info(self, transcript_hash: bytes) -> dict[str, Any]:
        signature = self.keys.signing_key.sign(TRANSCRIPT_SIGNATURE_LABEL + transcript_hash)
        return {"authority_id": self.id, "signature": signature}

    def _open_tgt(self, ticket: Any, now: float) -> TicketContents:
        header = read_header(ticket)
        if header.service != AUTHORITY_SERVICE:
            raise TicketError(
                f"this is a ticket for {header.service!r}, not a TGT; present the TGT "
                "from login to the authority"
            )
        if header.key_version not in live_key_versions(
            now, self.config.key_rotation_s, self.config.tgt_lifetime_s
        ):
            raise TicketError(
                f"TGT is sealed under retired key version {header.key_version}; log in again"
            )
        key = derive_ticket_key(self.keys.master_key, AUTHORITY_SERVICE, header.key_version)
        contents = open_ticket(key, ticket)
        check_times(contents, now, skew_s=self.config.skew_s)
        return contents

    def _require_enabled(self, name: str, error: type[Exception] = Unauthorized) -> Principal:
        principal = self.registry.get(name)
        if principal is None:
            raise error(f"principal {name!r} no longer exists; ask an admin to add it")
        if not principal.enabled:
            raise error(
                f"principal {name!r} is disabled; an admin can re-enable it with "
                f"`keyval principal enable {name}`"
            )
        return principal

    # --- requests ---

    def handle(self, peer: PeerInfo, request: Message, now: float) -> Message:
        """The reply to one request, or a ServiceError (Unauthorized, BadRequest, ...)."""
        entry = _DISPATCH.get(type(request))
        if entry is None:
            raise BadRequest(f"the authority does not answer {request.TYPE}")
        roles, handler = entry
        if peer.role not in roles:
            needed = " or ".join(sorted(roles))
            hint = " (log in first)" if peer.role == ANONYMOUS_ROLE else ""
            raise Unauthorized(
                f"{request.TYPE} needs role {needed}; peer {peer.name or '(anonymous)'!r} "
                f"has role {peer.role}{hint}"
            )
        if peer.role != ANONYMOUS_ROLE:
            self._require_enabled(peer.name)
        return handler(self, peer, request, now)

    def _login(self, peer: PeerInfo, request: LoginRequest, now: float) -> Message:
        principal = self.registry.get(request.name)
        if principal is None:
            raise Unauthorized(
                f"unknown principal {request.name!r}; an admin adds it with "
                f"`keyval principal add {request.name} --role ROLE`"
            )
        if request.authority_id != self.id:
            raise Unauthorized(
                f"login is addressed to authority {request.authority_id!r} but this is "
                f"{self.id!r}; check the authority address and key in your config"
            )
        if (
            len(request.nonce) != NONCE_BYTES
            or len(request.ephemeral_public) != X25519_PUBLIC_BYTES
        ):
            raise BadRequest(
                f"login nonce must be {NONCE_BYTES} bytes and ephemeral key "
                f"{X25519_PUBLIC_BYTES} bytes"
            )
        if not verify_login_signature(request, public_key_from_bytes(principal.public_key)):
            raise Unauthorized(
                f"login signature does not match the registered key of {request.name!r}; "
                "check the key file (was the principal's key rotated?)"
            )
        if not principal.enabled:
            raise Unauthorized(
                f"principal {request.name!r} is disabled; an admin can re-enable it with "
                f"`keyval principal enable {request.name}`"
            )
        self._check_login_time(request.timestamp, now)
        try:
            replayed = self._replay.seen_before(
                (request.name, request.nonce), request.timestamp + self.config.skew_s, now
            )
        except ReplayCacheFull:
            raise Unavailable("the authority is handling too many logins; retry shortly") from None
        if replayed:
            raise Unauthorized(
                f"login of {request.name!r} replays a nonce already used; a client sends each "
                "login once (is someone replaying captured traffic?)"
            )
        session_key = new_session_key()
        expires_at = now + self.config.tgt_lifetime_s
        contents = TicketContents(
            client=principal.name,
            role=principal.role.value,
            permissions=principal.prefixes,
            session_key=session_key,
            issued_at=now,
            expires_at=expires_at,
        )
        tgt = self._seal(AUTHORITY_SERVICE, contents, now)
        return seal_login_reply(request, tgt, expires_at, principal.role.value, session_key)

    def _check_login_time(self, timestamp: float, now: float) -> None:
        skew_s = self.config.skew_s
        if timestamp < now - skew_s:
            raise Unauthorized(
                f"login timestamp is {now - timestamp:.0f} s behind the authority's clock "
                f"(allowed {skew_s:.0f} s): a stale or replayed login, or a slow clock; "
                "sync the client's clock (NTP)"
            )
        if timestamp > now + skew_s:
            raise Unauthorized(
                f"login timestamp is {timestamp - now:.0f} s ahead of the authority's clock "
                f"(allowed {skew_s:.0f} s); sync the client's clock (NTP)"
            )

    def _seal(self, service: str, contents: TicketContents, now: float) -> bytes:
        version = key_version_at(now, self.config.key_rotation_s)
        key = derive_ticket_key(self.keys.master_key, service, version)
        return seal_ticket(key, TicketHeader(service, version), contents)

    def _ticket(self, peer: PeerInfo, request: TicketRequest, now: float) -> Message:
        client = self._require_enabled(peer.name)
        service = self.registry.get(request.service)
        if service is None or service.role not in SERVICE_ROLES:
            raise NotFound(
                f"no service principal named {request.service!r} (services are principals "
                "with role drone, commander or db)"
            )
        if not service.enabled:
            raise Unavailable(f"service {request.service!r} is disabled")
        session_key = new_session_key()
        expires_at = now + self.config.ticket_lifetime_s
        if peer.expires_at is not None:
            expires_at = min(expires_at, peer.expires_at)  # no ticket outlives its TGT
        contents = TicketContents(
            client=client.name,
            role=client.role.value,
            permissions=client.prefixes,
            session_key=session_key,
            issued_at=now,
            expires_at=expires_at,
        )
        return TicketReply(
            service=service.name,
            service_role=service.role.value,
            ticket=self._seal(service.name, contents, now),
            session_key=session_key,
            expires_at=expires_at,
        )

    def service_keys(self, service: str, now: float) -> list[tuple[int, bytes]]:
        versions = live_key_versions(now, self.config.key_rotation_s, self.config.ticket_lifetime_s)
        return [(v, derive_ticket_key(self.keys.master_key, service, v)) for v in versions]

    def _service_state(self, peer: PeerInfo, request: ServiceStateRequest, now: float) -> Message:
        return ServiceState(
            service=peer.name,
            keys=self.service_keys(peer.name, now),
            revoked=self.registry.disabled_names(),
            skew_s=self.config.skew_s,
        )

    # --- administration (role admin) ---

    def _principal_add(self, peer: PeerInfo, request: PrincipalAdd, now: float) -> Message:
        try:
            principal = Principal(
                name=request.name,
                role=principals_module.check_role(request.role),
                public_key=request.public_key,
                prefixes=tuple(request.prefixes),
            )
            self.registry.add(principal)
        except PrincipalError as error:
            raise BadRequest(str(error)) from None
        return Ok()

    def _principal_list(self, peer: PeerInfo, request: PrincipalList, now: float) -> Message:
        return PrincipalListReply(principals=[_entry(p) for p in self.registry.all()])

    def _electorate(self, peer: PeerInfo, request: ElectorateRequest, now: float) -> Message:
        drones = [p.name for p in self.registry.all() if p.enabled and p.role is Role.DRONE]
        return ElectorateReply(drones=drones)

    def _principal_set_enabled(
        self, peer: PeerInfo, request: PrincipalSetEnabled, now: float
    ) -> Message:
        if request.name == peer.name and not request.enabled:
            raise BadRequest("an admin cannot disable itself (it would lock itself out)")
        try:
            self.registry.set_enabled(request.name, request.enabled)
        except principals_module.UnknownPrincipal as error:
            raise NotFound(str(error)) from None
        return Ok()

    def _principal_rotate(self, peer: PeerInfo, request: PrincipalRotate, now: float) -> Message:
        try:
            self.registry.set_public_key(request.name, request.public_key)
        except principals_module.UnknownPrincipal as error:
            raise NotFound(str(error)) from None
        except PrincipalError as error:
            raise BadRequest(str(error)) from None
        return Ok()


def _entry(principal: Principal) -> PrincipalEntry:
    return PrincipalEntry(
        name=principal.name,
        role=principal.role.value,
        public_key=principal.public_key,
        enabled=principal.enabled,
        prefixes=list(principal.prefixes),
    )


_ANYONE = frozenset({ANONYMOUS_ROLE, *(r.value for r in Role)})
_PRINCIPALS = frozenset(r.value for r in Role)
_SERVICES = frozenset(r.value for r in SERVICE_ROLES)
_ADMINS = frozenset({Role.ADMIN.value})
_COMMANDERS = frozenset({Role.COMMANDER.value})

# request type -> (roles allowed to send it, handler). Anything not named is refused.
_DISPATCH: dict[type[Message], tuple[frozenset[str], _Handler]] = {
    LoginRequest: (_ANYONE, Authority._login),
    TicketRequest: (_PRINCIPALS, Authority._ticket),
    ServiceStateRequest: (_SERVICES, Authority._service_state),
    PrincipalAdd: (_ADMINS, Authority._principal_add),
    PrincipalList: (_ADMINS, Authority._principal_list),
    ElectorateRequest: (_COMMANDERS, Authority._electorate),
    PrincipalSetEnabled: (_ADMINS, Authority._principal_set_enabled),
    PrincipalRotate: (_ADMINS, Authority._principal_rotate),
}
