"""Ticket formats: sealing, opening, and the versioned keys they are sealed under.

A ticket is opaque to its holder. On the wire it is the canonical CBOR array

    ["keyval-ticket-1", service, key_version, nonce, ciphertext]

where ciphertext = ChaCha20-Poly1305(key(service, key_version), nonce, contents, aad=header)
and header = canonical CBOR ["keyval-ticket-1", service, key_version]. So the service name and
key version are readable (a service can say "this ticket is for someone else" or "this key
version is retired") but not changeable, and the contents (client, role, permissions, session
key, times) are secret and tamper-evident.

Keys: the authority keeps one 32-byte master secret. The key for (service, version) is
HKDF-SHA256(master, info = label || service || version). HKDF is one-way, so a service that
holds its own keys learns nothing about other services' keys or the master. The key version is
the rotation period number, `floor(now / rotation_s)`; a version stays usable until every
ticket sealed under it has expired (see `key_retires_at`). TGTs are tickets for the service
named `AUTHORITY_SERVICE`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wire import codec
from wire.errors import DecodeError, LocalProtocolError

TICKET_MAGIC = "keyval-ticket-1"
AUTHORITY_SERVICE = "auth"  # the ticket target name of the authority itself (TGTs)
MASTER_KEY_BYTES = 32
TICKET_KEY_BYTES = 32  # ChaCha20-Poly1305 key
SESSION_KEY_BYTES = 32
NONCE_BYTES = 12  # ChaCha20-Poly1305 nonce; random per ticket (2^-32 collision odds at 2^32)
# Contents hold at most 64 prefixes of 256 characters (auth.principals); 32 KiB leaves room
# while keeping what a peer can make us decrypt in a handshake small.
MAX_TICKET_BYTES = 32 * 1024
_KEY_LABEL = b"keyval ticket key v1\x00"


class TicketError(Exception):
    """A ticket cannot be used. The message says why in words a person can act on."""


@dataclasses.dataclass(frozen=True, slots=True)
class TicketHeader:
    service: str
    key_version: int


@dataclasses.dataclass(frozen=True, slots=True)
class TicketContents:
    client: str
    role: str
    permissions: tuple[str, ...]
    session_key: bytes
    issued_at: float
    expires_at: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "role": self.role,
            "permissions": list(self.permissions),
            "session_key": self.session_key,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_wire(cls, data: Any) -> TicketContents:
        if type(data) is not dict:
            raise TicketError("ticket contents are damaged (not a map)")
        try:
            contents = cls(
                client=_typed(data["client"], str),
                role=_typed(data["role"], str),
                permissions=tuple(_typed(p, str) for p in _typed(data["permissions"], list)),
                session_key=_typed(data["session_key"], bytes),
                issued_at=float(_typed(data["issued_at"], float)),
                expires_at=float(_typed(data["expires_at"], float)),
            )
        except (KeyError, TypeError) as error:
            raise TicketError(f"ticket contents are damaged: {error}") from None
        if len(contents.session_key) != SESSION_KEY_BYTES:
            raise TicketError("ticket contents are damaged (session key length)")
        return contents


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def new_master_key() -> bytes:
    return os.urandom(MASTER_KEY_BYTES)


def new_session_key() -> bytes:
    return os.urandom(SESSION_KEY_BYTES)


def derive_ticket_key(master: bytes, service: str, version: int) -> bytes:
    if len(master) != MASTER_KEY_BYTES:
        raise LocalProtocolError(f"the ticket master key is {MASTER_KEY_BYTES} bytes")
    if version < 0:
        raise LocalProtocolError("key versions are not negative")
    info = _KEY_LABEL + service.encode("utf-8") + b"\x00" + version.to_bytes(8, "big")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=TICKET_KEY_BYTES, salt=None, info=info)
    return hkdf.derive(master)


def key_version_at(now: float, rotation_s: float) -> int:
    """The key version tickets issued at `now` are sealed under."""
    return max(0, math.floor(now / rotation_s))


def key_retires_at(version: int, rotation_s: float, lifetime_s: float) -> float:
    """When the last ticket sealed under `version` has expired and the key can be dropped."""
    return (version + 1) * rotation_s + lifetime_s


def live_key_versions(now: float, rotation_s: float, lifetime_s: float) -> list[int]:
    """Versions a service must hold at `now`: every unretired one, and the next one, so a
    service that refreshed just before a rotation boundary already has the key used after it."""
    current = key_version_at(now, rotation_s)
    oldest = current
    while oldest > 0 and key_retires_at(oldest - 1, rotation_s, lifetime_s) > now:
        oldest -= 1
    return list(range(oldest, current + 2))


def _header_bytes(header: TicketHeader) -> bytes:
    return codec.encode_canonical([TICKET_MAGIC, header.service, header.key_version])


def seal_ticket(key: bytes, header: TicketHeader, contents: TicketContents) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    plaintext = codec.encode_canonical(contents.to_wire())
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, _header_bytes(header))
    ticket = codec.encode_canonical(
        [TICKET_MAGIC, header.service, header.key_version, nonce, ciphertext]
    )
    if len(ticket) > MAX_TICKET_BYTES:
        raise LocalProtocolError(f"ticket would be {len(ticket)} bytes (max {MAX_TICKET_BYTES})")
    return ticket


def _parse(ticket: Any) -> tuple[TicketHeader, bytes, bytes]:
    if type(ticket) is not bytes:
        raise TicketError("no ticket presented (expected bytes); log in and ask for a ticket")
    if len(ticket) > MAX_TICKET_BYTES:
        raise TicketError(f"ticket is {len(ticket)} bytes, over the {MAX_TICKET_BYTES} limit")
    try:
        envelope = codec.decode(ticket, max_depth=2)
    except DecodeError as error:
        raise TicketError(f"ticket is not well-formed: {error.message}") from None
    if type(envelope) is not list or len(envelope) != 5 or envelope[0] != TICKET_MAGIC:
        raise TicketError("ticket is not a keyval ticket (wrong format or version)")
    _, service, version, nonce, ciphertext = envelope
    if type(service) is not str or type(version) is not int or version < 0:
        raise TicketError("ticket header is damaged")
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES or type(ciphertext) is not bytes:
        raise TicketError("ticket body is damaged")
    return TicketHeader(service, version), nonce, ciphertext


def read_header(ticket: Any) -> TicketHeader:
    """The readable part of a ticket. Not authenticated until `open_ticket` succeeds."""
    return _parse(ticket)[0]


def open_ticket(key: bytes, ticket: Any) -> TicketContents:
    """Decrypt and authenticate a ticket. Does not check times: the caller passes `now`."""
    header, nonce, ciphertext = _parse(ticket)
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, _header_bytes(header))
    except InvalidTag:
        raise TicketError(
            f"ticket for {header.service!r} (key version {header.key_version}) fails its "
            "integrity check: it was altered or not issued by this authority"
        ) from None
    try:
        return TicketContents.from_wire(codec.decode(plaintext))
    except DecodeError as error:
        raise TicketError(f"ticket contents are damaged: {error.message}") from None


def check_times(contents: TicketContents, now: float, *, skew_s: float) -> None:
    """Refuse a ticket that has expired, or is dated in the future beyond the clock skew."""
    if now >= contents.expires_at:
        raise TicketError(
            f"ticket of {contents.client!r} expired {now - contents.expires_at:.0f} s ago; "
            "the client must get a new one (log in again if its TGT expired too)"
        )
    if contents.issued_at > now + skew_s:
        raise TicketError(
            f"ticket of {contents.client!r} is issued {contents.issued_at - now:.0f} s in the "
            f"future (allowed skew {skew_s:.0f} s); check the clocks (NTP) of this host and "
            "the authority"
        )
