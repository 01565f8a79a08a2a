"""SlotStore: ordered per-slot storage, scans, versions, OCC validation."""

from __future__ import annotations

import pytest

from keyval.keys import canonical_key as ck
from keyval.store import EPOCH_SHIFT_BITS, SlotStore
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
