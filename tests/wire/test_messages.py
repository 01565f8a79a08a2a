"""wire.messages and wire.errors: every message type in wire/ round-trips; bad envelopes fail."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import channel, codec, errors
from wire.errors import DecodeError, ErrorCode, LocalProtocolError, ServiceError, service_error
from wire.limits import MAX_BATCH_ITEMS
from wire.messages import (
    MAX_REQUEST_ID,
    Batch,
    Error,
    Message,
    Ok,
    Ping,
    decode_message,
    encode_message,
    message,
    registered_types,
)

# One example of every message type that wire/ defines.
WIRE_EXAMPLES: list[Message] = [
    Error(code="NOT_FOUND", message="no such key", detail={"key": b"k", "slot": 7}),
    Error(code="INTERNAL", message=""),
    Ok(),
    Ping(),
    Batch(items=[["ping", 1, {}], ["ok", 2, {}]]),
    channel.ClientHello(versions=[1], public_key=b"\x01" * 32, auth={"psk_name": "a"}),
    channel.ServerHello(version=1, public_key=b"\x02" * 32, server_info={"sig": b"s"}),
]


def test_examples_cover_every_message_type_of_the_wire_package() -> None:
    in_wire = {
        name for name, cls in registered_types().items() if cls.__module__.startswith("wire.")
    }
    assert {m.TYPE for m in WIRE_EXAMPLES} == in_wire


@pytest.mark.parametrize("msg", WIRE_EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: Message) -> None:
    data = encode_message(42, msg)
    assert codec.decode(data)[:2] == [msg.TYPE, 42]
    assert decode_message(data) == (42, msg)


@given(
    rid=st.integers(min_value=0, max_value=MAX_REQUEST_ID),
    code=st.sampled_from([c.value for c in ErrorCode]),
    text=st.text(max_size=50),
    detail=st.dictionaries(
        st.text(max_size=5), st.integers(-(2**63), 2**63) | st.binary(max_size=5)
    ),
)
def test_error_round_trip_property(rid: int, code: str, text: str, detail: dict[str, Any]) -> None:
    msg = Error(code=code, message=text, detail=detail)
    assert decode_message(encode_message(rid, msg)) == (rid, msg)


@pytest.mark.parametrize(
    ("envelope", "match"),
    [
        (["no.such.type", 1, {}], "unknown message type"),
        ({"type": "ping"}, "3-item array"),
        (["ping", 1], "3-item array"),
        ([7, 1, {}], "type must be a text string"),
        (["ping", -1, {}], "request id"),
        (["ping", 2**63, {}], "request id"),
        (["ping", "1", {}], "request id"),
        (["ping", 1, []], "fields must be a map"),
        (["ping", 1, {1: 2}], "fields must be a map"),
        (["error", 1, {"code": "X"}], "message"),  # a missing field
        (["error", 1, {"code": 5, "message": "m"}], "code"),  # a field of the wrong type
        (["ok", 1, {"extra": 1}], "extra"),  # an unknown field
        (["batch", 1, {"items": "not a list"}], "items"),
    ],
)
def test_bad_envelopes_are_decode_errors(envelope: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_message(codec.encode(envelope))


def test_bad_cbor_in_an_envelope_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_message(b"\x83\x64ping")


def test_batch_over_its_item_limit_is_refused() -> None:
    items = [["ping", i, {}] for i in range(MAX_BATCH_ITEMS + 1)]
    with pytest.raises(LocalProtocolError):
        Batch(items=items)
    with pytest.raises(DecodeError):
        decode_message(codec.encode(["batch", 1, {"items": items}]))


def test_building_a_message_with_a_bad_field_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Error(code=5, message="m")  # type: ignore[arg-type]


def test_bad_request_ids_are_refused_when_encoding() -> None:
    for rid in (-1, MAX_REQUEST_ID + 1, "1"):
        with pytest.raises(LocalProtocolError):
            encode_message(rid, Ping())  # type: ignore[arg-type]


def test_registry_refuses_a_duplicate_name() -> None:
    with pytest.raises(LocalProtocolError):

        @message("ping")
        class AnotherPing(Message):
            pass


@pytest.mark.parametrize("code", list(ErrorCode))
def test_service_error_for_every_code(code: ErrorCode) -> None:
    error = service_error(code.value, "why", {"a": 1})
    assert isinstance(error, ServiceError)
    assert error.code is code
    assert (error.message, error.detail) == ("why", {"a": 1})


def test_unknown_error_code_becomes_internal_with_the_code_kept() -> None:
    error = service_error("FROM_THE_FUTURE", "m")
    assert isinstance(error, errors.Internal)
    assert error.detail == {"unknown_code": "FROM_THE_FUTURE"}


@message("test.columns")
class Columns(Message):
    """Columns of exact scalars: checked with one type scan, item by item when that fails."""

    numbers: list[int]
    names: tuple[bytes, ...]


def test_columns_of_exact_scalars_round_trip_and_refuse_other_types() -> None:
    msg = Columns(numbers=[1, 2, 2**63], names=(b"a", b"b"))
    assert decode_message(encode_message(3, msg)) == (3, msg)
    assert Columns(numbers=[], names=[b"x"]).names == (b"x",)  # type: ignore[arg-type]
    for numbers, names in (([1, True], [b"a"]), ([1, "2"], [b"a"]), ([1], [b"a", "b"])):
        with pytest.raises(LocalProtocolError, match="expected"):
            Columns(numbers=numbers, names=names)  # type: ignore[arg-type]
        fields = {"numbers": numbers, "names": names}
        with pytest.raises(DecodeError):
            decode_message(codec.encode(["test.columns", 1, fields]))


@message("test.shapes")
class Shapes(Message):
    """One field of each kind a checker handles, for the decode-without-a-walk tests."""

    value: Any
    key: str | bytes | int
    count: int
    items: list[Any]
    detail: dict[str, Any]
    rows: list[tuple[bool, Any, int]]
    maybe: int | None = None


SHAPES = Shapes(
    value={"a": [1, b"x", None]},
    key=b"k",
    count=3,
    items=[1, "two", [3.0]],
    detail={"d": {7: True}},
    rows=[(True, b"v", 1)],
)
_PLACEHOLDER = b"\x00placeholder\x00"

# Raw CBOR items cbor2 decodes but the codec does not admit.
NOT_ADMITTED = {
    "undefined": b"\xf7",
    "simple 0": b"\xe0",
    "simple 32": b"\xf8\x20",
    "array as map key": b"\xa1\x81\x01\x01",
    "map as map key": b"\xa1\xa1\x01\x01\x01",
    "nested undefined": b"\x82\x01\xa1\x61a\xf7",
}


def _with_raw(field: str, raw: bytes) -> bytes:
    """The encoded Shapes envelope with `field`'s value replaced by the raw CBOR `raw`."""
    fields = SHAPES.to_wire()
    fields[field] = _PLACEHOLDER
    return codec.encode(["test.shapes", 1, fields]).replace(codec.encode(_PLACEHOLDER), raw)


