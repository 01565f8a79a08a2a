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
