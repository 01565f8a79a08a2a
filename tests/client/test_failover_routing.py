"""Client re-routing around a dead drone: map refresh on unreachable drones (rate-limited),
get_many re-grouping and splitting, against the fake cluster over memory streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from keyval import net
from keyval.client.aio import GET_MANY_KEYS_PER_REQUEST, AsyncClient
from keyval.client.errors import DeadlineExceeded
from keyval.client.router import (
    UNREACHABLE_MAX_PAUSE_S,
    UNREACHABLE_REFRESH_INTERVAL_S,
    RetryDecision,
    is_unreachable,
    merge_decisions,
)
from keyval.keys import NUM_SLOTS, key_slot
from keyval.messages import GetMany
from tests.client.fakes import FakeCluster
from wire.errors import Moved, Timeout, TooLarge, Unavailable, WireError

DETECTION_S = 0.6  # the commander's lease lapse + detection, in virtual time


def address_of(cluster: FakeCluster, name: str) -> str:
    return cluster.drone_named(name).address


def keys_on(cluster: FakeCluster, name: str, count: int) -> list[str]:
    found: list[str] = []
    index = 0
    while len(found) < count:
        key = f"key{index}"
        index += 1
        if cluster.owner[key_slot(key)] == name:
            found.append(key)
    return found


def kill(cluster: FakeCluster, name: str) -> None:
    """The drone is gone: no new connection, and the open one fails its next request."""
    address = address_of(cluster, name)
    cluster.down.add(address)
    cluster.inject(address, Unavailable("connection lost"))


def fail_over(cluster: FakeCluster, dead: str, survivor: str) -> None:
    """The commander hands the dead drone's slots (with their data, as a reseed would) on."""
    for slot in range(NUM_SLOTS):
        if cluster.owner[slot] == dead:
            cluster.move_slot(slot, survivor)


async def fail_over_later(cluster: FakeCluster, dead: str, survivor: str) -> None:
    await trio.sleep(DETECTION_S)
    fail_over(cluster, dead, survivor)


def test_unreachable_is_a_failed_connection_not_a_busy_server() -> None:
    assert is_unreachable(Unavailable("connection refused"))
    assert is_unreachable(Timeout("no answer"))
    assert not is_unreachable(Unavailable("loading", detail={"retry_after_ms": 20}))
    assert not is_unreachable(DeadlineExceeded("our own deadline"))
    assert not is_unreachable(Moved("elsewhere"))


def test_merged_decisions() -> None:
    assert merge_decisions([RetryDecision(), RetryDecision(immediate=True)]).immediate
    merged = merge_decisions(
        [RetryDecision(pause_floor_s=0.2), RetryDecision(pause_cap_s=0.1), RetryDecision()]
    )
    assert (merged.pause_floor_s, merged.pause_cap_s, merged.immediate) == (0.2, 0.1, False)


async def test_a_write_finds_the_new_owner_soon_after_failover(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    [key] = keys_on(cluster, "drone-1", 1)
    await kv.put(key, "before")
    kill(cluster, "drone-1")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_over_later, cluster, "drone-1", "drone-2")
        await kv.put(key, "after")
    elapsed = trio.current_time() - started
    # Found within about one refresh and one short pause after the map changed.
    assert DETECTION_S <= elapsed <= DETECTION_S + UNREACHABLE_REFRESH_INTERVAL_S + 0.25
    assert cluster.drone_named("drone-2").data  # written at the survivor
    assert await kv.get(key) == "after"


async def test_map_refreshes_for_a_dead_drone_are_rate_limited(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    keys = keys_on(cluster, "drone-1", 20)
    await kv.get(keys[0])
    kill(cluster, "drone-1")
    before = cluster.map_requests
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_over_later, cluster, "drone-1", "drone-2")
        for key in keys:  # 20 tasks hammering the dead drone at once
            nursery.start_soon(kv.get, key)
    refreshes = cluster.map_requests - before
    # At most one per interval while the drone was dead (plus the one that saw the change);
    # the commander has two endpoints, a NOT_LEADER hop can double a refresh.
    assert refreshes <= 2 * (DETECTION_S / UNREACHABLE_REFRESH_INTERVAL_S + 2)


