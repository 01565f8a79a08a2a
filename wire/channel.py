"""The secure channel: handshake, then sealed frames. Sans-I/O, like h11.

Feed received bytes to `receive_data` (`b""` is EOF), pull events with `next_event` and send
what `data_to_send` returns. `send(payload)` and `close()` return the bytes to write. After
any error the channel stays broken; the caller should still write `data_to_send()` (it may hold
an Error or close record telling the peer why) and then close the stream. docs/protocol.md
describes the bytes on the wire.

Handshake (C = client, S = server):

    C -> S  plain  channel.client_hello {versions, public_key, auth}
    S -> C  plain  channel.server_hello {version, public_key, server_info}
    C -> S  sealed FINISHED  HMAC(c2s finished key, transcript hash)
    S -> C  sealed FINISHED  HMAC(s2c finished key, transcript hash)   (or plain `error`)

Authentication of both ends is pluggable (`ClientAuth`, `ServerAuth`); its secret is mixed into
the key schedule, so only an end that holds it can produce a valid Finished.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wire import codec
from wire.errors import (
    AuthenticationError,
    DecodeError,
    ErrorCode,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    WireError,
)
from wire.framing import FrameDecoder, frame_header
from wire.limits import MAX_FRAME_BYTES, PROTOCOL_VERSIONS
from wire.messages import Error, Message, decode_message, encode_message, message

# Handshake frames come from peers not yet authenticated; a ticket plus keys fits in a few KiB,
# so this bounds what a stranger can make us buffer (TLS caps a handshake message at 16 MiB,
# which is far more than keyval's hellos ever need).
MAX_HANDSHAKE_FRAME_BYTES = 16 * 1024

# At least 128 bits of pre-shared secret, the strength of the rest of the channel.
MIN_PSK_BYTES = 16

# Nonces are 4 zero bytes and a 64-bit counter; a direction may seal this many frames.
MAX_FRAMES_PER_DIRECTION = 2**64

KEY_BYTES = 32  # ChaCha20-Poly1305 key and HMAC-SHA256 key size
TAG_BYTES = 16  # Poly1305 tag
PUBLIC_KEY_BYTES = 32  # X25519 public key

# First byte of every frame payload: how the rest is to be read.
KIND_PLAIN = 0x01  # a CBOR message in the clear (handshake and handshake errors only)
KIND_SEALED = 0x02  # ChaCha20-Poly1305 ciphertext of a record

# First byte of a sealed record's plaintext.
RECORD_FINISHED = 0x00
RECORD_DATA = 0x01
RECORD_CLOSE = 0x02

# Bytes a sealed frame adds around an application payload: kind, record type, tag.
SEALED_OVERHEAD_BYTES = 1 + 1 + TAG_BYTES

_NONCE = struct.Struct(">4xQ")  # 4 zero bytes, then the 64-bit big-endian frame counter
_SEALED_HEADER = struct.Struct(">IB")  # a sealed frame's length prefix and kind byte
_PLAIN_KIND = bytes([KIND_PLAIN])
_DATA_RECORD = bytes([RECORD_DATA])


@dataclasses.dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who the other end proved to be."""

    name: str
    role: str
    permissions: tuple[str, ...] = ()
    expires_at: float | None = None


class ClientAuth(Protocol):
    def hello(self) -> dict[str, Any]:
        """Opaque map sent in ClientHello (a ticket, a key id)."""
        ...

    def secret(self) -> bytes:
        """Mixed into the key schedule (ticket session key, PSK)."""
        ...

    def check_server(self, info: dict[str, Any], transcript_hash: bytes) -> PeerInfo:
        """Check the server's ServerHello info; raise AuthenticationError to refuse it."""
        ...


class ServerAuth(Protocol):
    def accept(self, hello: dict[str, Any], now: float) -> tuple[PeerInfo, bytes]:
        """The client's identity and the shared secret; raise AuthenticationError to refuse."""
        ...

    def server_info(self, transcript_hash: bytes) -> dict[str, Any]:
        """Map sent in ServerHello (e.g. a signature over `transcript_hash`)."""
        ...


# --- handshake messages --------------------------------------------------------------------


@message("channel.client_hello")
class ClientHello(Message):
    """Handshake, sent in plain with request id 0: protocol versions, ephemeral X25519 key, the
    authentication method's map.
    """

    versions: list[int]
    public_key: bytes
    auth: dict[str, Any]


@message("channel.server_hello")
class ServerHello(Message):
    """Handshake reply, plain: the version chosen, the server's ephemeral X25519 key, the method's
    proof.
    """

    version: int
    public_key: bytes
    server_info: dict[str, Any]


