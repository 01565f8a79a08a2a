"""OpCache: replies come back equal to the first (compact or not), eviction is oldest first
at the bound, and an entry stays small (the cache is full in a long-running drone)."""

from __future__ import annotations

import os
import tracemalloc

import trio

from keyval.drone.opcache import OpCache
from keyval.messages import Committed, Written
from wire.messages import Message


async def _remember(cache: OpCache, op_id: bytes, reply: Message) -> None:
    assert await cache.begin(op_id) is None
    cache.finish(op_id, reply)


async def test_replies_come_back_equal_to_the_first() -> None:
    cache = OpCache(max_entries=8)
    replies = {
        b"a" * 16: Written(version=(7 << 40) + 3),
        b"b" * 16: Written(version=0, existed=False),
        b"c" * 16: Written(version=2**64 - 1, existed=True),
        b"d" * 16: Committed(versions=[1, 2**50]),
        b"e" * 16: Committed(versions=[]),
    }
    for op_id, reply in replies.items():
        await _remember(cache, op_id, reply)
    for op_id, reply in replies.items():
        again = await cache.begin(op_id)
        assert again == reply and type(again) is type(reply)
        assert cache.lookup(op_id) == reply
    assert cache.statistics() == {"cached": 5, "inflight": 0}


async def test_the_oldest_reply_goes_first_at_the_bound() -> None:
    cache = OpCache(max_entries=3)
    names = [bytes([index]) * 16 for index in range(5)]
    for version, op_id in enumerate(names, 1):
        await _remember(cache, op_id, Written(version=version))
    assert len(cache) == 3
    assert [cache.lookup(op_id) for op_id in names] == [
        None,
        None,
        Written(version=3),
        Written(version=4),
        Written(version=5),
    ]


async def test_a_failed_attempt_is_forgotten_and_a_retry_claims_the_op() -> None:
    cache = OpCache(max_entries=2)
    assert await cache.begin(b"x" * 16) is None
    cache.finish(b"x" * 16, None)
    assert len(cache) == 0 and cache.statistics()["inflight"] == 0
    assert await cache.begin(b"x" * 16) is None  # claimed again, nothing remembered
    cache.finish(b"x" * 16, Written(version=9))
    assert cache.lookup(b"x" * 16) == Written(version=9)


def test_a_full_cache_costs_under_170_bytes_per_entry() -> None:
    """Written replies with versions past 2**40 (any epoch above 0), 16-byte op ids."""
    entries = 20_000
    cache = OpCache(max_entries=entries)

    async def fill() -> None:
        for index in range(2 * entries):  # full, then as many evictions
            op_id = os.urandom(16)
            assert await cache.begin(op_id) is None
            cache.finish(op_id, Written(version=(3 << 40) + index))

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        trio.run(fill)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == entries
    assert grown / entries < 170