async def test_pauses_stay_short_while_the_map_names_the_dead_drone(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    [key] = keys_on(cluster, "drone-1", 1)
    await kv.get(key)
    kill(cluster, "drone-1")
    started = trio.current_time()
    dials_before = cluster.dials
    with pytest.raises(DeadlineExceeded):
        await kv.get(key)  # never failed over: gives up at the deadline
    assert trio.current_time() - started <= kv.router.policy.deadline_s
    # Tries kept coming at short pauses, not backing off to a second each.
    assert cluster.dials - dials_before >= 2.0 / UNREACHABLE_MAX_PAUSE_S


async def test_get_many_regroups_by_the_fresh_map_after_a_dead_drone(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    dead = keys_on(cluster, "drone-1", 30)
    alive = keys_on(cluster, "drone-2", 30)
    for index, key in enumerate(dead + alive):
        await kv.put(key, index)
    kill(cluster, "drone-1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_over_later, cluster, "drone-1", "drone-2")
        got = await kv.get_many(dead + alive)
    assert got == {key: index for index, key in enumerate(dead + alive)}


async def test_get_many_splits_requests_at_the_drone_limit(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    keys = keys_on(cluster, "drone-1", 2 * GET_MANY_KEYS_PER_REQUEST + 5)
    await kv.put(keys[0], "x")
    got = await kv.get_many(keys)
    assert got == {keys[0]: "x"}
    drone = cluster.drone_named("drone-1")
    sizes = sorted(len(m.keys) for m in drone.requests if isinstance(m, GetMany))
    assert sizes == [5, GET_MANY_KEYS_PER_REQUEST, GET_MANY_KEYS_PER_REQUEST]


async def test_get_many_halves_a_request_whose_values_are_too_large(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    keys = keys_on(cluster, "drone-1", 8)
    for key in keys:
        await kv.put(key, key)
    cluster.inject(address_of(cluster, "drone-1"), TooLarge("values too large"))
    assert await kv.get_many(keys) == {key: key for key in keys}
    drone = cluster.drone_named("drone-1")
    # The first request (all 8) was refused before the drone recorded it.
    assert [len(m.keys) for m in drone.requests if isinstance(m, GetMany)] == [4, 4]


async def test_get_many_of_one_too_large_value_raises(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    [key] = keys_on(cluster, "drone-1", 1)
    cluster.inject(address_of(cluster, "drone-1"), TooLarge("value too large"))
    with pytest.raises(TooLarge):
        await kv.get_many([key])


async def test_get_many_waits_for_a_slot_without_owner(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    [key] = keys_on(cluster, "drone-1", 1)
    await kv.put(key, 1)
    slot = key_slot(key)
    cluster.owner[slot] = None
    cluster.map_version += 1
    await kv.router.refresh(kv.router.start(), seen=kv.router.refreshes)

    async def assign_later() -> None:
        await trio.sleep(0.3)
        cluster.owner[slot] = "drone-1"
        cluster.map_version += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(assign_later)
        assert await kv.get_many([key]) == {key: 1}


async def test_a_connection_whose_channel_failed_is_redialled(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    [key] = keys_on(cluster, "drone-1", 1)
    await kv.put(key, 1)
    address = address_of(cluster, "drone-1")
    link = await kv.router.pool.get(address, "drone-1", timeout=1)
    assert isinstance(link, net.Connection)
    # A truncated, unauthenticated frame puts the channel in its error state, as a drone
    # killed mid-frame does, before the connection's reader has noticed.
    channel = link._link.channel
    channel.receive_data(b"\x00\x00\x00\x08garbage!")
    with pytest.raises(WireError):
        channel.next_event()
    assert not channel.can_send and not link.is_closed
    dials = cluster.dials
    assert await kv.get(key) == 1
    assert cluster.dials == dials + 1
