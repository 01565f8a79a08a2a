"""wire.codec: only plain CBOR data gets in, whatever the bytes."""

from __future__ import annotations

import math
import threading
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import codec
from wire.codec import check_each, check_value, decode, encode, encode_canonical
from wire.errors import DecodeError, LocalProtocolError
from wire.limits import MAX_DEPTH

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(-(2**64), 2**64 - 1), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(values)
def test_round_trip_of_admitted_values(value: Any) -> None:
    assert decode(encode(value)) == value
    assert decode(encode_canonical(value)) == value


def test_canonical_encoding_ignores_map_order() -> None:
    assert encode_canonical({"b": 1, "a": 2}) == encode_canonical({"a": 2, "b": 1})


def test_nan_round_trips() -> None:
    assert math.isnan(decode(encode(math.nan)))


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"\x18",  # uint8 with the byte missing
        b"\x62a",  # text of 2 with 1 byte
        b"\x82\x01",  # array of 2 with 1 item
        b"\x01\x02",  # trailing bytes after one item
        b"\x1c",  # reserved additional information
        b"\x62\xff\xfe",  # text that is not UTF-8
    ],
)
def test_malformed_cbor_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_nesting_ten_thousand_deep_is_refused_without_recursion() -> None:
    with pytest.raises(DecodeError):
        decode(b"\x81" * 10_000 + b"\x00")
    with pytest.raises(DecodeError):
        decode(b"\xa1\x00" * 10_000 + b"\x00")


def test_nesting_limit_is_exact() -> None:
    deep_ok: Any = 0
    for _ in range(MAX_DEPTH):
        deep_ok = [deep_ok]
    assert decode(encode(deep_ok)) == deep_ok
    with pytest.raises(DecodeError):
        decode(encode([deep_ok]))


@pytest.mark.parametrize(
    "data",
    [
        cbor2.dumps(cbor2.CBORTag(1, 0)),  # epoch date
        cbor2.dumps(cbor2.CBORTag(4242, "x")),  # an unknown tag
        b"\xd9\xd9\xf7\x00",  # self-described CBOR tag 55799
        b"\x81\xc1\x00",  # a tag inside an array
        b"\xc2\x41\x05",  # a bignum that would decode to a plain int
    ],
)
def test_tags_are_refused(data: bytes) -> None:
    with pytest.raises(DecodeError, match="tag"):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xf7",  # undefined
        b"\xf0",  # simple value 16
        b"\x9f\x01\xff",  # indefinite-length array
        b"\xa2\x01\x00\x01\x00",  # duplicate map key
        b"\xa1\x80\x00",  # an array as a map key
    ],
)
def test_other_non_plain_items_are_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_fail_typed(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


@pytest.mark.parametrize("value", [{1, 2}, object(), {(1, 2): 3}, [b"ok", complex(1, 2)]])
def test_check_value_refuses_python_only_types(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        check_value(value)


def test_encode_of_unencodable_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode(object())
    with pytest.raises(LocalProtocolError):
        encode_canonical(object())


@pytest.mark.parametrize("number", [*range(1101), 43000, 55799, 2**64 - 1])
def test_every_tag_is_refused_including_those_cbor2_knows(number: int) -> None:
    for content in (0, b"\x01" * 8, "2020-01-01T00:00:00Z", [0, 1]):
        data = cbor2.dumps(cbor2.CBORTag(number, content))
        with pytest.raises(DecodeError, match=f"tag {number} is not allowed"):
            decode(data)


@pytest.mark.parametrize("value", [2**64, -(2**64) - 1, [2**70], {2**64: 1}])
def test_integers_beyond_64_bits_are_refused(value: object) -> None:
    with pytest.raises(LocalProtocolError, match="64-bit"):
        check_value(value)


# ------------------------------------------------------------------ check_each


@given(st.lists(values, max_size=8))
def test_check_each_accepts_what_decode_accepts(items: list[Any]) -> None:
    check_each([encode(item) for item in items])


@given(st.lists(st.binary(max_size=12), max_size=6))
def test_check_each_agrees_with_decode_item_by_item(blobs: list[bytes]) -> None:
    """Never fooled by where one item ends: a cut item and a surplus one still fail."""
    bad = None
    for index, blob in enumerate(blobs):
        try:
            decode(blob)
        except DecodeError:
            bad = index
            break
    if bad is None:
        check_each(blobs)
    else:
        with pytest.raises(DecodeError) as caught:
            check_each(blobs)
        assert caught.value.detail["index"] <= bad


@pytest.mark.parametrize(
    ("blobs", "index"),
    [
        ([b"\x01", b"\x82\x01", b"\x02"], 1),  # cut; the next item would complete it
        ([b"\x01\x02", b""], 0),  # two items in one
        ([b"\x01", b""], 1),  # nothing
        ([b"\x01", b"\xc1\x01"], 1),  # a tag
        ([b"\xf7"], 0),  # undefined
        ([b"\x81\xa1\x80\x00"], 0),  # an array as a map key, inside an array
    ],
)
def test_check_each_names_the_bad_item(blobs: list[bytes], index: int) -> None:
    with pytest.raises(DecodeError) as caught:
        check_each(blobs)
    assert caught.value.detail["index"] == index


def test_each_thread_decodes_with_its_own_reused_decoder() -> None:
    items = [[index, b"x" * index, {"k": "v" * index}] for index in range(64)]
    encoded = [codec.encode(item) for item in items]
    failures: list[object] = []

    def decode_all() -> None:
        for _ in range(50):
            for item, data in zip(items, encoded, strict=True):
                if codec.decode(data) != item:
                    failures.append(item)
            with pytest.raises(DecodeError):
                codec.decode(b"\x81\x81\xf7")  # an error leaves the decoder usable

    threads = [threading.Thread(target=decode_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert codec.decode(b"\x81\x01", max_depth=1) == [1]  # other depths build their own
    with pytest.raises(DecodeError, match="depth"):
        codec.decode(b"\x81\x81\x01", max_depth=1)
