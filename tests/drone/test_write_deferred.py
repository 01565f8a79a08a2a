"""Durable writes answered without a task (DroneHandler.handle_deferred, keyval.net's deferred
path): the reader admits the op, its batch's completion answers it.

Over memory streams with the real db on SQLite (tests/drone/harness.py). A `GatedDb` holds
the drone's batches at the door of the real db link so a test can act while they are in
flight.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from keyval.drone.handlers import DroneHandler
from keyval.drone.links import Link
from keyval.keys import canonical_key, key_slot
from keyval.messages import CompareAndSet, Delete, Get, Put, ValueReply, Written
from keyval.net import DEFERRED, Deferred, Respond
from tests.drone.harness import DB_ADDRESS, DRONE_ADDRESS, Cluster, serving_cluster
from wire.channel import PeerInfo
from wire.errors import Unavailable, WireError
from wire.messages import Message

SLOT_A = key_slot("{a}")


class CountingHandler(DroneHandler):
    """The drone's handler, counting how requests were answered."""

    def __init__(self, handler: DroneHandler) -> None:
        super().__init__(handler.state)
        self.deferred = 0
        self.tasks = 0

    def handle_deferred(
        self, peer: PeerInfo, msg: Message, respond: Respond
    ) -> Message | Deferred | None:
        outcome = super().handle_deferred(peer, msg, respond)
        self.deferred += outcome is DEFERRED
        return outcome

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        self.tasks += 1
        return await super().__call__(peer, msg)


class GatedDb:
    """The drone's db link, holding each batch until `open` is set."""

    def __init__(self, link: object) -> None:
        self.link = link
        self.open = trio.Event()
        self.arrived = trio.Event()

    async def request(self, msg: Message, *, timeout: float) -> Message:
        self.arrived.set()
        await self.open.wait()
        return await self.link.request(msg, timeout=timeout)  # type: ignore[attr-defined]


@pytest.fixture
async def cluster(mock_clock: MockClock, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with serving_cluster(mock_clock, tmp_path, SLOT_A) as cluster:
        name, handler = cluster.net.servers[DRONE_ADDRESS]
        assert isinstance(handler, DroneHandler)
        cluster.net.add(DRONE_ADDRESS, name, CountingHandler(handler))
        yield cluster


def counting(cluster: Cluster) -> CountingHandler:
    handler = cluster.net.servers[DRONE_ADDRESS][1]
    assert isinstance(handler, CountingHandler)
    return handler


def gate(cluster: Cluster) -> GatedDb:
    gated = GatedDb(cluster.drone.db)
    cluster.drone.state.batcher.set_link(gated)
    return gated


def put(key: str, value: object, op_id: bytes | None = None) -> Put:
    return Put(key=key, value=value, op_id=op_id or os.urandom(16))


async def test_puts_deletes_and_cas_are_answered_without_a_task(cluster: Cluster) -> None:
    link = await cluster.client()
    first = await link.request(put("{a}k", 1), timeout=5)
    assert isinstance(first, Written) and not first.existed
    again = await link.request(put("{a}k", 2), timeout=5)
    assert isinstance(again, Written) and again.existed and again.version > first.version
    swapped = await link.request(
        CompareAndSet(key="{a}k", value=3, expected_version=again.version, op_id=os.urandom(16)),
        timeout=5,
    )
    assert isinstance(swapped, Written) and swapped.existed
    gone = await link.request(Delete(key="{a}k", op_id=os.urandom(16)), timeout=5)
    assert isinstance(gone, Written) and gone.existed
    assert await link.request(Get(key="{a}k"), timeout=5) == ValueReply(found=False)
    assert (counting(cluster).deferred, counting(cluster).tasks) == (4, 0)
    assert canonical_key("{a}k") not in await cluster.db_rows(SLOT_A)
    await link.aclose()


async def test_a_failed_batch_answers_its_deferred_puts_unavailable(cluster: Cluster) -> None:
    cluster.net.down.add(DB_ADDRESS)  # the db becomes unreachable: the batch fails
    await cluster.drone.db.aclose()
    link = await cluster.client()
    failures: list[WireError] = []

    async def one(index: int) -> None:
        try:
            await link.request(put(f"{{a}}f{index}", index), timeout=5)
        except Unavailable as error:
            failures.append(error)

    with trio.fail_after(10):  # no hang
        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(one, index)
    assert len(failures) == 8 and counting(cluster).deferred == 8
    assert len(cluster.drone.state.pending) == 0 and cluster.drone.state.ops.statistics() == {
        "cached": 0,
        "inflight": 0,
    }
    assert await link.request(Get(key="{a}f0"), timeout=5) == ValueReply(found=False)
    await link.aclose()


async def test_a_connection_closed_while_its_puts_are_in_a_batch(cluster: Cluster) -> None:
    gated = gate(cluster)
    link = await cluster.client()
    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(_request_ignoring_the_close, link, put(f"{{a}}c{index}", index))
        await gated.arrived.wait()
        await link.aclose()  # the server's connection ends; its 8 puts are in the batch
    await trio.sleep(0.2)
    gated.open.set()
    with trio.fail_after(5):
        while len(cluster.drone.state.pending):
            await trio.sleep(0.01)
    rows = await cluster.db_rows(SLOT_A)
    assert {rows[canonical_key(f"{{a}}c{index}")][0] for index in range(8)} == set(range(8))
    other = await cluster.client()  # the drone serves on
    got = await other.request(Get(key="{a}c3"), timeout=5)
    assert isinstance(got, ValueReply) and got.value == 3
    await other.aclose()


async def _request_ignoring_the_close(link: Link, msg: Message) -> None:
    try:
        await link.request(msg, timeout=5)
    except Unavailable:
        pass


async def test_a_retry_while_the_first_attempt_is_in_a_batch_gets_its_reply(
    cluster: Cluster,
) -> None:
    gated = gate(cluster)
    op_id = os.urandom(16)
    first_link, retry_link = await cluster.client(), await cluster.client()
    replies: list[Message] = []

    async def send(link: Link) -> None:
        replies.append(await link.request(put("{a}r", "v", op_id), timeout=5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, first_link)
        await gated.arrived.wait()
        nursery.start_soon(send, retry_link)  # the op id is in flight: it waits on a task
        await trio.sleep(0.1)
        gated.open.set()
    assert len(replies) == 2 and replies[0] == replies[1]
    assert cluster.drone.state.batcher.ops_sent == 1
    assert (counting(cluster).deferred, counting(cluster).tasks) == (1, 1)
    # A later retry is answered from the op-id cache, inline, writing nothing.
    assert await first_link.request(put("{a}r", "v", op_id), timeout=5) == replies[0]
    assert cluster.drone.state.batcher.ops_sent == 1
    await first_link.aclose()
    await retry_link.aclose()


async def test_a_cancelled_request_still_commits_and_the_connection_serves_on(
    cluster: Cluster,
) -> None:
    gated = gate(cluster)
    link = await cluster.client()
    with trio.move_on_after(0.5) as scope:  # the client gives up while the put is in a batch
        await link.request(put("{a}x", "late"), timeout=5)
    assert scope.cancelled_caught
    gated.open.set()
    written = await link.request(put("{a}y", "next"), timeout=5)
    assert isinstance(written, Written)
    got = await link.request(Get(key="{a}x"), timeout=5)
    assert isinstance(got, ValueReply) and got.value == "late"
    assert len(cluster.drone.state.pending) == 0
    await link.aclose()
