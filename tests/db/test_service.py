"""The db service: fencing, roles, op ids, term and map, bad input, restart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from keyval.db.backend import Backend
from keyval.db.batch import OP_ID_BYTES
from keyval.db.service import Database
from keyval.grants import Grant
from keyval.keys import canonical_key, key_slot
from keyval.messages import (
    DbBatchResult,
    DbLoadMap,
    DbMap,
    DbReadSlot,
    DbRegisterTerm,
    DbSaveMap,
    DbSlotPage,
    DbTerm,
    DbWriteBatch,
    WireOp,
)
from tests.db.conftest import (
    CLIENT,
    COMMANDER,
    DRONE,
    OTHER_COMMANDER,
    OTHER_DRONE,
    grant_key,
    make_grant,
    start_database,
    wire_op,
)
from wire import codec
from wire.channel import PeerInfo
from wire.errors import BadRequest, Fenced, TooLarge, Unauthorized

ALL = ((0, 16383, 1),)


def op(key: Any, value: Any, version: int, op_id: bytes, *, deleted: bool = False) -> WireOp:
    return wire_op(op_id, (key, value, version, deleted))


def op_id(number: int) -> bytes:
    return number.to_bytes(OP_ID_BYTES, "big")


async def write(
    database: Database, grants: list[Grant], ops: list[WireOp], peer: PeerInfo = DRONE
) -> list[tuple[str, Any]]:
    reply = await database.handle(peer, DbWriteBatch.of(grants, ops))
    assert isinstance(reply, DbBatchResult)
    return list(reply.results)


async def read_all(database: Database, grant: Grant, slot: int) -> dict[bytes, tuple[Any, int]]:
    found: dict[bytes, tuple[Any, int]] = {}
    after: bytes | None = None
    while True:
        page = await database.handle(DRONE, DbReadSlot(grant, slot, after, 100))
        assert isinstance(page, DbSlotPage)
        found.update({key: (value, version) for key, value, version in page.items})
        if page.done:
            return found
        after = page.items[-1][0]


async def test_write_then_read_back(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL)
    assert await write(database, [grant], [op("a", {"x": 1}, 5, op_id(1))]) == [("ok", [5])]
    slot = key_slot("a")
    assert await read_all(database, grant, slot) == {canonical_key("a"): ({"x": 1}, 5)}


async def test_forged_grant_is_unauthorized(database: Database) -> None:
    forged = make_grant(b"f" * 32, ALL)
    [result] = await write(database, [forged], [op("a", 1, 1, op_id(1))])
    assert result[0] == "UNAUTHORIZED"
    with pytest.raises(Unauthorized):
        await database.handle(DRONE, DbReadSlot(forged, 0))


async def test_grant_of_another_drone_is_unauthorized(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL, drone="drone-2")
    [result] = await write(database, [grant], [op("a", 1, 1, op_id(1))])
    assert result[0] == "UNAUTHORIZED"
    assert "drone-2" in result[1]


async def test_stale_epoch_and_stale_term_are_fenced(database: Database) -> None:
    key = await grant_key(database)
    slot = key_slot("a")
    newer = make_grant(key, ((slot, slot, 3),), drone="drone-2", term=2)
    assert (await write(database, [newer], [op("a", 1, 1, op_id(1))], OTHER_DRONE))[0][0] == "ok"
    old_epoch = make_grant(key, ((slot, slot, 2),), term=2)
    old_term = make_grant(key, ((slot, slot, 3),), term=1)
    for grant in (old_epoch, old_term):
        [result] = await write(database, [grant], [op("a", 9, 9, op_id(9))])
        assert result[0] == "FENCED"
        with pytest.raises(Fenced):
            await database.handle(DRONE, DbReadSlot(grant, slot))
    page = await database.handle(OTHER_DRONE, DbReadSlot(newer, slot))
    assert isinstance(page, DbSlotPage)
    assert page.items == [(canonical_key("a"), 1, 1)]


async def test_grant_not_covering_the_slot_is_fenced(database: Database) -> None:
    slot = key_slot("a")
    grant = make_grant(await grant_key(database), ((slot + 1, slot + 1, 1),))
    [result] = await write(database, [grant], [op("a", 1, 1, op_id(1))])
    assert result[0] == "FENCED"


async def test_reseed_read_fences_the_old_owner(database: Database) -> None:
    key = await grant_key(database)
    slot = key_slot("a")
    old = make_grant(key, ((slot, slot, 1),))
    assert (await write(database, [old], [op("a", 1, 1, op_id(1))]))[0][0] == "ok"
    new = make_grant(key, ((slot, slot, 2),), drone="drone-2")
    await database.handle(OTHER_DRONE, DbReadSlot(new, slot))
    [late] = await write(database, [old], [op("a", 2, 2, op_id(2))])
    assert late[0] == "FENCED"


async def test_ops_in_one_batch_are_independent(database: Database) -> None:
    key = await grant_key(database)
    good = make_grant(key, ((key_slot("good"), key_slot("good"), 1),))
    ops = [
        op("good", 1, 1, op_id(1)),
        op("other", 1, 1, op_id(2)),  # no grant covers its slot
        [b"short"],  # bad op id
        op("good", 2, 2, op_id(3)),
    ]
    results = await write(database, [good], ops)
    assert [code for code, _ in results] == ["ok", "FENCED", "BAD_REQUEST", "ok"]
    assert await read_all(database, good, key_slot("good")) == {canonical_key("good"): (2, 2)}


async def test_writes_of_one_op_are_all_or_nothing(database: Database) -> None:
    key = await grant_key(database)
    covered = key_slot("in")
    grant = make_grant(key, ((covered, covered, 1),))
    both = wire_op(op_id(1), ("in", 1, 1, False), ("out", 1, 1, False))
    [result] = await write(database, [grant], [both])
    assert result[0] == "FENCED"
    assert await read_all(database, grant, covered) == {}


async def test_retried_op_applies_once(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL)
    first = await write(database, [grant], [op("a", "first", 3, op_id(7))])
    retried = await write(database, [grant], [op("a", "second", 4, op_id(7))])
    assert first == retried == [("ok", [3])]
    assert await read_all(database, grant, key_slot("a")) == {canonical_key("a"): ("first", 3)}
    # Twice in one batch, and concurrently from two submitters: still once.
    both = await write(database, [grant], [op("b", 1, 5, op_id(8)), op("b", 2, 6, op_id(8))])
    assert both == [("ok", [5]), ("ok", [5])]


@pytest.mark.parametrize(
    ("peer", "request_"),
    [
        (CLIENT, DbWriteBatch.of([], [])),
        (COMMANDER, DbWriteBatch.of([], [])),
        (CLIENT, DbLoadMap()),
        (DRONE, DbRegisterTerm("drone-1", 1)),
        (DRONE, DbSaveMap(1, 1, [])),
    ],
)
async def test_roles_are_enforced(database: Database, peer: PeerInfo, request_: Any) -> None:
    with pytest.raises(Unauthorized):
        await database.handle(peer, request_)


async def test_grant_key_goes_only_to_commanders(database: Database) -> None:
    from keyval.messages import DbGrantKey

    for peer in (DRONE, CLIENT):
        with pytest.raises(Unauthorized):
            await database.handle(peer, DbGrantKey())
    assert len(await grant_key(database)) == 32


async def test_term_compare_and_set(database: Database) -> None:
    reply = await database.handle(COMMANDER, DbRegisterTerm("commander-1", 2))
    assert reply == DbTerm(2, "commander-1")
    # The same term by the same commander again: an idempotent retry.
    assert await database.handle(COMMANDER, DbRegisterTerm("commander-1", 2)) == reply
    for term in (2, 1):
        with pytest.raises(Fenced) as refused:
            await database.handle(OTHER_COMMANDER, DbRegisterTerm("commander-2", term))
        assert refused.value.detail == {"term": 2, "commander": "commander-1"}
    assert await database.handle(OTHER_COMMANDER, DbRegisterTerm("commander-2", 3)) == DbTerm(
        3, "commander-2"
    )
    with pytest.raises(Unauthorized):  # only for itself
        await database.handle(COMMANDER, DbRegisterTerm("commander-2", 9))
    with pytest.raises(BadRequest):
        await database.handle(COMMANDER, DbRegisterTerm("commander-1", 0))


async def test_map_save_load_and_refusal_from_a_stale_term(database: Database) -> None:
    ranges = [(0, 8191, "drone-1", 1), (8192, 16383, "drone-2", 1)]
    assert await database.handle(COMMANDER, DbLoadMap()) == DbMap(0, 0, [])
    with pytest.raises(Fenced):  # no term registered yet
        await database.handle(COMMANDER, DbSaveMap(1, 1, ranges))
    await database.handle(COMMANDER, DbRegisterTerm("commander-1", 1))
    await database.handle(COMMANDER, DbSaveMap(1, 1, ranges))
    assert await database.handle(COMMANDER, DbLoadMap()) == DbMap(1, 1, ranges)
    await database.handle(OTHER_COMMANDER, DbRegisterTerm("commander-2", 2))
    with pytest.raises(Fenced) as refused:
        await database.handle(COMMANDER, DbSaveMap(1, 2, ranges))
    assert refused.value.detail["term"] == 2
    assert await database.handle(OTHER_COMMANDER, DbLoadMap()) == DbMap(1, 1, ranges)


async def test_saved_map_fences_grants_of_the_old_term(database: Database) -> None:
    key = await grant_key(database)
    await database.handle(COMMANDER, DbRegisterTerm("commander-1", 5))
    await database.handle(COMMANDER, DbSaveMap(5, 1, [(0, 16383, "drone-2", 1)]))
    [result] = await write(database, [make_grant(key, ALL, term=4)], [op("a", 1, 1, op_id(1))])
    assert result[0] == "FENCED"


@pytest.mark.parametrize(
    "ranges",
    [
        [(5, 4, "drone-1", 1)],
        [(0, 10, "drone-1", 1), (10, 20, "drone-1", 1)],
        [(0, 16384, "drone-1", 1)],
        [(0, 1, "", 1)],
        [(0, 1, "drone-1", -1)],
    ],
)
async def test_bad_maps_are_bad_requests(
    database: Database, ranges: list[tuple[int, int, str, int]]
) -> None:
    await database.handle(COMMANDER, DbRegisterTerm("commander-1", 1))
    with pytest.raises(BadRequest):
        await database.handle(COMMANDER, DbSaveMap(1, 1, ranges))


def write_op(number: int, slot: Any, key: Any, version: Any, value: Any) -> WireOp:
    return [op_id(number), slot, key, version, value]


SLOT_A, KEY_A, VALUE = key_slot("a"), canonical_key("a"), codec.encode(1)


@pytest.mark.parametrize(
    ("bad_op", "code", "names"),
    [
        (write_op(0, SLOT_A + 1, KEY_A, 1, VALUE), "BAD_REQUEST", "op 0 write 0: key"),
        (write_op(0, 0, b"zzz", 1, VALUE), "BAD_REQUEST", "op 0 write 0: key"),
        (write_op(0, SLOT_A, KEY_A, 0, VALUE), "BAD_REQUEST", "op 0 write 0: bad version"),
        (write_op(0, SLOT_A, KEY_A, -1, None), "BAD_REQUEST", "op 0 write 0: bad version"),
        (write_op(0, SLOT_A, KEY_A, 2**63, VALUE), "BAD_REQUEST", "op 0 write 0: bad version"),
        (write_op(0, SLOT_A, KEY_A, "1", VALUE), "BAD_REQUEST", "op 0 write 0: bad version"),
        (write_op(0, SLOT_A, KEY_A, True, VALUE), "BAD_REQUEST", "op 0 write 0: bad version"),
        (write_op(0, SLOT_A, KEY_A, 1, b"x" * (600 * 1024)), "TOO_LARGE", "op 0 write 0: value"),
        (write_op(0, SLOT_A, KEY_A, 1, b""), "BAD_REQUEST", "op 0 write 0: value"),
        (write_op(0, SLOT_A, KEY_A, 1, "text"), "BAD_REQUEST", "op 0 write 0: value"),
        (write_op(0, SLOT_A, KEY_A, 1, 7), "BAD_REQUEST", "op 0 write 0: value"),
        (write_op(0, SLOT_A, KEY_A, 1, b"\x82\x01"), "BAD_REQUEST", "op 0 write 0: value is not"),
        (write_op(0, SLOT_A, KEY_A, 1, VALUE + b"\x01"), "BAD_REQUEST", "op 0 write 0: value is"),
        (write_op(0, SLOT_A, KEY_A, 1, b"\xc1\x00"), "BAD_REQUEST", "op 0 write 0: value is not"),
        (write_op(0, 0, b"b" + b"k" * 2000, 1, VALUE), "TOO_LARGE", "op 0 write 0: key"),
        (write_op(0, SLOT_A, "a", 1, VALUE), "BAD_REQUEST", "op 0 write 0: key must be bytes"),
        (write_op(0, str(SLOT_A), KEY_A, 1, VALUE), "BAD_REQUEST", "op 0 write 0: slot"),
        (write_op(0, None, KEY_A, 1, VALUE), "BAD_REQUEST", "op 0 write 0: slot"),
        (write_op(0, SLOT_A, KEY_A, 1, VALUE)[:-1], "BAD_REQUEST", "op 0: 4 items"),
        ([*write_op(0, SLOT_A, KEY_A, 1, VALUE), SLOT_A], "BAD_REQUEST", "op 0: 6 items"),
        ([], "BAD_REQUEST", "op 0: 0 items"),
        ([b"x" * 15], "BAD_REQUEST", "op 0: op_id"),
        (["x" * 16], "BAD_REQUEST", "op 0: op_id"),
        ({"op_id": op_id(0)}, "BAD_REQUEST", "op 0: expected an array"),
        (op_id(0), "BAD_REQUEST", "op 0: expected an array"),
        ([op_id(0)] + [SLOT_A, KEY_A, 1, VALUE] * 1025, "TOO_LARGE", "op 0: 1025 writes"),
    ],
)
async def test_bad_ops_get_typed_errors_naming_op_and_field(
    database: Database, bad_op: Any, code: str, names: str
) -> None:
    grant = make_grant(await grant_key(database), ALL)
    good = op("b", 1, 1, op_id(5))
    first, second = await write(database, [grant], [bad_op, good])
    assert first[0] == code
    assert first[1].startswith(names), first[1]
    assert second == ("ok", [1])  # a bad op does not fail its neighbours
    assert await read_all(database, grant, SLOT_A) == {}


async def test_bad_op_of_a_batch_is_named_by_its_index(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL)
    ops = [op("b", 1, 1, op_id(1)), op("c", 1, 1, op_id(2)), write_op(3, 0, b"zzz", 1, VALUE)]
    results = await write(database, [grant], ops)
    assert [code for code, _ in results] == ["ok", "ok", "BAD_REQUEST"]
    assert results[2][1].startswith("op 2 write 0: key")


async def test_deletion_is_a_null_value_and_an_op_may_write_nothing(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL)
    await write(database, [grant], [op("a", "v", 1, op_id(1))])
    results = await write(database, [grant], [[op_id(2)], write_op(3, SLOT_A, KEY_A, 2, None)])
    assert results == [("ok", []), ("ok", [2])]
    assert await read_all(database, grant, SLOT_A) == {}


@pytest.mark.parametrize(
    ("ops", "error"),
    [
        (b"", BadRequest),  # not CBOR
        (b"\xff", BadRequest),  # not CBOR either
        (codec.encode({"ops": []}), BadRequest),  # not an array
        (codec.encode(b"ops"), BadRequest),
        (codec.encode([[op_id(0)]] * 4097), TooLarge),
    ],
)
async def test_malformed_batches_are_refused_whole(
    database: Database, ops: bytes, error: type[Exception]
) -> None:
    grant = make_grant(await grant_key(database), ALL)
    with pytest.raises(error, match="ops"):
        await database.handle(DRONE, DbWriteBatch([grant], ops))


async def test_bad_reads_get_typed_errors(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL)
    for request in (
        DbReadSlot(grant, 16384),
        DbReadSlot(grant, 0, None, 0),
        DbReadSlot(grant, 0, None, 10**6),
        DbReadSlot(grant, 0, b"x" * 5000),
    ):
        with pytest.raises(BadRequest):
            await database.handle(DRONE, request)


async def test_oversized_batches_are_refused(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL)
    with pytest.raises(TooLarge):
        await database.handle(DRONE, DbWriteBatch.of([grant] * 17, []))


async def test_decisions(database: Database) -> None:
    assert await database.decide(b"tx", "abort") == "abort"
    assert await database.decide(b"tx", "commit") == "abort"
    with pytest.raises(BadRequest):
        await database.decide(b"tx", "maybe")
    with pytest.raises(BadRequest):
        await database.decide(b"", "commit")


async def test_restart_keeps_everything_acknowledged(make_backend: Callable[[], Backend]) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_database(nursery, make_backend())
        key = await grant_key(first)
        grant = make_grant(key, ALL, term=3)
        await first.handle(COMMANDER, DbRegisterTerm("commander-1", 3))
        await first.handle(COMMANDER, DbSaveMap(3, 1, [(0, 16383, "drone-1", 1)]))
        acknowledged = await write(
            first, [grant], [op(f"k{n}", n, n + 1, op_id(n)) for n in range(50)]
        )
        assert all(code == "ok" for code, _ in acknowledged)
        nursery.cancel_scope.cancel()
    await first.aclose()
    async with trio.open_nursery() as nursery:
        second = await start_database(nursery, make_backend())
        assert await grant_key(second) == key
        assert await second.handle(COMMANDER, DbLoadMap()) == DbMap(
            3, 1, [(0, 16383, "drone-1", 1)]
        )
        for n in range(50):
            found = await read_all(second, grant, key_slot(f"k{n}"))
            assert found[canonical_key(f"k{n}")] == (n, n + 1)
        # Fences and op results survived too.
        stale = make_grant(key, ALL, term=2)
        assert (await write(second, [stale], [op("z", 1, 1, op_id(99))]))[0][0] == "FENCED"
        assert await write(second, [grant], [op("k1", 0, 77, op_id(1))]) == [("ok", [2])]
        nursery.cancel_scope.cancel()
    await second.aclose()


async def test_bad_values_are_found_when_the_batch_joined_is_valid_cbor(
    database: Database,
) -> None:
    """The batch's values are checked in one decoder pass: two bad values that read as one
    item when joined (a truncated array and its missing item) are still each refused."""
    grant = make_grant(await grant_key(database), ALL)
    slot_b, key_b = key_slot("b"), canonical_key("b")
    ops = [
        write_op(1, SLOT_A, KEY_A, 1, b"\x82\x01"),
        write_op(2, slot_b, key_b, 1, b"\x02"),
        op("c", 1, 1, op_id(3)),
    ]
    results = await write(database, [grant], ops)
    assert [code for code, _ in results] == ["BAD_REQUEST", "ok", "ok"]
    assert results[0][1].startswith("op 0 write 0: value is not valid CBOR")
    assert await read_all(database, grant, slot_b) == {key_b: (2, 1)}


async def test_a_remembered_grant_is_still_fenced_by_a_newer_epoch_and_term(
    database: Database,
) -> None:
    """Grants are MAC-checked once (keyval.grants.GrantVerifier); fencing stays per batch."""
    key = await grant_key(database)
    slot = key_slot("a")
    old = make_grant(key, ((slot, slot, 1),))
    assert (await write(database, [old], [op("a", 1, 1, op_id(1))]))[0][0] == "ok"
    newer_epoch = make_grant(key, ((slot, slot, 2),), drone="drone-2")
    assert (await write(database, [newer_epoch], [op("a", 2, 2, op_id(2))], OTHER_DRONE)) == [
        ("ok", [2])
    ]
    [result] = await write(database, [old], [op("a", 3, 3, op_id(3))])
    assert result[0] == "FENCED"
    newer_term = make_grant(key, ((slot, slot, 2),), drone="drone-2", term=2)
    assert (await write(database, [newer_term], [op("a", 4, 4, op_id(4))], OTHER_DRONE)) == [
        ("ok", [4])
    ]
    [result] = await write(database, [newer_epoch], [op("a", 5, 5, op_id(5))], OTHER_DRONE)
    assert result[0] == "FENCED"
    [result] = await write(database, [newer_term], [op("a", 6, 6, op_id(6))])
    assert result[0] == "UNAUTHORIZED"  # a remembered grant is still checked against its drone
