"""What each workload does: its key names, what it preloads, and one operation.

Key names are the same for keyval and Redis, and match redis-benchmark's `key:__rand_int__`
(`key:` + 12 digits = 16 bytes), so all three touch the same key space.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol

from keyval.bench.pairs import PairOf, local_pair

# A `mixed` run is 90 % reads, 10 % writes (the "mixed 90/10").
MIXED_READ_FRACTION = 0.9
# `scan` reads one group of keys sharing a hash tag (so one slot, one drone) per operation.
SCAN_GROUP_KEYS = 10

TXN_WORKLOADS = ("txn-local", "txn-cross")
PRELOADED = ("get", "mixed", "txn-local", "txn-cross", "scan")


class Session(Protocol):
    """One connection's worth of operations; keyval and Redis each implement it."""

    async def get(self, key: str) -> None: ...

    async def put(self, key: str, value: bytes | int) -> None: ...

    async def increment_pair(self, first: str, second: str) -> None:
        """Read both keys, write first + 1 and second - 1, atomically (a transaction)."""
        ...

    async def scan(self, prefix: str, limit: int) -> int: ...


def data_key(index: int) -> str:
    return f"key:{index:012d}"


def scan_prefix(group: int) -> str:
    return f"{{s{group}}}:"


def scan_groups(keys: int) -> int:
    return max(1, keys // SCAN_GROUP_KEYS)


def preload_items(
    workload: str, first: int, stop: int, value: bytes, pair_of: PairOf = local_pair
) -> Iterator[tuple[str, bytes | int]]:
    """The (key, value) pairs key indexes [first, stop) of this workload start with;
    the transaction workloads' pairs come from `pair_of` (keyval.bench.pairs)."""
    for index in range(first, stop):
        if workload in TXN_WORKLOADS:
            for key in pair_of(index):
                yield key, 0
        elif workload == "scan":
            group, member = divmod(index, SCAN_GROUP_KEYS)
            yield f"{scan_prefix(group)}{member:02d}", value
        else:
            yield data_key(index), value


async def one_operation(
    workload: str,
    session: Session,
    rng: random.Random,
    keys: int,
    value: bytes,
    pair_of: PairOf = local_pair,
) -> None:
    if workload == "get":
        await session.get(data_key(rng.randrange(keys)))
    elif workload in ("put", "put-memory"):
        await session.put(data_key(rng.randrange(keys)), value)
    elif workload == "mixed":
        key = data_key(rng.randrange(keys))
        if rng.random() < MIXED_READ_FRACTION:
            await session.get(key)
        else:
            await session.put(key, value)
    elif workload in TXN_WORKLOADS:
        await session.increment_pair(*pair_of(rng.randrange(keys)))
    elif workload == "scan":
        await session.scan(scan_prefix(rng.randrange(scan_groups(keys))), SCAN_GROUP_KEYS)
    else:
        raise ValueError(f"unknown workload {workload!r}")
