"""keyval.keys: canonical form, slots (Redis Cluster vectors), admission."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyval.keys import (
    DEFAULT_MAX_KEY_BYTES,
    NUM_SLOTS,
    canonical_key,
    canonical_slot,
    check_key,
    check_key_slot,
    crc16_xmodem,
    key_from_canonical,
    key_slot,
)
from wire.errors import BadRequest, TooLarge

keys = st.one_of(st.text(), st.binary(), st.integers(min_value=-(2**900), max_value=2**900))


def test_crc16_xmodem_check_value() -> None:
    # The standard CRC16-XMODEM check value, also Redis Cluster's spec example.
    assert crc16_xmodem(b"123456789") == 0x31C3


def test_redis_cluster_slot_vectors() -> None:
    # Values as `CLUSTER KEYSLOT` answers them.
    assert key_slot("123456789") == 0x31C3 % NUM_SLOTS
    assert key_slot("foo") == 12182
    assert key_slot("bar") == 5061
    assert key_slot("somekey") == 11058
    assert key_slot("") == 0


def test_hash_tags_follow_redis_rule() -> None:
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("{user1000}.followers") == key_slot("{user1000}.following")
    # Empty tag: the whole key is hashed.
    assert key_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % NUM_SLOTS
    # Only the first `{` and the first `}` after it count.
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
    # No closing brace: the whole key.
    assert key_slot("foo{bar") == crc16_xmodem(b"foo{bar") % NUM_SLOTS
    assert key_slot(b"{tag}x") == key_slot(b"tag") == key_slot("tag")


def test_int_keys_hash_their_decimal_form() -> None:
    assert key_slot(123456789) == key_slot("123456789")
    assert key_slot(-5) == crc16_xmodem(b"-5") % NUM_SLOTS


def test_types_are_distinct() -> None:
    forms = {canonical_key("1"), canonical_key(b"1"), canonical_key(1)}
    assert len(forms) == 3


@given(keys)
def test_canonical_round_trip(key: str | bytes | int) -> None:
    data = canonical_key(key)
    back = key_from_canonical(data)
    assert type(back) is type(key)
    assert back == key
    assert canonical_slot(data) == key_slot(key)
    assert 0 <= key_slot(key) < NUM_SLOTS


@given(keys)
def test_check_key_slot_is_check_key_and_key_slot(key: str | bytes | int) -> None:
    assert check_key_slot(key, 10**6) == (check_key(key, 10**6), key_slot(key))


def test_check_key_slot_follows_hash_tags_and_refuses_like_check_key() -> None:
    assert check_key_slot("{user:1}:name")[1] == key_slot("user:1")
    assert check_key_slot(b"{user:1}:x")[1] == key_slot(b"user:1")
    assert check_key_slot(-12)[1] == key_slot(-12)

    class Name(str):
        pass

    assert check_key_slot(Name("{a}b")) == (check_key("{a}b"), key_slot("a"))
    with pytest.raises(BadRequest):
        check_key_slot("\ud800")
    with pytest.raises(BadRequest):
        check_key_slot(True)
    with pytest.raises(TooLarge):
        check_key_slot("x" * DEFAULT_MAX_KEY_BYTES)


@given(st.integers(min_value=-(2**200), max_value=2**200), st.integers(-(2**200), 2**200))
def test_int_canonical_form_keeps_order(first: int, second: int) -> None:
    assert (canonical_key(first) < canonical_key(second)) == (first < second)


@given(st.text(), st.text())
def test_str_canonical_form_keeps_order(first: str, second: str) -> None:
    assert (canonical_key(first) < canonical_key(second)) == (first < second)


def test_int_edges_round_trip() -> None:
    for number in (0, -1, 1, 255, 256, -256, -257, 2**63, -(2**63)):
        assert key_from_canonical(canonical_key(number)) == number


@pytest.mark.parametrize("bad", [True, False, 1.5, None, [1], {"a": 1}, bytearray(b"x")])
def test_wrong_key_types_are_bad_requests(bad: object) -> None:
    with pytest.raises(BadRequest):
        check_key(bad)
    with pytest.raises(BadRequest):
        key_slot(bad)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        canonical_key(bad)  # type: ignore[arg-type]


def test_lone_surrogate_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        check_key("\ud800")


def test_key_size_limit() -> None:
    # One type byte plus the payload counts against the limit.
    assert check_key("a" * (DEFAULT_MAX_KEY_BYTES - 1)) == b"s" + b"a" * (DEFAULT_MAX_KEY_BYTES - 1)
    with pytest.raises(TooLarge):
        check_key("a" * DEFAULT_MAX_KEY_BYTES)
    with pytest.raises(TooLarge):
        check_key(b"x" * 20, max_key_bytes=10)


def test_huge_int_key_is_too_large() -> None:
    with pytest.raises(TooLarge):
        canonical_key(2**2000)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"x",
        b"z123",
        b"s\xff",
        b"i",
        b"i\x82\x01",  # header says 2 bytes, 1 given
        b"i\x82\x00\x01",  # non-minimal positive
        b"i\x7d\xff\xfe",  # non-minimal negative
    ],
)
def test_malformed_canonical_keys(data: bytes) -> None:
    with pytest.raises(BadRequest):
        key_from_canonical(data)


def test_canonical_rejects_non_bytes() -> None:
    with pytest.raises(BadRequest):
        key_from_canonical("s1")  # type: ignore[arg-type]