@pytest.mark.parametrize("raw", NOT_ADMITTED.values(), ids=list(NOT_ADMITTED))
@pytest.mark.parametrize("field", ["value", "key", "count", "items", "detail", "rows", "maybe"])
def test_values_the_codec_refuses_are_refused_in_every_field(field: str, raw: bytes) -> None:
    data = _with_raw(field, raw)
    with pytest.raises(DecodeError):
        codec.decode(data)  # the strict walk refuses it ...
    with pytest.raises(DecodeError):
        decode_message(data)  # ... and so does each field's checker


@pytest.mark.parametrize("raw", NOT_ADMITTED.values(), ids=list(NOT_ADMITTED))
def test_values_the_codec_refuses_are_refused_in_the_envelope(raw: bytes) -> None:
    for envelope in (b"\x83" + raw + b"\x01\xa0", b"\x83\x64ping" + raw + b"\xa0", raw):
        with pytest.raises(DecodeError):
            decode_message(envelope)
    with pytest.raises(DecodeError):
        decode_message(b"\x83\x64ping\x01" + raw)
    with pytest.raises(DecodeError):
        decode_message(b"\x83\x64ping\x01\xa1" + raw + b"\x01")


@given(st.data())
def test_decode_message_refuses_whatever_the_strict_decoder_refuses(data: st.DataObject) -> None:
    """decode_message skips codec.decode's walk; on mutated messages it must still refuse
    everything that walk refuses, raise nothing but DecodeError, and return only admitted
    values."""
    encoded = bytearray(encode_message(5, SHAPES))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(encoded)))
        if data.draw(st.booleans()) and at < len(encoded):
            encoded[at] = data.draw(st.integers(0, 255))
        else:
            encoded[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    raw = bytes(encoded)
    try:
        codec.decode(raw)
        strict_refused = False
    except DecodeError:
        strict_refused = True
    try:
        _, msg = decode_message(raw)
    except DecodeError:
        return
    assert not strict_refused
    codec.check_value(msg.to_wire())


def test_decoding_checks_each_field_whether_or_not_all_are_sent() -> None:
    fields = SHAPES.to_wire()
    assert decode_message(codec.encode(["test.shapes", 2, fields])) == (2, SHAPES)
    del fields["maybe"]  # a default fills it
    assert decode_message(codec.encode(["test.shapes", 2, fields])) == (2, SHAPES)
    with pytest.raises(DecodeError, match="unexpected keyword argument 'extra'"):
        decode_message(codec.encode(["test.shapes", 2, {**fields, "extra": 1}]))
    with pytest.raises(DecodeError, match="unexpected keyword argument 'other'"):
        decode_message(codec.encode(["test.shapes", 2, {**fields, "other": 1, "maybe": 1}]))
    for sent in (SHAPES.to_wire(), fields):  # every field (the fast path), or not
        with pytest.raises(DecodeError, match=r"test\.shapes\.count: expected int") as caught:
            decode_message(codec.encode(["test.shapes", 2, {**sent, "count": "3"}]))
        assert caught.value.detail == {"type": "test.shapes", "field": "count"}
