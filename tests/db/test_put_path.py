"""The db's durable put path: per-batch shortcuts must keep every per-op guarantee."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from keyval.db.backend import Backend
from keyval.grants import Grant
from keyval.keys import canonical_key, key_slot
from tests.db.conftest import grant_key, make_grant, start_database
from tests.db.test_service import op, op_id, write


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
