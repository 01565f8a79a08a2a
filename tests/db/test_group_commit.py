"""Group commit: many concurrent submissions go to storage in few transactions."""

from __future__ import annotations

from collections.abc import Callable

import trio

from keyval.db.backend import Backend
from keyval.db.committer import GroupCommitter
from keyval.messages import DbWriteBatch
from tests.db.conftest import DRONE, grant_key, make_grant, start_database, wire_op

SUBMITTERS = 200


async def test_concurrent_submissions_share_transactions(
    make_backend: Callable[[], Backend],
) -> None:
    async with trio.open_nursery() as nursery:
        database = await start_database(nursery, make_backend(), batch_max_ops=64)
        grant = make_grant(await grant_key(database), ((0, 16383, 1),))
        results: list[object] = []

        async def submit(number: int) -> None:
            key = f"key-{number}"
            op = wire_op(number.to_bytes(16, "big"), (key, number, 1, False))
            results.append(await database.handle(DRONE, DbWriteBatch.of([grant], [op])))

        async with trio.open_nursery() as submitters:
            for number in range(SUBMITTERS):
                submitters.start_soon(submit, number)
        statistics = database.statistics()
        nursery.cancel_scope.cancel()
    await database.aclose()
    assert len(results) == SUBMITTERS
    assert all(result.results == [("ok", [1])] for result in results)  # type: ignore[attr-defined]
    assert statistics.items == SUBMITTERS
    # Closed by count: never more than 64 ops, so at least 4 transactions; and far fewer
    # transactions than submissions.
    assert statistics.largest_batch_items <= 64
    assert SUBMITTERS // 64 <= statistics.batches <= SUBMITTERS // 10


async def test_batches_close_by_time(autojump_clock: trio.testing.MockClock) -> None:
    batches: list[list[str]] = []

    async def commit(items: list[str]) -> list[str]:
        batches.append(items)
        return [item.upper() for item in items]

    committer: GroupCommitter[str, str] = GroupCommitter(
        commit, max_items=100, max_delay_ms=10, max_pending=10
    )
    answers: dict[str, list[str]] = {}

    async def submit_at(delay_s: float, item: str) -> None:
        await trio.sleep(delay_s)
        answers[item] = await committer.submit([item])

    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        async with trio.open_nursery() as submitters:
            submitters.start_soon(submit_at, 0.0, "a")
            submitters.start_soon(submit_at, 0.005, "b")  # within 10 ms of the first: joins
            submitters.start_soon(submit_at, 0.050, "c")  # later: a batch of its own
        nursery.cancel_scope.cancel()
    assert batches == [["a", "b"], ["c"]]
    assert answers == {"a": ["A"], "b": ["B"], "c": ["C"]}
    assert committer.statistics().batch_sizes == {2: 1, 1: 1}


async def test_batches_close_by_count(autojump_clock: trio.testing.MockClock) -> None:
    batches: list[list[int]] = []

    async def commit(items: list[int]) -> list[int]:
        batches.append(items)
        return items

    committer: GroupCommitter[int, int] = GroupCommitter(
        commit, max_items=3, max_delay_ms=50, max_pending=100
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        async with trio.open_nursery() as submitters:
            for number in range(7):
                submitters.start_soon(committer.submit, [number])
        nursery.cancel_scope.cancel()
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert sorted(item for batch in batches for item in batch) == list(range(7))


async def test_a_failing_commit_fails_its_submitters_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def commit(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("bug")
        return items

    committer: GroupCommitter[int, int] = GroupCommitter(
        commit, max_items=1, max_delay_ms=0, max_pending=10
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        from wire.errors import Internal

        try:
            await committer.submit([13])
            raise AssertionError("expected Internal")
        except Internal:
            pass
        assert await committer.submit([1]) == [1]
        nursery.cancel_scope.cancel()
