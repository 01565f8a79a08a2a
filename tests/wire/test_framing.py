"""wire.framing: length-prefixed frames, fed any way the bytes arrive."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire.errors import FrameTooLarge, IntegrityError, LocalProtocolError, RemoteProtocolError
from wire.framing import FrameDecoder, encode_frame
from wire.limits import MAX_FRAME_BYTES


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_frame_layout_is_big_endian_length_then_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_round_trip_of_several_frames_in_one_read() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(p) for p in (b"a", b"", b"ccc")))
    assert drain(decoder) == [b"a", b"", b"ccc"]
    assert decoder.buffered_bytes == 0


def test_partial_frame_waits_for_more_bytes() -> None:
    decoder = FrameDecoder()
    data = encode_frame(b"hello")
    for byte in data[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.receive_data(data[-1:])
    assert decoder.next_frame() == b"hello"


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_random_splits_decode_identically(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    frames: list[bytes] = []
    for start, end in itertools.pairwise(points):
        decoder.receive_data(stream[start:end])
        frames.extend(drain(decoder))
    decoder.receive_data(b"")
    assert decoder.next_frame() is None
    assert decoder.eof
    assert frames == payloads


def test_largest_length_prefix_fails_before_any_payload_arrives() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge) as caught:
        decoder.next_frame()
    assert caught.value.detail["frame_bytes"] == 2**32 - 1
    assert decoder.buffered_bytes == 0  # nothing kept, nothing allocated for the payload


def test_one_byte_over_the_limit_is_refused_and_the_limit_itself_is_fine() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    decoder.receive_data(encode_frame(b"x" * 100))
    assert decoder.next_frame() == b"x" * 100
    decoder.receive_data((101).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_default_limit_is_one_mebibyte() -> None:
    decoder = FrameDecoder()
    decoder.receive_data((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    decoder.receive_data(b"\x00\x00\x01\x00")
    with pytest.raises(FrameTooLarge) as first:
        decoder.next_frame()
    with pytest.raises(FrameTooLarge) as again:
        decoder.receive_data(encode_frame(b"ok"))
    assert again.value is first.value


def test_truncated_frame_then_eof_is_an_integrity_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"complete") + encode_frame(b"cut short")[:-3])
    assert decoder.next_frame() == b"complete"
    assert decoder.next_frame() is None
    decoder.receive_data(b"")
    with pytest.raises(IntegrityError, match="middle of a frame"):
        decoder.next_frame()


def test_truncated_header_then_eof_is_an_integrity_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\x00\x00")
    decoder.receive_data(b"")
    with pytest.raises(IntegrityError):
        decoder.next_frame()


def test_clean_eof_between_frames() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    assert decoder.next_frame() is None
    assert decoder.eof


def test_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")


@given(st.binary(min_size=1, max_size=2000))
def test_random_bytes_give_frames_or_a_typed_error(data: bytes) -> None:
    decoder = FrameDecoder(max_frame_bytes=512)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    try:
        drain(decoder)
    except RemoteProtocolError:
        pass
    assert decoder.buffered_bytes <= len(data)


def test_encoding_over_the_limit_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, max_frame_bytes=10)


@pytest.mark.parametrize("bad", [0, -1, 2**32, 1.5, "10"])
def test_bad_limits_are_refused(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_frame_bytes=bad)  # type: ignore[arg-type]


def test_many_small_frames_in_a_big_buffer_compact() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"y" * 10) * 20_000)
    assert len(drain(decoder)) == 20_000
    assert decoder.buffered_bytes == 0
