"""SlotStore: ordered per-slot storage, scans, versions, OCC validation."""

from __future__ import annotations

import itertools
import random

import pytest

from keyval.keys import canonical_key as ck
from keyval.store import EPOCH_SHIFT_BITS, SMALL_SLOT_MAX_KEYS, SlotStore
from wire.errors import BadRequest, Internal


def filled(slot: int = 7) -> SlotStore:
    store = SlotStore()
    store.create_slot(slot)
    for index, name in enumerate(["user:b", "user:a", "user:c", "usex", "apple", "zebra"], 1):
        store.apply(slot, ck(name), f"v-{name}", index, deleted=False)
    return store


def keys_of(items: object) -> list[bytes]:
    return [item[0] for item in items]  # type: ignore[attr-defined]


def test_scan_prefix_is_ordered_and_bounded_to_the_prefix() -> None:
    store = filled()
    found = keys_of(store.scan(7, prefix=ck("user:")))
    assert found == [ck("user:a"), ck("user:b"), ck("user:c")]


def test_scan_range_is_start_inclusive_end_exclusive() -> None:
    store = filled()
    found = keys_of(store.scan(7, start=ck("user:b"), end=ck("zebra")))
    assert found == [ck("user:b"), ck("user:c"), ck("usex")]


def test_scan_paging_with_after_visits_every_key_once() -> None:
    store = filled()
    seen: list[bytes] = []
    after = None
    while True:
        page = []
        for item in store.scan(7, after=after):
            page.append(item)
            if len(page) == 2:
                break
        if not page:
            break
        seen += keys_of(page)
        after = page[-1][0]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 6


def test_scan_prefix_with_after_resumes_inside_the_prefix() -> None:
    store = filled()
    found = keys_of(store.scan(7, prefix=ck("user:"), after=ck("user:a")))
    assert found == [ck("user:b"), ck("user:c")]


def test_int_keys_scan_in_numeric_order() -> None:
    store = SlotStore()
    store.create_slot(1)
    for version, number in enumerate([5, -3, 300, 0, -70000], 1):
        store.apply(1, ck(number), number, version, deleted=False)
    assert [value for _, value, _ in store.scan(1)] == [-70000, -3, 0, 5, 300]


def test_apply_ignores_an_older_version_and_delete_removes() -> None:
    store = filled()
    assert not store.apply(7, ck("apple"), "old", 1, deleted=False)
    assert store.get(7, ck("apple")) == ("v-apple", 5)
    assert store.apply(7, ck("apple"), None, 9, deleted=True)
    assert store.get(7, ck("apple")) is None
    assert store.version_of(7, ck("apple")) == 0


def test_versions_rise_within_an_epoch_and_jump_to_a_new_epoch_base() -> None:
    store = SlotStore()
    store.install_slot(3, [(ck("k"), 1, (2 << EPOCH_SHIFT_BITS) + 10)])
    first = store.next_version(3, 2)
    assert first == (2 << EPOCH_SHIFT_BITS) + 11
    assert store.next_version(3, 2) == first + 1
    assert store.next_version(3, 5) == (5 << EPOCH_SHIFT_BITS) + 1


def test_versions_never_go_back_after_a_delete() -> None:
    store = SlotStore()
    store.create_slot(3)
    version = store.next_version(3, 1)
    store.apply(3, ck("k"), "x", version, deleted=False)
    deleted_at = store.next_version(3, 1)
    store.apply(3, ck("k"), None, deleted_at, deleted=True)
    assert store.next_version(3, 1) > deleted_at


def test_conflicts_reports_keys_whose_version_moved() -> None:
    store = filled()
    reads = [(7, ck("apple"), 5), (7, ck("zebra"), 1), (7, ck("missing"), 0), (7, ck("usex"), 0)]
    assert store.conflicts(reads) == [ck("zebra"), ck("usex")]


def test_install_rejects_bad_items_and_unknown_slot_is_internal() -> None:
    store = SlotStore()
    with pytest.raises(BadRequest):
        store.install_slot(1, [(ck("k"), "v", 0)])
    with pytest.raises(Internal):
        store.get(99, ck("k"))


def test_drop_slot_forgets_data_and_counts() -> None:
    store = filled()
    assert store.key_count() == 6
    store.drop_slot(7)
    assert not store.has_slot(7) and store.key_count() == 0


