"""Bulk slot-range reads (db.read_slots): the backend range scan and the fenced service call,
on SQLite always and PostgreSQL when configured."""

from __future__ import annotations

from typing import Any

import pytest

from keyval.db.backend import Backend
from keyval.db.records import SlotRange
from keyval.db.service import MAX_READ_SLOTS_SPAN, MAX_SLOT_PAGE_ITEMS, Database
from keyval.grants import Grant
from keyval.keys import canonical_key, key_slot
from keyval.messages import DbReadSlot, DbReadSlots, DbSlotsPage
from tests.db.conftest import DRONE, OTHER_DRONE, grant_key, make_grant
from tests.db.test_backend_contract import delete, put
from tests.db.test_service import op, op_id, write
from wire import codec
from wire.errors import BadRequest, Fenced, TooLarge, Unauthorized


def keys_in_slots(slots: range, per_slot: int) -> list[str]:
    """`per_slot` keys in each slot of `slots` ({tag} keys hashed until every slot has them)."""
    wanted = {slot: [] for slot in slots}  # type: dict[int, list[str]]
    candidate = 0
    while any(len(found) < per_slot for found in wanted.values()):
        tag = f"t{candidate}"
        candidate += 1
        found = wanted.get(key_slot(tag))
        if found is not None and not found:
            found.extend(f"{{{tag}}}{index}" for index in range(per_slot))
    return [key for found in wanted.values() for key in found]


def fill(backend: Backend, keys: list[str]) -> None:
    ops = [put(key, index, index + 1, index.to_bytes(16, "big")) for index, key in enumerate(keys)]
    backend.commit_batch(ops, [], 1)


Row = tuple[int, bytes, bytes, int]  # (slot, key, CBOR value, version)


def rows(page: SlotRange | DbSlotsPage) -> list[Row]:
    """A page's columns as one row per item."""
    slots = [slot for slot, count in page.runs for _ in range(count)]
    return list(zip(slots, page.keys, page.values, page.versions, strict=True))


def read(backend: Backend, first: int, last: int, limit: int, max_bytes: int) -> list[Row]:
    page = backend.read_slots(first, last, None, limit, max_bytes)
    assert page.done
    return rows(page)


def ordered(keys: list[str]) -> list[tuple[int, bytes]]:
    return sorted((key_slot(key), canonical_key(key)) for key in keys)


# ------------------------------------------------------------------ the backend


def test_range_read_pages_in_slot_and_key_order(backend: Backend) -> None:
    keys = keys_in_slots(range(100, 106), 4)
    fill(backend, keys)
    seen: list[tuple[int, bytes]] = []
    after: tuple[int, bytes] | None = None
    pages = 0
    while True:
        page = backend.read_slots(100, 105, after, 5, 1 << 20)
        seen.extend((slot, key) for slot, key, _value, _version in rows(page))
        pages += 1
        if page.done:
            break
        after = page.last
    assert seen == ordered(keys)
    assert pages == 5  # 24 items, 5 a page


def test_range_read_stays_inside_the_range(backend: Backend) -> None:
    keys = keys_in_slots(range(200, 205), 2)
    fill(backend, keys)
    assert backend.read_slots(201, 203, None, 100, 1 << 20).runs == [(201, 2), (202, 2), (203, 2)]
    found = read(backend, 201, 203, 100, 1 << 20)
    assert [(slot, key) for slot, key, _value, _version in found] == ordered(keys)[2:8]
    assert backend.read_slots(300, 400, None, 100, 1 << 20) == SlotRange([], [], [], [], True)


def test_range_read_skips_deleted_keys_and_keeps_versions(backend: Backend) -> None:
    keys = keys_in_slots(range(10, 12), 3)
    fill(backend, keys)
    backend.commit_batch([delete(keys[1], 50, b"d" * 16)], [], 2)
    found = read(backend, 10, 11, 100, 1 << 20)
    assert [key for _slot, key, _value, _version in found] == [
        key for _slot, key in ordered(keys) if key != canonical_key(keys[1])
    ]
    assert {key: version for _slot, key, _value, version in found}[canonical_key(keys[0])] == 1


def test_range_read_byte_budget_lets_one_item_through(backend: Backend) -> None:
    fill(backend, keys_in_slots(range(7, 9), 2))
    page = backend.read_slots(7, 8, None, 100, 1)
    assert page.runs == [(7, 1)] and len(page.keys) == 1
    assert not page.done


# ------------------------------------------------------------------ the service


async def read_range(
    database: Database, grant: Grant, first: int, last: int, limit: int = 7
) -> list[tuple[int, bytes, Any, int]]:
    found: list[tuple[int, bytes, Any, int]] = []
    after: tuple[int, bytes] | None = None
    while True:
        request = DbReadSlots(
            grant,
            first,
            last,
            None if after is None else after[0],
            None if after is None else after[1],
            limit,
        )
        page = await database.handle(DRONE, request)
        assert isinstance(page, DbSlotsPage)
        found.extend(rows(page))
        if page.next is None:
            return found
        after = page.next


