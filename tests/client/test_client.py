"""The trio client against the fake cluster: routing, redirects, retries, deadline, scans."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from keyval.client.aio import AsyncClient
from keyval.client.checks import CBOR_BYTES_HEAD_MAX, admit_value
from keyval.client.errors import DeadlineExceeded
from keyval.keys import DEFAULT_MAX_VALUE_BYTES, canonical_key, key_slot
from keyval.messages import Put
from tests.client.fakes import FakeCluster
from wire import codec
from wire.errors import Ask, BadRequest, Conflict, Moved, TooLarge, Unavailable


def drone_of(cluster: FakeCluster, key: str) -> str:
    owner = cluster.owner[key_slot(key)]
    assert owner is not None
    return cluster.drone_named(owner).address


def keys_on_each_drone(cluster: FakeCluster) -> tuple[str, str]:
    """Two keys, one on drone-1 and one on drone-2."""
    by_drone: dict[str, str] = {}
    for index in range(100):
        by_drone.setdefault(drone_of(cluster, f"k{index}"), f"k{index}")
    first, second = sorted(by_drone)
    return by_drone[first], by_drone[second]


async def test_put_get_delete_round_trip(kv: AsyncClient) -> None:
    version = await kv.put("a", {"n": 1})
    assert version > 0
    assert await kv.get("a") == {"n": 1}
    assert (await kv.get_entry("a")) == ({"n": 1}, version)
    assert await kv.delete("a") is True
    assert await kv.get("a", "gone") == "gone"
    assert (await kv.get_entry("a")) == (None, 0)
    assert await kv.delete("a") is False


async def test_requests_go_to_the_owner_of_the_slot(kv: AsyncClient, cluster: FakeCluster) -> None:
    one, two = keys_on_each_drone(cluster)
    await kv.put(one, 1)
    await kv.put(two, 2)
    assert canonical_key(one) in cluster.drones[drone_of(cluster, one)].data
    assert canonical_key(two) in cluster.drones[drone_of(cluster, two)].data
    assert cluster.map_requests <= 2  # one map fetch (plus one NOT_LEADER hop at most)


async def test_concurrent_requests_share_one_connection_per_drone(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    async with trio.open_nursery() as nursery:
        for index in range(40):
            nursery.start_soon(kv.put, f"key{index}", index)
    # one dial per commander asked plus one per drone, however many requests ran at once
    assert cluster.dials <= len(cluster.commanders) + len(cluster.drones)
    assert await kv.get_many([f"key{i}" for i in range(40)]) == {f"key{i}": i for i in range(40)}


async def test_not_leader_is_followed_to_the_leader(cluster: FakeCluster, kv: AsyncClient) -> None:
    cluster.leader = cluster.commanders[1]
    cluster.map_version += 1
    await kv.router.refresh(kv.router.start(), seen=kv.router.refreshes)
    table = kv.router.table
    assert table is not None and table.version == cluster.map_version


async def test_moved_is_followed_and_the_map_patched(kv: AsyncClient, cluster: FakeCluster) -> None:
    one, two = keys_on_each_drone(cluster)
    await kv.put(one, "before")
    new_owner = cluster.drones[drone_of(cluster, two)].name
    cluster.move_slot(key_slot(one), new_owner)
    maps_before = cluster.map_requests
    assert await kv.get(one) == "before"  # MOVED from the old owner, then the new one answers
    assert cluster.map_requests == maps_before  # the redirect named the owner: no refresh
    table = kv.router.table
    assert table is not None
    route = table.route(key_slot(one))
    assert route is not None and route.drone == new_owner


async def test_moved_without_an_owner_refreshes_the_map(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, two = keys_on_each_drone(cluster)
    await kv.put(one, "x")
    slot = key_slot(one)
    new_owner = cluster.drones[drone_of(cluster, two)].name
    cluster.move_slot(slot, new_owner)
    old = cluster.drones[drone_of(cluster, two)]
    # The old owner knows the slot left but not where: MOVED with an empty owner.
    first = next(a for a in cluster.drones if cluster.drones[a] is not old)
    cluster.inject(
        first, Moved("gone", detail={"slot": slot, "epoch": 0, "owner": "", "address": ""})
    )
    maps_before = cluster.map_requests
    assert await kv.get(one) == "x"
    assert cluster.map_requests > maps_before


async def test_ask_retries_one_request_elsewhere_without_changing_the_map(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, two = keys_on_each_drone(cluster)
    home, other = drone_of(cluster, one), drone_of(cluster, two)
    other_name = cluster.drones[other].name
    cluster.owner[key_slot(one)] = other_name  # the target accepts the key (slot importing)
    await kv.get("warm-up")
    table_before = kv.router.table
    cluster.inject(home, Ask("importing", detail={"address": other, "owner": other_name}))
    await kv.put(one, "asked")
    assert canonical_key(one) in cluster.drones[other].data
    assert kv.router.table is table_before
    route = table_before.route(key_slot(one)) if table_before else None
    assert route is not None and route.address == home  # ASK does not patch the map


async def test_unavailable_is_retried_with_backoff(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    await kv.put("r", 0)
    address = drone_of(cluster, "r")
    cluster.inject(address, Unavailable("loading", detail={"retry_after_ms": 200}), count=3)
    start = trio.current_time()
    await kv.put("r", 1)
    elapsed = trio.current_time() - start
    assert elapsed >= 3 * 0.2  # each pause at least the server's retry_after
    assert await kv.get("r") == 1


async def test_deadline_bounds_retries(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    address = drone_of(cluster, "d")
    cluster.inject(address, Unavailable("loading", detail={"retry_after_ms": 50}), count=10_000)
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded) as caught:
        await kv.get("d")
    elapsed = trio.current_time() - start
    assert elapsed <= kv.router.policy.deadline_s
    assert caught.value.detail["attempts"] > 3


async def test_a_first_try_at_the_cached_owner_counts_as_an_attempt(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    """With the map cached, the first try skips the retry loop; when it fails, the loop
    retries it like any other and counts it: the attempt limit holds."""
    await kv.get("warm-up")
    assert kv.router.table is not None
    address = drone_of(cluster, "f")
    kv.router.policy = dataclasses.replace(kv.router.policy, max_attempts=3)
    cluster.inject(address, Unavailable("loading", detail={"retry_after_ms": 1}), count=10)
    with pytest.raises(DeadlineExceeded) as caught:
        await kv.get("f")
    assert caught.value.detail["attempts"] == 3
    assert len(cluster.injected[address]) == 10 - 3  # three tries reached the drone
    cluster.injected[address].clear()
    await kv.put("f", 5)  # no error left to inject: the owner answers at the first try


async def test_unreachable_drone_gives_up_at_the_deadline(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    await kv.get("warm-up")
    cluster.down.add(drone_of(cluster, "z"))
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded):
        await kv.put("z", 1)
    assert trio.current_time() - start <= kv.router.policy.deadline_s


async def test_a_retried_write_reuses_its_op_id_and_applies_once(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    address = drone_of(cluster, "once")
    await kv.get("once")
    cluster.lose_reply(address)
    counter_before = cluster.version_counter
    version = await kv.put("once", "v")
    puts = [m for m in cluster.drones[address].requests if isinstance(m, Put)]
    assert len(puts) == 2 and puts[0].op_id == puts[1].op_id and len(puts[0].op_id) == 16
    assert cluster.version_counter == counter_before + 1  # applied once
    assert version == cluster.version_counter


async def test_cas(kv: AsyncClient) -> None:
    first = await kv.cas("c", 0, "new")
    second = await kv.cas("c", first, "newer")
    assert await kv.get("c") == "newer"
    with pytest.raises(Conflict):
        await kv.cas("c", first, "stale")
    await kv.cas("c", second, None, delete=True)
    assert await kv.get("c") is None


async def test_get_many_spans_drones_and_omits_absent_keys(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, two = keys_on_each_drone(cluster)
    await kv.put(one, 1)
    await kv.put(two, 2)
    assert await kv.get_many([one, two, "absent", one]) == {one: 1, two: 2}
    entries = await kv.get_many_entries([one, "absent"])
    assert entries["absent"] == (None, 0)


async def test_get_many_follows_moved(kv: AsyncClient, cluster: FakeCluster) -> None:
    one, two = keys_on_each_drone(cluster)
    await kv.put(one, 1)
    await kv.put(two, 2)
    cluster.move_slot(key_slot(one), cluster.drones[drone_of(cluster, two)].name)
    assert await kv.get_many([one, two]) == {one: 1, two: 2}


@pytest.mark.parametrize("key", [True, 1.5, None, ["k"], "x" * 2000])
async def test_bad_keys_are_refused_before_sending(kv: AsyncClient, key: object) -> None:
    with pytest.raises((BadRequest, TooLarge)):
        await kv.put(key, 1)  # type: ignore[arg-type]
    with pytest.raises((BadRequest, TooLarge)):
        await kv.get(key)  # type: ignore[arg-type]


def test_the_value_limit_counts_the_cbor_head_of_bytes() -> None:
    limit = DEFAULT_MAX_VALUE_BYTES
    head = len(codec.encode(b"x" * limit)) - limit  # 5 bytes at this length
    admit_value(b"x" * (limit - CBOR_BYTES_HEAD_MAX))  # the largest admitted without encoding
    admit_value(b"x" * (limit - head))  # encodes to exactly the limit
    with pytest.raises(TooLarge):
        admit_value(b"x" * (limit - head + 1))
    with pytest.raises(TooLarge):
        admit_value([b"x" * limit])  # not bytes: the encoded size decides


async def test_bad_values_and_options_are_refused(kv: AsyncClient) -> None:
    with pytest.raises(BadRequest):
        await kv.put("k", {1.5, 2.5})
    with pytest.raises(TooLarge):
        await kv.put("k", b"x" * (600 * 1024))
    with pytest.raises(BadRequest):
        await kv.put("k", 1, ack="eventually")
    with pytest.raises(BadRequest):
        await kv.cas("k", -1, 1)
    with pytest.raises(BadRequest):
        await kv.cas("k", True, 1)


async def test_memory_ack_is_sent_when_asked(kv: AsyncClient, cluster: FakeCluster) -> None:
    await kv.put("m", 1, ack="memory")
    puts = [m for d in cluster.drones.values() for m in d.requests if isinstance(m, Put)]
    assert puts[-1].ack == "memory"
    await kv.put("m", 2)
    puts = [m for d in cluster.drones.values() for m in d.requests if isinstance(m, Put)]
    assert puts[-1].ack == "durable"
