"""Auto-batching (keyval.client.autobatch): concurrent gets of one client share GetMany
requests, and every caller still gets exactly its own value or its own error."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from keyval.client import autobatch
from keyval.client.aio import AsyncClient, aconnect
from keyval.drone import reads
from keyval.keys import canonical_key, key_slot
from keyval.messages import Get, GetMany
from tests.client.conftest import settings_for
from tests.client.fakes import FakeCluster, FakeDrone, MemoryDialer
from wire.errors import Unauthorized, Unavailable
from wire.messages import Message

# Real seconds a test with held requests may take: a get that is never answered (a lost
# wake-up) fails the test instead of hanging the run.
TEST_TIMEOUT_S = 10


def drone_of(cluster: FakeCluster, key: str) -> FakeDrone:
    owner = cluster.owner[key_slot(key)]
    assert owner is not None
    return cluster.drone_named(owner)


def keys_on(cluster: FakeCluster, drone: FakeDrone, count: int, *, prefix: str = "k") -> list[str]:
    keys: list[str] = []
    index = 0
    while len(keys) < count:
        key = f"{prefix}{index}"
        if drone_of(cluster, key) is drone:
            keys.append(key)
        index += 1
    return keys


def drones(cluster: FakeCluster) -> tuple[FakeDrone, FakeDrone]:
    first, second = cluster.drones.values()
    return first, second


def reads_sent(drone: FakeDrone) -> list[Message]:
    return [msg for msg in drone.requests if isinstance(msg, Get | GetMany)]


def keys_read(drone: FakeDrone) -> list[Any]:
    keys: list[Any] = []
    for msg in drone.requests:
        if isinstance(msg, GetMany):
            keys.extend(msg.keys)
        elif isinstance(msg, Get):
            keys.append(msg.key)
    return keys


async def gather(calls: dict[str, Callable[[], Awaitable[Any]]]) -> dict[str, Any]:
    """Run every call concurrently; each name's result, or the exception it raised."""
    results: dict[str, Any] = {}

    async def run(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[name] = await call()
        except Exception as error:
            results[name] = error

    async with trio.open_nursery() as nursery:
        for name, call in calls.items():
            nursery.start_soon(run, name, call)
    return results


def getter(kv: AsyncClient, key: str) -> Callable[[], Awaitable[Any]]:
    return lambda: kv.get(key)


@pytest.fixture
async def plain_kv(cluster: FakeCluster, nursery: trio.Nursery) -> AsyncIterator[AsyncClient]:
    dialer = MemoryDialer(cluster, nursery)
    settings = settings_for(cluster)
    async with aconnect(settings, dialer=dialer, rng=random.Random(7), autobatch=False) as kv:
        yield kv


async def filled(kv: AsyncClient, cluster: FakeCluster, count: int) -> tuple[FakeDrone, list[str]]:
    """The first drone and `count` keys it owns, each holding "value of KEY"."""
    one, _ = drones(cluster)
    keys = keys_on(cluster, one, count)
    for key in keys:
        await kv.put(key, f"value of {key}")
    return one, keys


async def test_concurrent_gets_share_get_many_requests(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, keys = await filled(kv, cluster, 30)
    _, two = drones(cluster)
    more = keys_on(cluster, two, 30)
    for key in more:
        await kv.put(key, f"value of {key}")
    keys += more
    one.requests.clear()
    two.requests.clear()
    results = await gather({key: getter(kv, key) for key in keys})
    assert results == {key: f"value of {key}" for key in keys}
    for drone in (one, two):
        sent = reads_sent(drone)
        assert any(isinstance(msg, GetMany) for msg in sent)
        assert len(sent) <= 3  # at most: a lone first get, a batch, one gathered meanwhile
        assert sorted(keys_read(drone)) == sorted(k for k in keys if drone_of(cluster, k) is drone)
    stats = kv.statistics()
    assert stats["keys_sent"] > stats["batches_sent"] > 0
    assert stats["gets_in_flight"] == 0 and stats["queued"] == 0
    assert stats["drones"] == 0  # idle queues are dropped


async def test_a_lone_get_is_sent_as_a_plain_get(kv: AsyncClient, cluster: FakeCluster) -> None:
    one, _ = drones(cluster)
    [key] = keys_on(cluster, one, 1)
    await kv.put(key, 1)
    one.requests.clear()
    assert await kv.get(key) == 1
    assert await kv.get(key) == 1
    assert one.requests == [Get(key=key), Get(key=key)]
    assert kv.statistics()["batches_sent"] == 0


async def test_autobatch_off_sends_one_get_per_call(
    plain_kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, keys = await filled(plain_kv, cluster, 20)
    one.requests.clear()
    results = await gather({key: getter(plain_kv, key) for key in keys})
    assert results == {key: f"value of {key}" for key in keys}
    assert sorted(one.requests, key=repr) == sorted((Get(key=k) for k in keys), key=repr)
    assert not plain_kv.autobatch and "batches_sent" not in plain_kv.statistics()


async def test_a_refused_key_fails_only_its_own_get(kv: AsyncClient, cluster: FakeCluster) -> None:
    one, keys = await filled(kv, cluster, 20)
    refused = keys[7]
    cluster.refused[canonical_key(refused)] = Unauthorized("not yours", detail={"key": refused})
    results = await gather({key: getter(kv, key) for key in keys})
    error = results.pop(refused)
    assert isinstance(error, Unauthorized) and error.detail == {"key": refused}
    assert results == {key: f"value of {key}" for key in keys if key != refused}
    assert any(isinstance(msg, GetMany) for msg in one.requests)  # it was tried batched


async def test_a_moved_key_is_retried_alone_and_the_others_answered(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    _, keys = await filled(kv, cluster, 20)
    _, two = drones(cluster)
    moved = keys[3]
    cluster.move_slot(key_slot(moved), two.name)
    maps_before = cluster.map_requests
    results = await gather({key: getter(kv, key) for key in keys})
    assert results == {key: f"value of {key}" for key in keys}
    table = kv.router.table
    assert table is not None
    route = table.route(key_slot(moved))
    assert route is not None and route.drone == two.name  # patched from the batch's MOVED
    assert cluster.map_requests == maps_before  # the redirect named the owner: no refresh
    assert moved in keys_read(two)


async def test_a_failed_batch_is_retried_per_key_with_backoff(
    kv: AsyncClient, cluster: FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    one, keys = await filled(kv, cluster, 12)
    cluster.inject(one.address, Unavailable("loading", detail={"retry_after_ms": 50}), count=2)
    results = await gather({key: getter(kv, key) for key in keys})
    assert results == {key: f"value of {key}" for key in keys}


class HeldGets:
    """Gets started on `kv`, each in its own cancel scope; results by key."""

    def __init__(self, kv: AsyncClient, nursery: trio.Nursery) -> None:
        self._kv, self._nursery = kv, nursery
        self.results: dict[str, Any] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.keys_of: dict[trio.lowlevel.Task, str] = {}

    async def start(self, *keys: str) -> None:
        """Start a get of each key, then wait until every task is blocked."""
        for key in keys:
            self._nursery.start_soon(self._get, key)
        await trio.testing.wait_all_tasks_blocked()

    async def _get(self, key: str) -> None:
        self.keys_of[trio.lowlevel.current_task()] = key
        with trio.CancelScope() as self.scopes[key]:
            self.results[key] = await self._kv.get(key)


@contextlib.asynccontextmanager
async def held_gets(
    kv: AsyncClient, cluster: FakeCluster, *, hold_first_drone: bool = True
) -> AsyncIterator[HeldGets]:
    """Requests to the first drone wait (with `hold_first_drone`) until the block ends. A get
    to the second drone is held in flight throughout, so that every get of the block is
    batched (the first get of an idle client goes alone)."""
    one, two = drones(cluster)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            gates = [cluster.gates.setdefault(two.address, trio.Event())]
            if hold_first_drone:
                gates.append(cluster.gates.setdefault(one.address, trio.Event()))
            [busy] = keys_on(cluster, two, 1, prefix="held")
            await HeldGets(kv, nursery).start(busy)
            yield HeldGets(kv, nursery)
            await trio.testing.wait_all_tasks_blocked()
            for gate in gates:
                gate.set()
    cluster.gates.clear()


async def test_a_cancelled_get_leaves_its_batch_intact(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    _, keys = await filled(kv, cluster, 10)
    async with held_gets(kv, cluster) as gets:
        await gets.start(*keys)  # one batch in flight, held at the drone
        gets.scopes[keys[4]].cancel()  # a get parked in the batch in flight
    assert gets.results == {key: f"value of {key}" for key in keys if key != keys[4]}
    assert kv.statistics()["queued"] == 0


async def test_a_cancelled_sender_passes_its_batch_on(
    kv: AsyncClient, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, keys = await filled(kv, cluster, 10)
    senders: list[trio.lowlevel.Task] = []
    send = kv.router.send

    async def recording_send(*args: Any) -> Message:
        senders.append(trio.lowlevel.current_task())
        return await send(*args)

    async with held_gets(kv, cluster) as gets:
        monkeypatch.setattr(kv.router, "send", recording_send)
        await gets.start(*keys)
        [sender] = senders  # one batch of all ten in flight, held at the drone
        gets.scopes[gets.keys_of[sender]].cancel()  # abandoned: the other nine must go again
    assert len(gets.results) == 9
    assert gets.results == {key: f"value of {key}" for key in gets.results}
    assert sorted(len(msg.keys) for msg in one.requests if isinstance(msg, GetMany)) == [9, 10]
    assert kv.statistics()["queued"] == 0


async def test_a_cancelled_queued_get_is_dropped_before_sending(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, keys = await filled(kv, cluster, 6)
    async with held_gets(kv, cluster) as gets:
        await gets.start(keys[0])  # the sender, its batch held at the drone
        await gets.start(*keys[1:])  # queued behind the batch in flight
        gets.scopes[keys[1]].cancel()
        await trio.testing.wait_all_tasks_blocked()
        one.requests.clear()
    assert gets.results == {key: f"value of {key}" for key in keys if key != keys[1]}
    assert keys[1] not in keys_read(one)


async def test_batches_stay_within_their_key_count_and_key_bytes(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, _ = drones(cluster)
    keys = keys_on(cluster, one, 2 * autobatch.MAX_BATCH_KEYS + 50)
    long_keys = keys_on(cluster, one, 150, prefix="x" * 1000)
    for batch in (keys, long_keys):
        one.requests.clear()
        async with held_gets(kv, cluster, hold_first_drone=False) as gets:
            await gets.start(*batch)
        assert gets.results == dict.fromkeys(batch)  # absent keys: None
        sizes = [len(msg.keys) for msg in one.requests if isinstance(msg, GetMany)]
        assert sum(sizes) + sum(isinstance(msg, Get) for msg in one.requests) == len(batch)
        by_bytes = autobatch.MAX_BATCH_KEY_BYTES // len(canonical_key(batch[-1]))
        assert max(sizes) == min(autobatch.MAX_BATCH_KEYS, by_bytes)


def test_batch_bounds_are_within_the_drones() -> None:
    assert autobatch.MAX_BATCH_KEYS <= reads.MAX_GET_MANY_KEYS
    with pytest.raises(ValueError):
        autobatch.GetBatcher(None, max_batch_keys=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        autobatch.GetBatcher(None, max_batch_keys=autobatch.MAX_BATCH_KEYS + 1)  # type: ignore[arg-type]