async def test_service_reads_a_range_in_pages(database: Database) -> None:
    grant = make_grant(await grant_key(database), ((0, 16383, 1),))
    keys = keys_in_slots(range(40, 45), 3)
    ops = [op(key, {"i": index}, index + 1, op_id(index)) for index, key in enumerate(keys)]
    assert all(result[0] == "ok" for result in await write(database, [grant], ops))
    found = await read_range(database, grant, 40, 44)
    assert [(slot, key) for slot, key, _value, _version in found] == ordered(keys)
    by_key = {key: (value, version) for _slot, key, value, version in found}
    assert by_key[canonical_key(keys[4])] == (codec.encode({"i": 4}), 5)


async def test_service_range_read_fences_every_slot_for_the_old_owner(
    database: Database,
) -> None:
    key = await grant_key(database)
    old = make_grant(key, ((0, 16383, 1),))
    keys = keys_in_slots(range(60, 63), 1)
    assert (await write(database, [old], [op(keys[0], 1, 1, op_id(1))]))[0][0] == "ok"
    new = make_grant(key, ((60, 62, 2),), drone="drone-2")
    page = await database.handle(OTHER_DRONE, DbReadSlots(new, 60, 62))
    assert isinstance(page, DbSlotsPage)
    assert page.next is None
    for index, late_key in enumerate(keys):  # every slot of the range, also the empty ones
        [late] = await write(database, [old], [op(late_key, 2, 2, op_id(10 + index))])
        assert late[0] == "FENCED"
    # Slots outside the range still accept the old grant.
    [outside] = await write(
        database, [old], [op(keys_in_slots(range(63, 64), 1)[0], 1, 1, op_id(20))]
    )
    assert outside[0] == "ok"


async def test_service_range_read_is_refused_whole_when_one_slot_is_stale(
    database: Database,
) -> None:
    key = await grant_key(database)
    newer = make_grant(key, ((81, 81, 3),), drone="drone-2", term=1)
    await database.handle(OTHER_DRONE, DbReadSlot(newer, 81))
    mixed = make_grant(key, ((80, 82, 2),))
    with pytest.raises(Fenced):
        await database.handle(DRONE, DbReadSlots(mixed, 80, 82))
    # Nothing was raised for slot 80: a grant of epoch 1 there still reads.
    older = make_grant(key, ((80, 80, 1),), drone="drone-2")
    assert isinstance(await database.handle(OTHER_DRONE, DbReadSlots(older, 80, 80)), DbSlotsPage)


async def test_service_range_read_needs_every_slot_covered(database: Database) -> None:
    grant = make_grant(await grant_key(database), ((10, 19, 1), (21, 30, 1)))
    with pytest.raises(Fenced):
        await database.handle(DRONE, DbReadSlots(grant, 15, 25))
    assert isinstance(await database.handle(DRONE, DbReadSlots(grant, 21, 30)), DbSlotsPage)


async def test_service_range_read_checks_the_grant(database: Database) -> None:
    forged = make_grant(b"f" * 32, ((0, 16383, 1),))
    with pytest.raises(Unauthorized):
        await database.handle(DRONE, DbReadSlots(forged, 0, 10))
    theirs = make_grant(await grant_key(database), ((0, 16383, 1),), drone="drone-2")
    with pytest.raises(Unauthorized):
        await database.handle(DRONE, DbReadSlots(theirs, 0, 10))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"first": -1, "last": 3}, BadRequest),
        ({"first": 5, "last": 4}, BadRequest),
        ({"first": 0, "last": 16384}, BadRequest),
        ({"first": 0, "last": MAX_READ_SLOTS_SPAN}, TooLarge),
        ({"after_slot": 3}, BadRequest),
        ({"after_key": b"k"}, BadRequest),
        ({"after_slot": 11, "after_key": b"k"}, BadRequest),
        ({"after_slot": 2, "after_key": b"x" * 5000}, BadRequest),
        ({"limit_items": 0}, BadRequest),
        ({"limit_items": MAX_SLOT_PAGE_ITEMS + 1}, BadRequest),
        ({"limit_bytes": 0}, BadRequest),
    ],
)
async def test_bad_range_reads_get_typed_errors(
    database: Database, fields: dict[str, Any], error: type[Exception]
) -> None:
    grant = make_grant(await grant_key(database), ((0, 16383, 1),))
    arguments: dict[str, Any] = {"first": 0, "last": 10, **fields}
    with pytest.raises(error):
        await database.handle(DRONE, DbReadSlots(grant, **arguments))