# --- events --------------------------------------------------------------------------------


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeDone:
    peer: PeerInfo
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class Payload:
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed cleanly. `code` is set when it closed because of an error."""

    reason: str
    code: str | None = None


Event = HandshakeDone | Payload | Closed


# --- sealing -------------------------------------------------------------------------------


class DirectionalCipher:
    """One direction's AEAD key and frame counter (the nonce is implicit, never sent)."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes, counter: int = 0) -> None:
        if len(key) != KEY_BYTES:
            raise LocalProtocolError(f"a channel key is {KEY_BYTES} bytes")
        self._aead = ChaCha20Poly1305(key)
        self.counter = counter

    def _next_nonce(self) -> bytes | None:
        if self.counter >= MAX_FRAMES_PER_DIRECTION:
            return None
        nonce = _NONCE.pack(self.counter)
        self.counter += 1
        return nonce

    def seal(self, plaintext: bytes, max_frame_bytes: int) -> bytes:
        """A whole sealed frame (prefix, kind, ciphertext) for `plaintext`."""
        size = 1 + len(plaintext) + TAG_BYTES
        if size > max_frame_bytes:
            raise LocalProtocolError(
                f"sealed frame of {size} bytes is over the {max_frame_bytes}-byte limit",
                detail={"frame_bytes": size, "max_frame_bytes": max_frame_bytes},
            )
        nonce = self._next_nonce()
        if nonce is None:
            raise LocalProtocolError("nonce counter exhausted; open a new connection")
        header = _SEALED_HEADER.pack(size, KIND_SEALED)
        return header + self._aead.encrypt(nonce, plaintext, header)

    def open(self, payload: bytes) -> bytes:
        """The plaintext of a sealed frame payload (kind byte first)."""
        nonce = self._next_nonce()
        if nonce is None:
            raise IntegrityError("peer's nonce counter exhausted")
        header = _SEALED_HEADER.pack(len(payload), payload[0])
        try:
            return self._aead.decrypt(nonce, payload[1:], header)
        except InvalidTag:
            raise IntegrityError(
                "sealed frame failed authentication (tampered, replayed, reordered or wrong key)",
                detail={"frame": self.counter - 1},
            ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class _Keys:
    send: DirectionalCipher
    receive: DirectionalCipher
    send_finished: bytes
    receive_finished: bytes


def _derive(ikm: bytes, salt: bytes, purpose: bytes) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=purpose)
    return kdf.derive(ikm)


def _key_schedule(shared: bytes, secret: bytes, transcript_hash: bytes, is_client: bool) -> _Keys:
    ikm = shared + secret
    c2s = _derive(ikm, transcript_hash, b"keyval/1 c2s key")
    s2c = _derive(ikm, transcript_hash, b"keyval/1 s2c key")
    c2s_finished = _derive(ikm, transcript_hash, b"keyval/1 c2s finished")
    s2c_finished = _derive(ikm, transcript_hash, b"keyval/1 s2c finished")
    if is_client:
        return _Keys(DirectionalCipher(c2s), DirectionalCipher(s2c), c2s_finished, s2c_finished)
    return _Keys(DirectionalCipher(s2c), DirectionalCipher(c2s), s2c_finished, c2s_finished)


def _finished_mac(key: bytes, transcript_hash: bytes) -> bytes:
    return hmac.new(key, transcript_hash, hashlib.sha256).digest()