def test_inserts_deletes_and_updates_keep_the_order() -> None:
    store = filled()
    store.apply(7, ck("user:bb"), "new", 10, deleted=False)
    store.apply(7, ck("apple"), None, 11, deleted=True)
    assert store.apply(7, ck("missing"), None, 12, deleted=True)  # deleting an absent key
    store.apply(7, ck("zebra"), "changed", 13, deleted=False)  # an update, not an insert
    expected = sorted([ck(n) for n in ["user:a", "user:b", "user:bb", "user:c", "usex", "zebra"]])
    assert keys_of(store.scan(7)) == expected
    assert keys_of(store.scan(7, after=ck("user:b"), end=ck("usex"))) == [
        ck("user:bb"),
        ck("user:c"),
    ]
    assert store.get(7, ck("zebra")) == ("changed", 13)
    assert store.key_count(7) == 6 and not store.contains(7, ck("apple"))


def test_a_reseed_with_a_repeated_key_keeps_the_last() -> None:
    store = SlotStore()
    store.install_slot(7, [(ck("b"), 2, 20), (ck("a"), 1, 21), (ck("b"), 3, 22)])
    assert list(store.scan(7)) == [(ck("a"), 1, 21), (ck("b"), 3, 22)]


def _check_scans(store: SlotStore, slot: int, live: set[bytes]) -> None:
    ordered = sorted(live)
    assert keys_of(store.scan(slot)) == ordered
    low, high = ck("k01000"), ck("k02000")
    assert keys_of(store.scan(slot, start=low, end=high)) == [k for k in ordered if low <= k < high]
    assert keys_of(store.scan(slot, after=low)) == [k for k in ordered if k > low]
    assert keys_of(store.scan(slot, prefix=ck("k011"))) == [
        k for k in ordered if k.startswith(ck("k011"))
    ]
    assert store.key_count(slot) == len(live)
    assert all(store.contains(slot, key) for key in live)


def test_a_slot_growing_past_the_small_bound_keeps_every_key_and_the_order() -> None:
    """Past SMALL_SLOT_MAX_KEYS a slot becomes a SortedDict; gets and scans agree with a model
    before and after, through inserts, updates and deletes."""
    rng = random.Random(4)
    store = SlotStore()
    store.create_slot(2)
    live: set[bytes] = set()
    version = 0
    for _ in range(4):
        for _ in range(SMALL_SLOT_MAX_KEYS):
            version += 1
            key = ck(f"k{rng.randrange(3 * SMALL_SLOT_MAX_KEYS):05d}")
            deleted = rng.random() < 0.3
            store.apply(2, key, version, version, deleted=deleted)
            (live.discard if deleted else live.add)(key)
        _check_scans(store, 2, live)
    assert len(live) > SMALL_SLOT_MAX_KEYS and store.big_slots() == 1
    items = list(store.scan(2))
    store.install_slot(3, items)  # a reseed of a big slot is big at once
    assert store.big_slots() == 2 and list(store.scan(3)) == items
    store.install_slot(2, items[:10])  # and of a small one, small
    assert store.big_slots() == 1
    _check_scans(store, 2, {key for key, _, _ in items[:10]})


def test_keys_with_zero_bytes_and_shared_prefixes_sort_and_scan_as_bytes() -> None:
    """A small slot's entries escape 0x00 in keys: keys over {00, 01, ff} up to 3 bytes (each a
    prefix of others) keep bytewise order in scans and bounds, and read back exactly."""
    alphabet = [b"\x00", b"\x01", b"\xff"]
    keys = [b""]
    for length in range(1, 4):
        keys += [b"".join(parts) for parts in itertools.product(alphabet, repeat=length)]
    rng = random.Random(9)
    rng.shuffle(keys)
    store = SlotStore()
    store.install_slot(5, [(key, index, index + 1) for index, key in enumerate(keys[:20])])
    for index, key in enumerate(keys[20:], 21):
        store.apply(5, key, index, index, deleted=False)
    ordered = sorted(keys)
    assert keys_of(store.scan(5)) == ordered
    assert store.big_slots() == 0
    for key in keys:
        assert store.contains(5, key)
        assert store.version_of(5, key) == store.get(5, key)[1]  # type: ignore[index]
        assert keys_of(store.scan(5, after=key)) == [k for k in ordered if k > key]
        assert keys_of(store.scan(5, start=key)) == [k for k in ordered if k >= key]
        assert keys_of(store.scan(5, end=key)) == [k for k in ordered if k < key]
        assert keys_of(store.scan(5, prefix=key)) == [k for k in ordered if k.startswith(key)]
    for key in keys[::2]:
        store.apply(5, key, None, 100, deleted=True)
    assert keys_of(store.scan(5)) == sorted(keys[1::2])
    assert not store.contains(5, keys[0]) and store.get(5, keys[0]) is None
    for absent in (b"\x00" * 4, b"\x00\xff\x00\x00", b"\x02"):  # none of the keys above
        assert store.get(5, absent) is None and not store.contains(5, absent)
