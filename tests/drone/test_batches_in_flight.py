"""The drone's batcher with more than one batch at the db: overlap only on disjoint keys."""

from __future__ import annotations

import os

import pytest
import trio

from keyval.drone.batcher import WriteBatcher
from keyval.messages import WireOp, pack_op
from tests.drone.test_write_path import GRANT, SlowDb
from wire import codec


def write_to(key: bytes, version: int) -> WireOp:
    return pack_op(os.urandom(16), [(1, key, version, codec.encode(version))])


async def commit_all(batcher: WriteBatcher, ops: list[WireOp], gap_s: float) -> None:
    """Submit `ops` in order, `gap_s` apart, and wait for every one to commit."""
    async with trio.open_nursery() as writers:
        for op in ops:
            writers.start_soon(batcher.commit, op, 10, lambda v, e: None)
            await trio.sleep(gap_s)


async def test_disjoint_batches_overlap_up_to_the_limit(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    db = SlowDb(delay_s=0.05)
    batcher = WriteBatcher(db, lambda: GRANT, max_in_flight=2)
    await nursery.start(batcher.run)
    # One op every 10 ms against a 50 ms db: a new batch is ready long before the last ends.
    await commit_all(batcher, [write_to(b"k%d" % n, 1) for n in range(20)], gap_s=0.01)
    assert db.most_in_flight == 2
    assert sum(len(batch) for batch in db.batches) == 20
    assert batcher.statistics()["in_flight"] == 0


async def test_writes_to_one_key_never_overlap_and_keep_version_order(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    db = SlowDb(delay_s=0.05)
    batcher = WriteBatcher(db, lambda: GRANT, max_in_flight=2)
    await nursery.start(batcher.run)
    ops = [write_to(b"same", version) for version in range(1, 21)]
    await commit_all(batcher, ops, gap_s=0.01)
    assert db.most_in_flight == 1
    sent = [op[3] for batch in db.batches for op in batch]
    assert sent == list(range(1, 21))


async def test_a_batch_sharing_a_key_waits_for_the_one_in_flight(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    db = SlowDb(delay_s=0.05)
    batcher = WriteBatcher(db, lambda: GRANT, max_in_flight=2)
    await nursery.start(batcher.run)
    # a@1 goes alone; b@1 overlaps it; a@2 must wait until a@1's batch is back.
    ops = [write_to(b"a", 1), write_to(b"b", 1), write_to(b"a", 2)]
    await commit_all(batcher, ops, gap_s=0.01)
    order = [(op[2], op[3]) for batch in db.batches for op in batch]
    assert order.index((b"a", 1)) < order.index((b"a", 2))
    assert db.most_in_flight == 2


def test_max_in_flight_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        WriteBatcher(SlowDb(), lambda: GRANT, max_in_flight=0)
