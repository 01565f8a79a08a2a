"""The write path's parts: group commit with one batch in flight, pending waits, op ids."""

from __future__ import annotations

import os

import pytest
import trio

from keyval.drone.batcher import BATCH_MAX_OPS, BATCH_WINDOW_MS, WriteBatcher
from keyval.drone.opcache import OpCache, check_op_id
from keyval.drone.pending import PENDING_WAIT_MS, PendingWrites
from keyval.grants import Grant
from keyval.messages import DbBatchResult, DbWriteBatch, WireOp, Written, pack_op
from wire import codec
from wire.errors import BadRequest, Fenced, Unavailable
from wire.messages import Message

GRANT = Grant(drone="drone-1", term=1, ranges=((0, 16383, 1),), issued_ms=0, mac=b"m")


class SlowDb:
    """Answers each batch after `delay_s`, recording how many were in flight at once."""

    def __init__(self, delay_s: float = 0.01, error: Exception | None = None) -> None:
        self.delay_s = delay_s
        self.error = error
        self.in_flight = 0
        self.most_in_flight = 0
        self.batches: list[list[WireOp]] = []  # the ops of each batch answered
        self.sent_at: list[float] = []  # when each batch reached the db

    async def request(self, msg: Message, *, timeout: float) -> Message:
        assert isinstance(msg, DbWriteBatch)
        self.sent_at.append(trio.current_time())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            ops = codec.decode(msg.ops)
            self.batches.append(ops)
            return DbBatchResult(results=[("ok", op[3::4]) for op in ops])
        finally:
            self.in_flight -= 1


def db_op(version: int) -> WireOp:
    return pack_op(os.urandom(16), [(1, b"sk", version, codec.encode(version))])


async def test_batches_group_ops_keep_order_and_one_in_flight(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    db = SlowDb()
    batcher = WriteBatcher(db, lambda: GRANT)
    await nursery.start(batcher.run)
    applied: list[int] = []
    total = BATCH_MAX_OPS + 100

    async def write(version: int) -> None:
        await batcher.commit(db_op(version), 10, lambda v, e: applied.extend(v or []))

    async with trio.open_nursery() as writers:
        for version in range(1, total + 1):
            writers.start_soon(write, version)
    assert db.most_in_flight == 1
    assert 2 <= len(db.batches) < total  # grouped, and closed by count
    assert all(len(batch) <= BATCH_MAX_OPS for batch in db.batches)
    sent = [op[3] for batch in db.batches for op in batch]
    assert sorted(sent) == list(range(1, total + 1)) and applied == sent


async def test_fenced_batch_is_unavailable_for_the_client(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    batcher = WriteBatcher(SlowDb(error=Fenced("stale grant")), lambda: GRANT)
    await nursery.start(batcher.run)
    outcomes: list[object] = []
    with pytest.raises(Unavailable) as unavailable:
        await batcher.commit(db_op(1), 10, lambda v, e: outcomes.append(e))
    assert unavailable.value.detail["db_code"] == "FENCED"
    assert len(outcomes) == 1


async def test_no_grant_fails_the_batch(nursery: trio.Nursery, autojump_clock: object) -> None:
    batcher = WriteBatcher(SlowDb(), lambda: None)
    await nursery.start(batcher.run)
    with pytest.raises(Unavailable):
        await batcher.commit(db_op(1), 10, lambda v, e: None)


async def test_pending_wait_returns_when_resolved_and_is_bounded(autojump_clock: object) -> None:
    pending = PendingWrites()
    key = (1, b"sk")
    pending.add([key, key])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pending.wait_clear, [key])
        await trio.sleep(0.1)
        pending.resolve([key])
        await trio.sleep(0.1)
        assert pending.is_pending(*key)
        pending.resolve([key])
    assert not pending.is_pending(*key)
    pending.add([key])
    start = trio.current_time()
    with pytest.raises(Unavailable):
        await pending.wait_clear([key])
    assert trio.current_time() - start == pytest.approx(PENDING_WAIT_MS / 1000)
    with pytest.raises(RuntimeError):
        pending.resolve([(2, b"never")])


async def test_op_cache_replays_and_waits_for_an_attempt_in_flight(autojump_clock: object) -> None:
    cache = OpCache(max_entries=2)
    reply = Written(version=5)
    assert await cache.begin(b"a" * 16) is None
    seen: list[object] = []

    async def retry() -> None:
        seen.append(await cache.begin(b"a" * 16))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(retry)
        await trio.sleep(0.1)
        cache.finish(b"a" * 16, reply)
    assert seen == [reply]
    for name in (b"b" * 16, b"c" * 16):
        assert await cache.begin(name) is None
        cache.finish(name, reply)
    assert cache.lookup(b"a" * 16) is None and len(cache) == 2  # oldest went first
    with pytest.raises(BadRequest):
        check_op_id(b"short")
    with pytest.raises(ValueError):
        OpCache(max_entries=0)


async def _rounds(batcher: WriteBatcher, writers: int, rounds: list[int]) -> None:
    """`writers` tasks; task n commits one op per round while n < rounds[round]."""

    async def writer(number: int) -> None:
        for active in rounds:
            if number < active:
                await batcher.commit(db_op(1), 10, lambda v, e: None)

    async with trio.open_nursery() as tasks:
        for number in range(writers):
            tasks.start_soon(writer, number)


async def test_a_batch_goes_once_the_last_batch_writers_are_back(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    db = SlowDb(delay_s=0.01)
    batcher = WriteBatcher(db, lambda: GRANT)
    await nursery.start(batcher.run)
    await _rounds(batcher, 4, [4, 4, 4])
    assert [len(batch) for batch in db.batches] == [4, 4, 4]
    # No window waited: each batch left as soon as the previous one's 4 writers wrote again.
    gaps = [later - earlier for earlier, later in zip(db.sent_at, db.sent_at[1:], strict=False)]
    assert gaps == [pytest.approx(0.01), pytest.approx(0.01)]


async def test_a_batch_short_of_writers_waits_the_window_at_most(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    db = SlowDb(delay_s=0.01)
    batcher = WriteBatcher(db, lambda: GRANT)
    await nursery.start(batcher.run)
    await _rounds(batcher, 4, [4, 3])  # one writer does not come back
    assert [len(batch) for batch in db.batches] == [4, 3]
    assert db.sent_at[1] - db.sent_at[0] == pytest.approx(0.01 + BATCH_WINDOW_MS / 1000)


async def test_submit_queues_without_a_checkpoint_even_when_cancelled() -> None:
    batcher = WriteBatcher(SlowDb(), lambda: GRANT)
    with trio.CancelScope() as scope:
        scope.cancel()
        await batcher.submit(db_op(1), 10, lambda v, e: None)
        queued_while_cancelled = batcher.statistics()["queued"]
    assert queued_while_cancelled == 1