def _exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise RemoteProtocolError(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point gives an all-zero secret
        raise RemoteProtocolError("peer's X25519 public key is invalid") from None


def hello_hash(client_hello_payload: bytes, server_public_key: bytes) -> bytes:
    """The hash the server's auth signs in ServerHello: ClientHello and the server's key."""
    return hashlib.sha256(client_hello_payload + server_public_key).digest()


# --- the state machine ---------------------------------------------------------------------


class _State(enum.Enum):
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_SERVER_FINISHED = "wait_server_finished"
    WAIT_CLIENT_HELLO = "wait_client_hello"
    WAIT_CLIENT_FINISHED = "wait_client_finished"
    OPEN = "open"
    CLOSED = "closed"  # the peer's close record arrived
    ERROR = "error"


_Handler = Callable[[Any, bytes], Event | None]  # an unbound method of a _Channel subclass


class _Channel:
    """What both ends share: framing, the transition table, sealed records."""

    # (state, frame kind) -> handler. Anything the table does not name is a protocol error.
    _TABLE: ClassVar[Mapping[tuple[_State, int], _Handler]] = {}

    def __init__(self, state: _State, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._state = state
        self._decoder = FrameDecoder(min(max_frame_bytes, MAX_HANDSHAKE_FRAME_BYTES))
        self._outgoing = bytearray()
        self._transcript = bytearray()
        self._keys: _Keys | None = None
        self._closed_event: Closed | None = None
        self._close_sent = False
        self._error: WireError | None = None
        self.peer: PeerInfo | None = None
        self.version: int | None = None

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    @property
    def can_send(self) -> bool:
        """True while `send` accepts payloads: open, and no close record sent."""
        return self._state is _State.OPEN and not self._close_sent

    @property
    def max_payload_bytes(self) -> int:
        """The largest application payload one `send` accepts."""
        return self.max_frame_bytes - SEALED_OVERHEAD_BYTES

    # -- input --

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._error is not None:
            raise self._error
        self._decoder.receive_data(data)

    def next_event(self) -> Event | NeedData:
        if self._error is not None:
            raise self._error
        try:
            while True:
                frame = self._decoder.next_frame()
                if frame is None:
                    return self._on_no_frame()
                event = self._on_frame(frame)
                if event is not None:
                    return event
        except WireError as error:
            self._break(error)
            raise

    def _on_no_frame(self) -> Event | NeedData:
        if not self._decoder.eof:
            return NEED_DATA
        if self._closed_event is not None:
            return self._closed_event
        if self._state is _State.OPEN:
            raise IntegrityError("connection ended without a close record (truncated)")
        raise RemoteProtocolError(f"connection ended during the handshake ({self._state.value})")

    def _on_frame(self, frame: bytes) -> Event | None:
        if not frame:
            raise RemoteProtocolError("empty frame")
        if frame[0] == KIND_SEALED and self._state is _State.OPEN:
            return self._on_record(frame)  # nearly every frame: what _TABLE says, sooner
        handler = self._TABLE.get((self._state, frame[0]))
        if handler is None:
            raise RemoteProtocolError(
                f"unexpected frame of kind {frame[0]} in state {self._state.value}"
            )
        return handler(self, frame)

    def _break(self, error: WireError) -> None:
        """Enter the error state; tell the peer why in a sealed close if we can."""
        if self._error is not None:
            return
        if (
            self._keys is not None
            and not self._close_sent
            and isinstance(error, RemoteProtocolError)
        ):
            self._outgoing += self._seal_close(error.message, error.code)
        self._error = error
        self._state = _State.ERROR

    # -- output --

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def send(self, payload: bytes) -> bytes:
        """The sealed frame carrying `payload`."""
        if self._state is not _State.OPEN or self._close_sent or self._keys is None:
            raise LocalProtocolError(f"cannot send in state {self._state.value}")
        return self._keys.send.seal(_DATA_RECORD + payload, self.max_frame_bytes)

    def close(self, reason: str = "", code: str | None = None) -> bytes:
        """The sealed close record (empty if the channel never opened or already closed)."""
        if self._keys is None or self._close_sent or self._state is _State.ERROR:
            self._close_sent = True
            return b""
        return self._seal_close(reason, code)

    def _seal_close(self, reason: str, code: str | None) -> bytes:
        if self._keys is None:
            raise LocalProtocolError("no keys yet")
        self._close_sent = True
        body = codec.encode([code, reason[:1000]])  # a reason is for humans; keep it short
        return self._keys.send.seal(bytes([RECORD_CLOSE]) + body, self.max_frame_bytes)

    # -- shared handlers --

    def _send_plain(self, msg: Message) -> bytes:
        payload = _PLAIN_KIND + encode_message(0, msg)
        self._outgoing += frame_header(len(payload)) + payload
        return payload

    def _receive_plain(self, frame: bytes) -> Message:
        try:
            _, msg = decode_message(frame[1:])
        except DecodeError as error:
            raise DecodeError(f"bad handshake message: {error.message}") from None
        if isinstance(msg, Error):
            if msg.code == ErrorCode.UNAUTHORIZED:
                raise AuthenticationError(f"peer refused us: {msg.message}", detail=msg.detail)
            raise RemoteProtocolError(
                f"peer refused the handshake ({msg.code}): {msg.message}", detail=msg.detail
            )
        return msg

    def _open_record(self, frame: bytes) -> tuple[int, bytes]:
        if self._keys is None:
            raise LocalProtocolError("no keys yet")
        plaintext = self._keys.receive.open(frame)
        if not plaintext:
            raise RemoteProtocolError("empty sealed record")
        return plaintext[0], plaintext[1:]

    def _check_finished(self, frame: bytes) -> None:
        if self._keys is None:
            raise LocalProtocolError("no keys yet")
        record, body = self._open_record(frame)
        if record != RECORD_FINISHED:
            raise RemoteProtocolError(f"expected a Finished record, got record type {record}")
        expected = _finished_mac(self._keys.receive_finished, self._transcript_hash())
        if not hmac.compare_digest(body, expected):
            raise AuthenticationError("peer's Finished does not match the transcript")

    def _send_finished(self) -> None:
        if self._keys is None:
            raise LocalProtocolError("no keys yet")
        mac = _finished_mac(self._keys.send_finished, self._transcript_hash())
        self._outgoing += self._keys.send.seal(bytes([RECORD_FINISHED]) + mac, MAX_FRAME_BYTES)

    def _transcript_hash(self) -> bytes:
        return hashlib.sha256(self._transcript).digest()

    def _open(self) -> None:
        self._state = _State.OPEN
        self._decoder.max_frame_bytes = self.max_frame_bytes

    def _on_record(self, frame: bytes) -> Event | None:
        record, body = self._open_record(frame)
        if record == RECORD_DATA:
            return Payload(body)
        if record == RECORD_CLOSE:
            self._closed_event = _parse_close(body)
            self._state = _State.CLOSED
            return self._closed_event
        raise RemoteProtocolError(f"unexpected record type {record} on an open channel")


def _parse_close(body: bytes) -> Closed:
    item = codec.decode(body)
    if (
        type(item) is not list
        or len(item) != 2
        or type(item[1]) is not str
        or not (item[0] is None or type(item[0]) is str)
    ):
        raise DecodeError("a close record is [code or null, reason]")
    return Closed(reason=item[1], code=item[0])


def _check_versions(versions: tuple[int, ...]) -> tuple[int, ...]:
    if not versions or not all(type(v) is int and v in PROTOCOL_VERSIONS for v in versions):
        raise LocalProtocolError(f"versions must be a non-empty subset of {PROTOCOL_VERSIONS}")
    return versions


class ClientChannel(_Channel):
    """The connecting end. Its ClientHello is ready in `data_to_send()` from the start."""

    def __init__(
        self,
        auth: ClientAuth,
        *,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        super().__init__(_State.WAIT_SERVER_HELLO, max_frame_bytes)
        self._auth = auth
        self._versions = _check_versions(versions)
        self._private = X25519PrivateKey.generate()
        hello = ClientHello(
            versions=list(self._versions),
            public_key=self._private.public_key().public_bytes_raw(),
            auth=auth.hello(),
        )
        self._client_hello = self._send_plain(hello)
        self._transcript += self._client_hello

    def _on_server_hello(self, frame: bytes) -> Event | None:
        msg = self._receive_plain(frame)
        if not isinstance(msg, ServerHello):
            raise RemoteProtocolError(f"expected channel.server_hello, got {msg.TYPE}")
        if msg.version not in self._versions:
            raise RemoteProtocolError(f"server chose version {msg.version}, not one we offered")
        shared = _exchange(self._private, msg.public_key)
        self.peer = self._auth.check_server(
            msg.server_info, hello_hash(self._client_hello, msg.public_key)
        )
        self.version = msg.version
        self._transcript += frame
        self._keys = _key_schedule(shared, self._auth.secret(), self._transcript_hash(), True)
        self._send_finished()
        self._state = _State.WAIT_SERVER_FINISHED
        return None

    def _on_server_finished(self, frame: bytes) -> Event | None:
        self._check_finished(frame)
        self._open()
        if self.peer is None or self.version is None:
            raise LocalProtocolError("handshake finished without a peer")
        return HandshakeDone(self.peer, self.version)

    def _on_refusal(self, frame: bytes) -> Event | None:
        msg = self._receive_plain(frame)  # raises for an Error, the only thing allowed here
        raise RemoteProtocolError(f"unexpected {msg.TYPE} after the server hello")

    _TABLE = {
        (_State.WAIT_SERVER_HELLO, KIND_PLAIN): _on_server_hello,
        (_State.WAIT_SERVER_FINISHED, KIND_SEALED): _on_server_finished,
        (_State.WAIT_SERVER_FINISHED, KIND_PLAIN): _on_refusal,
        (_State.OPEN, KIND_SEALED): _Channel._on_record,
    }


class ServerChannel(_Channel):
    """The accepting end. `now` (seconds since the epoch) is what tickets are checked against."""

    def __init__(
        self,
        auth: ServerAuth,
        *,
        now: float,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        super().__init__(_State.WAIT_CLIENT_HELLO, max_frame_bytes)
        self._auth = auth
        self._now = now
        self._versions = _check_versions(versions)

    def _refuse(self, error: WireError) -> NoReturn:
        """Tell the client in plaintext why, so a person can act on it, then fail."""
        self._send_plain(Error(code=error.code.value, message=error.message, detail={}))
        raise error

    def _on_client_hello(self, frame: bytes) -> Event | None:
        try:
            msg = self._receive_plain(frame)
            if not isinstance(msg, ClientHello):
                raise RemoteProtocolError(f"expected channel.client_hello, got {msg.TYPE}")
            common = set(msg.versions) & set(self._versions)
            if not common:
                raise RemoteProtocolError(
                    f"no common protocol version (client {msg.versions}, server "
                    f"{list(self._versions)})"
                )
            private = X25519PrivateKey.generate()
            shared = _exchange(private, msg.public_key)
            self.peer, secret = self._auth.accept(msg.auth, self._now)
        except (RemoteProtocolError, AuthenticationError) as error:
            self._refuse(error)
        self.version = max(common)
        public = private.public_key().public_bytes_raw()
        info = self._auth.server_info(hello_hash(frame, public))
        self._transcript += frame
        self._transcript += self._send_plain(
            ServerHello(version=self.version, public_key=public, server_info=info)
        )
        self._keys = _key_schedule(shared, secret, self._transcript_hash(), False)
        self._state = _State.WAIT_CLIENT_FINISHED
        return None

    def _on_client_finished(self, frame: bytes) -> Event | None:
        try:
            self._check_finished(frame)
        except (IntegrityError, AuthenticationError):
            self._keys = None  # no sealed close: the client could not read it
            self._refuse(
                AuthenticationError(
                    "the client could not prove the shared secret "
                    "(wrong pre-shared key or ticket session key)"
                )
            )
        self._send_finished()
        self._open()
        if self.peer is None or self.version is None:
            raise LocalProtocolError("handshake finished without a peer")
        return HandshakeDone(self.peer, self.version)

    _TABLE = {
        (_State.WAIT_CLIENT_HELLO, KIND_PLAIN): _on_client_hello,
        (_State.WAIT_CLIENT_FINISHED, KIND_SEALED): _on_client_finished,
        (_State.OPEN, KIND_SEALED): _Channel._on_record,
    }


# --- pre-shared keys: the static, pinned-key authentication --------------------------------


def _check_psk(psk: bytes) -> bytes:
    if type(psk) is not bytes or len(psk) < MIN_PSK_BYTES:
        raise LocalProtocolError(f"a pre-shared key is at least {MIN_PSK_BYTES} bytes")
    return psk


class PskClientAuth:
    """Client side of pre-shared-key authentication: `name` with `role`, proven by `psk`."""

    def __init__(self, name: str, role: str, psk: bytes) -> None:
        self.name = name
        self.role = role
        self._psk = _check_psk(psk)

    def hello(self) -> dict[str, Any]:
        return {"psk_name": self.name, "role": self.role}

    def secret(self) -> bytes:
        return self._psk

    def check_server(self, info: dict[str, Any], transcript_hash: bytes) -> PeerInfo:
        # The server proves it holds the PSK with its Finished; this only names it.
        name, role = info.get("name"), info.get("role")
        if type(name) is not str or type(role) is not str:
            raise AuthenticationError("server info must name the server and its role")
        return PeerInfo(name=name, role=role)


class PskServerAuth:
    """Server side: `keys` maps a client name to its (role, psk)."""

    def __init__(
        self,
        keys: Mapping[str, tuple[str, bytes]],
        *,
        server_name: str = "server",
        server_role: str = "server",
    ) -> None:
        self._keys = {name: (role, _check_psk(psk)) for name, (role, psk) in keys.items()}
        self._info = {"name": server_name, "role": server_role}

    def accept(self, hello: dict[str, Any], now: float) -> tuple[PeerInfo, bytes]:
        name, role = hello.get("psk_name"), hello.get("role")
        if type(name) is not str or type(role) is not str:
            raise AuthenticationError("pre-shared-key hello must carry psk_name and role")
        entry = self._keys.get(name)
        if entry is None:
            raise AuthenticationError(f"unknown principal {name!r}")
        if entry[0] != role:
            raise AuthenticationError(f"principal {name!r} does not have role {role!r}")
        return PeerInfo(name=name, role=role), entry[1]

    def server_info(self, transcript_hash: bytes) -> dict[str, Any]:
        return dict(self._info)
