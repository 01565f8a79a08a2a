"""wire.channel driven without sockets: two channel objects joined by a fake link."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import codec
from wire.channel import (
    KIND_PLAIN,
    MAX_HANDSHAKE_FRAME_BYTES,
    NEED_DATA,
    ClientChannel,
    ClientHello,
    Closed,
    DirectionalCipher,
    Event,
    HandshakeDone,
    NeedData,
    Payload,
    PeerInfo,
    PskClientAuth,
    PskServerAuth,
    ServerChannel,
)
from wire.errors import (
    AuthenticationError,
    DecodeError,
    ErrorCode,
    FrameTooLarge,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    WireError,
)
from wire.framing import FrameDecoder, encode_frame
from wire.messages import Ping, decode_message, encode_message

PSK = bytes(range(32))
NOW = 1_700_000_000.0


def client(psk: bytes = PSK, name: str = "alice", role: str = "client") -> ClientChannel:
    return ClientChannel(PskClientAuth(name, role, psk))


def server(**options: Any) -> ServerChannel:
    auth = PskServerAuth({"alice": ("client", PSK)}, server_name="db", server_role="db")
    return ServerChannel(auth, now=NOW, **options)


def events(channel: ClientChannel | ServerChannel) -> list[Event]:
    found: list[Event] = []
    while not isinstance(event := channel.next_event(), NeedData):
        found.append(event)
        if isinstance(event, Closed):
            break
    return found


def pump(sender: ClientChannel | ServerChannel, receiver: ClientChannel | ServerChannel) -> None:
    data = sender.data_to_send()
    if data:
        receiver.receive_data(data)


def connect(
    a: ClientChannel | None = None, b: ServerChannel | None = None
) -> tuple[ClientChannel, ServerChannel]:
    """A finished handshake between a client and a server."""
    a = a or client()
    b = b or server()
    pump(a, b)
    assert events(b) == []
    pump(b, a)
    assert events(a) == []
    pump(a, b)
    assert events(b) == [HandshakeDone(PeerInfo("alice", "client"), 1)]
    pump(b, a)
    assert events(a) == [HandshakeDone(PeerInfo("db", "db"), 1)]
    assert a.is_open and b.is_open
    return a, b


def sealed_frames(data: bytes) -> list[bytes]:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(encode_frame(frame))
    return frames


def test_handshake_then_payloads_both_ways() -> None:
    a, b = connect()
    b.receive_data(a.send(b"request") + a.send(b""))
    assert events(b) == [Payload(b"request"), Payload(b"")]
    a.receive_data(b.send(b"reply"))
    assert events(a) == [Payload(b"reply")]


def test_sealed_frames_hide_the_payload() -> None:
    a, _ = connect()
    frame = a.send(b"secret value")
    assert b"secret value" not in frame
    assert frame[4] == 0x02  # kind: sealed


def test_clean_close_is_distinguished_from_truncation() -> None:
    a, b = connect()
    b.receive_data(a.close("done"))
    b.receive_data(b"")
    assert events(b) == [Closed("done")]
    assert b.next_event() == Closed("done")  # and stays closed


def test_eof_without_close_is_truncation() -> None:
    a, b = connect()
    b.receive_data(a.send(b"one"))
    b.receive_data(b"")
    assert b.next_event() == Payload(b"one")
    with pytest.raises(IntegrityError, match="truncated"):
        b.next_event()


def test_eof_mid_frame_is_truncation() -> None:
    a, b = connect()
    b.receive_data(a.send(b"one")[:-1])
    b.receive_data(b"")
    with pytest.raises(IntegrityError):
        b.next_event()


def test_flipped_ciphertext_bit_ends_the_connection_on_both_sides() -> None:
    a, b = connect()
    frame = bytearray(a.send(b"payload"))
    frame[10] ^= 0x01
    b.receive_data(bytes(frame))
    with pytest.raises(IntegrityError) as caught:
        b.next_event()
    with pytest.raises(IntegrityError) as again:  # the channel stays broken
        b.receive_data(a.send(b"more"))
    assert again.value is caught.value
    pump(b, a)  # b tells a why, sealed
    [closed] = events(a)
    assert isinstance(closed, Closed) and closed.code == ErrorCode.PROTOCOL
    assert "authentication" in closed.reason


def test_flipped_length_prefix_bit_fails_too() -> None:
    a, b = connect()
    frame = bytearray(a.send(b"payload") + a.send(b"x" * 300))
    frame[3] ^= 0x01  # the prefix is associated data
    b.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError):
        events(b)


def test_replayed_frame_is_refused() -> None:
    a, b = connect()
    frame = a.send(b"pay me once")
    b.receive_data(frame)
    assert b.next_event() == Payload(b"pay me once")
    b.receive_data(frame)
    with pytest.raises(IntegrityError, match="replayed"):
        b.next_event()


def test_reordered_frames_are_refused() -> None:
    a, b = connect()
    first, second = a.send(b"first"), a.send(b"second")
    b.receive_data(second + first)
    with pytest.raises(IntegrityError):
        b.next_event()


def test_dropped_frame_is_refused() -> None:
    a, b = connect()
    a.send(b"lost")
    b.receive_data(a.send(b"after the lost one"))
    with pytest.raises(IntegrityError):
        b.next_event()


def test_frame_from_the_other_direction_is_refused() -> None:
    _a, b = connect()
    b.receive_data(b.send(b"reflected"))  # a frame b sealed, played back to b
    with pytest.raises(IntegrityError):
        b.next_event()


def test_wrong_key_fails_on_both_sides_with_a_readable_reason() -> None:
    a, b = client(psk=b"\xee" * 32), server()
    pump(a, b)
    events(b)
    pump(b, a)
    events(a)
    pump(a, b)
    with pytest.raises(AuthenticationError, match="could not prove") as on_server:
        b.next_event()
    pump(b, a)  # a plaintext Error frame, UNAUTHORIZED
    with pytest.raises(AuthenticationError, match="could not prove"):
        a.next_event()
    assert on_server.value.code == ErrorCode.UNAUTHORIZED
    with pytest.raises(AuthenticationError):  # any frame after the failure: still refused
        b.receive_data(b"\x00\x00\x00\x01\x02")
    with pytest.raises(AuthenticationError):
        b.next_event()


@pytest.mark.parametrize(
    ("name", "role", "match"),
    [("mallory", "client", "unknown principal"), ("alice", "admin", "does not have role")],
)
def test_unknown_principal_or_role_is_refused_in_plaintext(
    name: str, role: str, match: str
) -> None:
    a, b = client(name=name, role=role), server()
    pump(a, b)
    with pytest.raises(AuthenticationError, match=match):
        b.next_event()
    reply = b.data_to_send()
    assert reply[4] == KIND_PLAIN
    _, error = decode_message(reply[5:])
    assert error.code == "UNAUTHORIZED"  # type: ignore[attr-defined]
    a.receive_data(reply)
    with pytest.raises(AuthenticationError, match=match):
        a.next_event()


def test_tampered_server_hello_fails_the_handshake() -> None:
    a, b = client(), server()
    pump(a, b)
    events(b)
    hello = bytearray(b.data_to_send())
    hello[-1] ^= 0x01  # the server role "db" becomes "dc": the transcript no longer matches
    a.receive_data(bytes(hello))
    events(a)
    pump(a, b)
    with pytest.raises(AuthenticationError):
        b.next_event()


def test_no_common_version_is_refused() -> None:
    a, b = client(), server()
    hello = ClientHello(versions=[99], public_key=b"\x09" * 32, auth={})
    payload = bytes([KIND_PLAIN]) + encode_message(0, hello)
    b.receive_data(encode_frame(payload))
    with pytest.raises(RemoteProtocolError, match="no common protocol version"):
        b.next_event()
    a.receive_data(b.data_to_send())
    with pytest.raises(RemoteProtocolError, match="no common protocol version"):
        a.next_event()


def test_invalid_public_key_is_refused() -> None:
    b = server()
    hello = ClientHello(versions=[1], public_key=bytes(32), auth={"psk_name": "alice"})
    b.receive_data(encode_frame(bytes([KIND_PLAIN]) + encode_message(0, hello)))
    with pytest.raises(RemoteProtocolError, match="X25519"):
        b.next_event()


def test_wrong_message_in_the_handshake_is_refused() -> None:
    b = server()
    b.receive_data(encode_frame(bytes([KIND_PLAIN]) + encode_message(0, Ping())))
    with pytest.raises(RemoteProtocolError, match=r"expected channel\.client_hello"):
        b.next_event()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", RemoteProtocolError),  # empty frame
        (bytes([KIND_PLAIN]) + b"\xff\x00", DecodeError),  # malformed CBOR hello
        (bytes([KIND_PLAIN]) + b"\x81" * 10_000 + b"\x00", DecodeError),  # too deep
        (bytes([KIND_PLAIN]) + codec.encode(["no.such", 0, {}]), DecodeError),  # unknown type
        (bytes([0x02]) + b"\x00" * 40, RemoteProtocolError),  # sealed before any keys
        (bytes([0x07]) + b"\x00", RemoteProtocolError),  # unknown frame kind
    ],
)
def test_bad_handshake_frames_are_typed_errors(payload: bytes, error: type[WireError]) -> None:
    b = server()
    b.receive_data(encode_frame(payload))
    with pytest.raises(error):
        b.next_event()


def test_oversized_handshake_frame_is_refused_early() -> None:
    b = server()
    b.receive_data((MAX_HANDSHAKE_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        b.next_event()


def test_eof_during_the_handshake() -> None:
    b = server()
    b.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        b.next_event()


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=3000))
def test_random_bytes_give_a_typed_error_or_need_data(data: bytes) -> None:
    for channel in (server(), client()):
        try:
            channel.receive_data(data)
            assert channel.next_event() is NEED_DATA
        except WireError:
            pass


@settings(max_examples=50, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=2000), max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_random_splits_of_a_sealed_stream_decode_identically(
    payloads: list[bytes], cuts: list[int]
) -> None:
    a, b = connect()
    stream = b"".join(a.send(p) for p in payloads) + a.close("bye")
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    received: list[Event] = []
    for start, end in itertools.pairwise(points):
        b.receive_data(stream[start:end])
        received.extend(events(b))
    assert received == [*(Payload(p) for p in payloads), Closed("bye")]


def test_handshake_survives_byte_at_a_time_delivery() -> None:
    a, b = client(), server()
    done: list[Event] = []
    for _ in range(4):
        for sender, receiver in ((a, b), (b, a)):
            for byte in sender.data_to_send():
                receiver.receive_data(bytes([byte]))
                done.extend(events(receiver))
    assert [type(e) for e in done] == [HandshakeDone, HandshakeDone]


def test_payload_limits() -> None:
    a, b = connect(client(), server(max_frame_bytes=1000))
    assert b.max_payload_bytes == 1000 - 18
    b.send(b"x" * b.max_payload_bytes)
    with pytest.raises(LocalProtocolError):
        b.send(b"x" * (b.max_payload_bytes + 1))
    b.receive_data(a.send(b"y" * 1000))  # over the server's own limit
    with pytest.raises(FrameTooLarge):
        b.next_event()


def test_local_misuse_is_a_local_error() -> None:
    a = client()
    with pytest.raises(LocalProtocolError):
        a.send(b"too early")
    a, _ = connect()
    a.close()
    with pytest.raises(LocalProtocolError):
        a.send(b"after close")
    assert a.close() == b""
    with pytest.raises(LocalProtocolError):
        PskClientAuth("a", "client", b"short")
    with pytest.raises(LocalProtocolError):
        PskServerAuth({"a": ("client", b"short")})
    with pytest.raises(LocalProtocolError):
        ClientChannel(PskClientAuth("a", "client", PSK), versions=(7,))


def test_nonce_counter_exhaustion_is_an_error() -> None:
    key = hashlib.sha256(b"k").digest()
    last = DirectionalCipher(key, counter=2**64 - 1)
    frame = last.seal(b"\x01last", 1000)
    with pytest.raises(LocalProtocolError, match="exhausted"):
        last.seal(b"\x01one too many", 1000)
    opener = DirectionalCipher(key, counter=2**64 - 1)
    assert opener.open(frame[4:]) == b"\x01last"
    with pytest.raises(IntegrityError, match="exhausted"):
        opener.open(frame[4:])


def test_nonce_is_four_zero_bytes_and_a_big_endian_counter() -> None:
    """Pins the wire format docs/protocol.md describes, for other-language clients."""
    key = hashlib.sha256(b"k").digest()
    frame = DirectionalCipher(key, counter=5).seal(b"\x01hi", 1000)
    header = frame[:5]
    nonce = b"\x00\x00\x00\x00" + (5).to_bytes(8, "big")
    assert ChaCha20Poly1305(key).decrypt(nonce, frame[5:], header) == b"\x01hi"
