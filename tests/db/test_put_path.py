"""The db's durable put path: per-batch shortcuts must keep every per-op guarantee."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from keyval.db.backend import Backend
from keyval.grants import Grant
from keyval.keys import canonical_key, key_slot
from tests.db.conftest import DRONE, OTHER_DRONE, grant_key, make_grant, start_database
from tests.db.test_service import op, op_id, write
from wire.channel import PeerInfo


async def test_a_fence_raised_inside_one_group_commit_stops_the_older_grant(
    make_backend: Callable[[], Backend], autojump_clock: trio.testing.MockClock
) -> None:
    """Three batches land in one group commit: old grant, newer epoch, old grant again.

    The fence check is done once per (grant, slot) per group; the third batch must still be
    checked again because the second raised the slot's fence."""
    backend = make_backend()
    slot = key_slot("a")
    results: dict[int, list[tuple[str, Any]]] = {}
    async with trio.open_nursery() as nursery:
        # A 50 ms group window (on the autojump clock) puts all three batches in one commit.
        database = await start_database(nursery, backend, batch_max_delay_ms=50)
        key = await grant_key(database)
        old = make_grant(key, ((slot, slot, 1),))
        new = make_grant(key, ((slot, slot, 2),))

        async def send(index: int, grant: Grant, version: int) -> None:
            results[index] = await write(database, [grant], [op("a", index, version, op_id(index))])

        async with trio.open_nursery() as senders:
            for index, grant in enumerate((old, new, old)):
                senders.start_soon(send, index, grant, index + 1)
                await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    await database.aclose()
    assert database.statistics().batches == 1
    assert results[0] == [("ok", [1])]
    assert results[1] == [("ok", [2])]
    assert results[2][0][0] == "FENCED"
    reopened = make_backend()
    reopened.open()
    try:
        items, _done = reopened.read_slot(slot, None, 10, 1 << 20)
    finally:
        reopened.close()
    assert [(item.key, item.version) for item in items] == [(canonical_key("a"), 2)]


async def test_one_drones_fenced_batch_does_not_fail_another_drones_batch_in_the_same_commit(
    make_backend: Callable[[], Backend], autojump_clock: trio.testing.MockClock
) -> None:
    """Batches of several drones share one transaction; a fenced op is refused alone."""
    backend = make_backend()
    slot_a, slot_b = key_slot("a"), key_slot("b")
    results: dict[str, list[tuple[str, Any]]] = {}
    async with trio.open_nursery() as nursery:
        database = await start_database(nursery, backend, batch_max_delay_ms=50)
        key = await grant_key(database)
        # drone-2 took slot a over (epoch 2): drone-1's grant for it is stale.
        taken = make_grant(key, ((slot_a, slot_a, 2),), drone="drone-2")
        await write(database, [taken], [op("a", 1, 1, op_id(1))], OTHER_DRONE)
        stale = make_grant(key, tuple(sorted([(slot_a, slot_a, 1), (slot_b, slot_b, 1)])))
        current = make_grant(key, ((slot_a, slot_a, 2),), drone="drone-2")
        batches_before = database.statistics().batches

        async def send(name: str, grant: Grant, ops: list[Any], peer: PeerInfo) -> None:
            results[name] = await write(database, [grant], ops, peer)

        async with trio.open_nursery() as senders:
            senders.start_soon(
                send, "drone-1", stale, [op("a", 9, 9, op_id(2)), op("b", 3, 3, op_id(3))], DRONE
            )
            await trio.testing.wait_all_tasks_blocked()
            senders.start_soon(send, "drone-2", current, [op("a", 2, 2, op_id(4))], OTHER_DRONE)
        nursery.cancel_scope.cancel()
    await database.aclose()
    assert database.statistics().batches == batches_before + 1  # one transaction for both
    assert [code for code, _ in results["drone-1"]] == ["FENCED", "ok"]
    assert results["drone-2"] == [("ok", [2])]
    reopened = make_backend()
    reopened.open()
    try:
        stored = {
            slot: [
                (item.key, item.version) for item in reopened.read_slot(slot, None, 10, 1 << 20)[0]
            ]
            for slot in (slot_a, slot_b)
        }
    finally:
        reopened.close()
    assert stored == {slot_a: [(canonical_key("a"), 2)], slot_b: [(canonical_key("b"), 3)]}
