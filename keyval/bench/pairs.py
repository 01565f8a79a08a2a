"""Key pairs of the two-key transaction workloads.

`txn-local` pairs share a hash tag (one slot, one drone). `txn-cross` pairs live on two
different drones: the keyval load generator reads the slot map and picks, for pair i, a key
owned by drone i mod D and one owned by the next drone, so every transaction is a cross-drone
two-phase commit. Every load-generator process derives the same pairs from the same map.
On Redis (one server) a `txn-cross` pair is simply two untagged keys.
"""

from __future__ import annotations

from collections.abc import Callable

from keyval.bench.errors import LoadGeneratorError
from keyval.client.aio import AsyncClient
from keyval.keys import key_slot

PairOf = Callable[[int], tuple[str, str]]

# Candidate keys tried per wanted key before giving up: with D drones owning about 1/D of the
# slots each, D tries per key suffice on average; this much slack covers a skewed map.
CANDIDATES_PER_KEY = 64


def local_pair(index: int) -> tuple[str, str]:
    """Two keys with one hash tag: the same slot, so one drone commits them in one step."""
    return f"{{t{index}}}:a", f"{{t{index}}}:b"


def cross_key(candidate: int) -> str:
    return f"x:{candidate:012d}"


def plain_cross_pair(index: int) -> tuple[str, str]:
    return cross_key(2 * index), cross_key(2 * index + 1)


def cross_pairs_from_owners(
    owner_of: Callable[[str], str | None], count: int
) -> list[tuple[str, str]]:
    """`count` pairs whose two keys have different owners (owner_of(key) is a drone name)."""
    by_owner: dict[str, list[str]] = {}
    limit = count * CANDIDATES_PER_KEY
    for candidate in range(limit):
        key = cross_key(candidate)
        owner = owner_of(key)
        if owner is None:
            raise LoadGeneratorError(f"the slot of {key} has no owner: is the cluster serving?")
        by_owner.setdefault(owner, []).append(key)
        if len(by_owner) >= 2 and all(len(keys) >= count for keys in by_owner.values()):
            break
    drones = sorted(by_owner)
    if len(drones) < 2:
        raise LoadGeneratorError("txn-cross needs at least 2 drones owning slots")
    if not all(len(by_owner[drone]) >= count for drone in drones):
        raise LoadGeneratorError(f"no {count} keys per drone within {limit} candidates")
    pairs = []
    for index in range(count):
        first = drones[index % len(drones)]
        second = drones[(index + 1) % len(drones)]
        pairs.append((by_owner[first][index], by_owner[second][index]))
    return pairs


async def keyval_cross_pairs(client: AsyncClient, count: int) -> PairOf:
    table = await client.router.current_table(client.router.start())

    def owner_of(key: str) -> str | None:
        route = table.route(key_slot(key))
        return None if route is None else route.drone

    pairs = cross_pairs_from_owners(owner_of, count)
    return pairs.__getitem__
