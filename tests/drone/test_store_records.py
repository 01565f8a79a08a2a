"""SlotStore keeps each key as one bytes record (version + CBOR value): values round-trip,
versions order writes, bad reseed items are refused, and a key costs little memory."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from keyval.keys import canonical_key
from keyval.store import SlotStore
from wire import codec
from wire.errors import BadRequest

VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    "text",
    b"\x00bytes",
    [1, [2, "three"], {"k": b"v"}],
    {"a": None, 1: [1.25], b"b": {"deep": [True]}},
]


@pytest.mark.parametrize("value", VALUES)
def test_values_round_trip_with_their_version(value: Any) -> None:
    store = SlotStore()
    store.create_slot(7)
    key = canonical_key("k")
    assert store.apply(7, key, value, 5, deleted=False)
    assert store.get(7, key) == (value, 5)
    assert store.version_of(7, key) == 5
    assert store.contains(7, key)
    assert list(store.scan(7)) == [(key, value, 5)]


def test_an_older_version_does_not_overwrite() -> None:
    store = SlotStore()
    store.create_slot(1)
    key = canonical_key("k")
    store.apply(1, key, "new", 2**41 + 3, deleted=False)
    assert not store.apply(1, key, "old", 2**41 + 2, deleted=False)
    assert store.get(1, key) == ("new", 2**41 + 3)
    assert store.apply(1, key, None, 2**41 + 4, deleted=True)
    assert not store.contains(1, key) and store.get(1, key) is None


@pytest.mark.parametrize("version", [0, -1, 2**64, "1"])
def test_a_reseed_item_with_a_bad_version_is_refused(version: Any) -> None:
    store = SlotStore()
    with pytest.raises(BadRequest):
        store.install_slot(3, [(canonical_key("k"), "v", version)])


def test_a_key_costs_under_120_bytes() -> None:
    """16-byte keys, 32-byte values, 50 keys per slot (the 1M-key benchmark's density): ~103 B
    traced (a SortedDict per slot was ~172; the drone's RSS target is 200 B per key)."""
    store = SlotStore()
    slots = 400
    for slot in range(slots):
        store.create_slot(slot)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(slots * 50):
            key = canonical_key(f"key-{index:012d}")
            store.apply(index % slots, key, f"value-{index:026d}", 2**40 + index, deleted=False)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown / (slots * 50) < 120


def test_a_slot_installs_from_encoded_values() -> None:
    store = SlotStore()
    keys = sorted(canonical_key(f"k{index}") for index in range(len(VALUES)))
    versions = [2**40 + index + 1 for index in range(len(VALUES))]
    store.install_slot_encoded(4, keys, [codec.encode(v) for v in VALUES], versions)
    assert list(store.scan(4)) == list(zip(keys, VALUES, versions, strict=True))
    assert store.next_version(4, 1) > max(versions)  # the counter starts above them
    store.install_slot_encoded(5, [], [], [])
    assert store.has_slot(5) and store.key_count(5) == 0


@pytest.mark.parametrize(
    ("keys", "values", "versions"),
    [
        ([b"k"], [b"\x01"], [0]),
        ([b"k"], [b"\x01"], [2**64]),
        ([b"k"], [b"\x01"], [True]),
        (["k"], [b"\x01"], [1]),
        ([b"k"], [1], [1]),
        ([b"k", b"l"], [b"\x01"], [1, 2]),
    ],
)
def test_bad_encoded_reseed_items_are_refused(
    keys: list[Any], values: list[Any], versions: list[Any]
) -> None:
    with pytest.raises(BadRequest):
        SlotStore().install_slot_encoded(3, keys, values, versions)
