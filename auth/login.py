"""The cryptography of the login (AS) exchange, both sides, without I/O.

Client: picks a nonce and an ephemeral X25519 key, signs
    canonical CBOR ["keyval-login-1", name, authority_id, timestamp, nonce, ephemeral_public]
with its Ed25519 key. Authority: after its checks, answers with a TGT and the TGT's session
key sealed (ChaCha20-Poly1305) under HKDF(X25519(authority ephemeral, client ephemeral)).
Only the holder of the client's ephemeral private key can read the session key, so a captured
or replayed login request is useless to anyone else, even though the channel also encrypts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from auth.messages import LoginReply, LoginRequest
from auth.tickets import SESSION_KEY_BYTES
from wire import codec
from wire.errors import AuthenticationError

LOGIN_LABEL = "keyval-login-1"
NONCE_BYTES = 16  # 128 random bits: collisions within a skew window are not a concern
X25519_PUBLIC_BYTES = 32
_REPLY_KEY_LABEL = b"keyval login reply v1\x00"
# The reply key is fresh for every login (both X25519 halves are ephemeral), so a fixed nonce
# is safe: each key encrypts exactly one message.
_REPLY_NONCE = bytes(12)


def login_payload(request: LoginRequest) -> bytes:
    """The exact bytes the principal signs."""
    return codec.encode_canonical(
        [
            LOGIN_LABEL,
            request.name,
            request.authority_id,
            request.timestamp,
            request.nonce,
            request.ephemeral_public,
        ]
    )


@dataclasses.dataclass(frozen=True, slots=True)
class PendingLogin:
    """A login request sent, waiting for its reply (client side)."""

    request: LoginRequest
    ephemeral_private: X25519PrivateKey


def start_login(
    name: str, authority_id: str, private_key: Ed25519PrivateKey, now: float
) -> PendingLogin:
    ephemeral = X25519PrivateKey.generate()
    unsigned = LoginRequest(
        name=name,
        authority_id=authority_id,
        timestamp=float(now),
        nonce=os.urandom(NONCE_BYTES),
        ephemeral_public=ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        signature=b"",
    )
    signed = dataclasses.replace(unsigned, signature=private_key.sign(login_payload(unsigned)))
    return PendingLogin(request=signed, ephemeral_private=ephemeral)


def verify_login_signature(request: LoginRequest, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(request.signature, login_payload(request))
    except InvalidSignature:
        return False
    return True


def _reply_cipher(shared: bytes, request: LoginRequest) -> ChaCha20Poly1305:
    transcript = hashlib.sha256(login_payload(request)).digest()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_REPLY_KEY_LABEL + transcript)
    return ChaCha20Poly1305(hkdf.derive(shared))


def _reply_aad(tgt: bytes, expires_at: float, role: str) -> bytes:
    return codec.encode_canonical([tgt, expires_at, role])


def seal_login_reply(
    request: LoginRequest, tgt: bytes, expires_at: float, role: str, session_key: bytes
) -> LoginReply:
    """Authority side: the reply carrying `session_key` readable only by the requester."""
    if len(request.ephemeral_public) != X25519_PUBLIC_BYTES:
        raise AuthenticationError(f"login ephemeral key must be {X25519_PUBLIC_BYTES} bytes")
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(request.ephemeral_public))
    sealed = _reply_cipher(shared, request).encrypt(
        _REPLY_NONCE, session_key, _reply_aad(tgt, expires_at, role)
    )
    return LoginReply(
        tgt=tgt,
        expires_at=expires_at,
        role=role,
        ephemeral_public=ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        sealed_session_key=sealed,
    )


def finish_login(pending: PendingLogin, reply: LoginReply) -> bytes:
    """Client side: the TGT's session key, or AuthenticationError if the reply is not genuine."""
    if len(reply.ephemeral_public) != X25519_PUBLIC_BYTES:
        raise AuthenticationError("login reply is damaged (ephemeral key length)")
    shared = pending.ephemeral_private.exchange(
        X25519PublicKey.from_public_bytes(reply.ephemeral_public)
    )
    try:
        session_key = _reply_cipher(shared, pending.request).decrypt(
            _REPLY_NONCE,
            reply.sealed_session_key,
            _reply_aad(reply.tgt, reply.expires_at, reply.role),
        )
    except InvalidTag:
        raise AuthenticationError(
            "login reply fails its integrity check; not from the authority"
        ) from None
    if len(session_key) != SESSION_KEY_BYTES:
        raise AuthenticationError("login reply is damaged (session key length)")
    return session_key
