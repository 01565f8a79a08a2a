"""The drone's request handling, end to end over keyval.net (memory streams) with a db.

Each test starts a drone with a fake commander that grants it the slots of the `{a}` and `{b}`
hash tags, and the real db service on SQLite (tests/drone/harness.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from keyval.drone import reads
from keyval.drone.handlers import DroneHandler
from keyval.drone.slots import SlotStatus
from keyval.drone.state import Limits
from keyval.keys import Key, canonical_key, key_slot
from keyval.messages import (
    ACK_MEMORY,
    Committed,
    CompareAndSet,
    DbBatchResult,
    DbReadSlot,
    DbWriteBatch,
    Delete,
    Get,
    GetMany,
    Put,
    Scan,
    ScanPage,
    TxnCommit,
    ValueReply,
    ValuesReply,
    Written,
    pack_op,
)
from tests.drone.harness import AUTOJUMP_S, DB_ADDRESS, Cluster
from wire import codec
from wire.channel import PeerInfo
from wire.errors import BadRequest, Conflict, Moved, TooLarge, Unauthorized, Unavailable
from wire.messages import Message

SLOT_A = key_slot("{a}")
SLOT_B = key_slot("{b}")
SLOT_C = key_slot("{c}")  # granted only where a test says so


def op() -> bytes:
    return os.urandom(16)


@pytest.fixture
async def cluster(mock_clock: MockClock, tmp_path: Path) -> AsyncIterator[Cluster]:
    mock_clock.autojump_threshold = AUTOJUMP_S
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, Limits(max_key_bytes=64, max_value_bytes=1000))
        await cluster.start()
        await cluster.grant_and_wait((SLOT_A, SLOT_A, 1), (SLOT_B, SLOT_B, 1))
        yield cluster
        nursery.cancel_scope.cancel()
    await cluster.db.aclose()


async def call(cluster: Cluster, msg: Message, principal: str = "client") -> Message:
    link = await cluster.client(principal)
    try:
        return await link.request(msg, timeout=5)
    finally:
        await link.aclose()


async def test_put_get_delete_round_trip(cluster: Cluster) -> None:
    written = await call(cluster, Put(key="{a}k", value={"n": [1, 2]}, op_id=op()))
    assert isinstance(written, Written) and written.version > 0 and not written.existed
    got = await call(cluster, Get(key="{a}k"))
    assert got == ValueReply(found=True, value={"n": [1, 2]}, version=written.version)
    assert (await cluster.db_rows(SLOT_A))[canonical_key("{a}k")] == ({"n": [1, 2]}, got.version)
    deleted = await call(cluster, Delete(key="{a}k", op_id=op()))
    assert isinstance(deleted, Written) and deleted.version > written.version and deleted.existed
    assert await call(cluster, Get(key="{a}k")) == ValueReply(found=False)
    again = await call(cluster, Delete(key="{a}k", op_id=op()))
    assert again == Written(version=0, existed=False)


async def test_get_many_across_held_slots(cluster: Cluster) -> None:
    await call(cluster, Put(key="{a}1", value=1, op_id=op()))
    await call(cluster, Put(key=b"{b}2", value=2, op_id=op()))
    reply = await call(cluster, GetMany(keys=["{a}1", b"{b}2", "{a}none"]))
    assert isinstance(reply, ValuesReply)
    assert [(found, value) for found, value, _ in reply.items] == [
        (True, 1),
        (True, 2),
        (False, None),
    ]


async def test_get_many_is_answered_inline_unless_a_slot_is_loading(cluster: Cluster) -> None:
    await call(cluster, Put(key="{a}1", value=1, op_id=op()))
    handler = DroneHandler(cluster.drone.state)
    peer = PeerInfo(name="client", role="client")
    served = cluster.drone.state.requests_served
    reply = handler.handle_nowait(peer, GetMany(keys=["{a}1", "{b}none", "{a}1"]))
    assert isinstance(reply, ValuesReply)
    version = reply.items[0][2]
    assert version > 0
    assert reply.items == [(True, 1, version), (False, None, 0), (True, 1, version)]
    assert cluster.drone.state.requests_served == served + 1
    with pytest.raises(Moved):  # a key of a slot the drone does not hold fails the request
        handler.handle_nowait(peer, GetMany(keys=["{a}1", "{c}x"]))
    with pytest.raises(TooLarge):
        handler.handle_nowait(peer, GetMany(keys=["{a}1", "x" * 100]))  # over max_key_bytes
    table = cluster.drone.state.table
    table._held[SLOT_B].status = SlotStatus.LOADING  # as while a reseed of {b} runs
    assert handler.handle_nowait(peer, GetMany(keys=["{a}1", "{b}none"])) is None
    assert handler.handle_nowait(peer, GetMany(keys=["{a}1"])) is not None
    async with trio.open_nursery() as nursery:  # the awaited path answers once it loads
        replies: list[Message] = []

        async def ask() -> None:
            replies.append(await call(cluster, GetMany(keys=["{a}1", "{b}none"])))

        nursery.start_soon(ask)
        await trio.sleep(0.05)
        assert replies == []
        assert table.mark_loaded(SLOT_B, table._held[SLOT_B].epoch)
        cluster.drone.state.notify_loaded()
    assert replies == [ValuesReply(items=[(True, 1, version), (False, None, 0)])]


async def test_get_many_refuses_a_key_outside_the_principals_prefixes(cluster: Cluster) -> None:
    peer = PeerInfo(name="limited", role="client", permissions=("{a}",))
    handler = DroneHandler(cluster.drone.state)
    assert isinstance(handler.handle_nowait(peer, GetMany(keys=["{a}1", "{a}2"])), ValuesReply)
    with pytest.raises(Unauthorized):
        handler.handle_nowait(peer, GetMany(keys=["{a}1", "{b}2"]))
    with pytest.raises(Unauthorized):
        handler.handle_nowait(peer, GetMany(keys=["{a}1", 7]))


async def test_scan_prefix_and_paging_within_a_slot(cluster: Cluster) -> None:
    for index in range(7):
        await call(cluster, Put(key=f"{{a}}user:{index}", value=index, op_id=op()))
    await call(cluster, Put(key="{a}other", value="x", op_id=op()))
    seen: list[object] = []
    after = None
    while True:
        page = await call(cluster, Scan(slot=SLOT_A, prefix="{a}user:", after=after, limit=3))
        assert isinstance(page, ScanPage) and len(page.items) <= 3
        seen += [key for key, _, _ in page.items]
        after = page.after
        if after is None:
            break
    assert seen == [f"{{a}}user:{index}" for index in range(7)]


async def test_scan_range_and_whole_drone_scan(cluster: Cluster) -> None:
    for key in ("{a}1", "{a}2", "{a}3", "{b}1"):
        await call(cluster, Put(key=key, value=key, op_id=op()))
    ranged = await call(cluster, Scan(slot=SLOT_A, start="{a}2", end="{a}3"))
    assert isinstance(ranged, ScanPage) and [k for k, _, _ in ranged.items] == ["{a}2"]
    keys: list[object] = []
    after = None
    while True:
        page = await call(cluster, Scan(after=after, limit=2))
        assert isinstance(page, ScanPage)
        keys += [k for k, _, _ in page.items]
        if page.after is None:
            break
        after = page.after
    assert sorted(map(str, keys)) == ["{a}1", "{a}2", "{a}3", "{b}1"]


async def test_cas_succeeds_on_expected_version_and_conflicts_otherwise(cluster: Cluster) -> None:
    created = await call(
        cluster, CompareAndSet(key="{a}c", expected_version=0, value=1, op_id=op())
    )
    assert isinstance(created, Written)
    with pytest.raises(Conflict) as conflict:
        await call(cluster, CompareAndSet(key="{a}c", expected_version=0, value=2, op_id=op()))
    assert conflict.value.detail["version"] == created.version
    updated = await call(
        cluster, CompareAndSet(key="{a}c", expected_version=created.version, value=3, op_id=op())
    )
    assert isinstance(updated, Written) and updated.version > created.version
    removed = await call(
        cluster,
        CompareAndSet(
            key="{a}c", expected_version=updated.version, value=None, op_id=op(), delete=True
        ),
    )
    assert isinstance(removed, Written)
    assert await call(cluster, Get(key="{a}c")) == ValueReply(found=False)


async def test_txn_commit_applies_all_writes_atomically(cluster: Cluster) -> None:
    first = await call(cluster, Put(key="{a}x", value=1, op_id=op()))
    assert isinstance(first, Written)
    committed = await call(
        cluster,
        TxnCommit(
            reads=[("{a}x", first.version), ("{a}absent", 0)],
            writes=[("{a}x", "put", 2), ("{a}y", "put", 3), ("{a}absent", "del", None)],
            op_id=op(),
        ),
    )
    assert isinstance(committed, Committed) and len(committed.versions) == 3
    many = await call(cluster, GetMany(keys=["{a}x", "{a}y"]))
    assert isinstance(many, ValuesReply)
    assert [value for _, value, _ in many.items] == [2, 3]
    with pytest.raises(Conflict) as conflict:
        await call(
            cluster,
            TxnCommit(reads=[("{a}x", first.version)], writes=[("{a}y", "put", 9)], op_id=op()),
        )
    assert conflict.value.detail["keys"] == ["{a}x"]
    assert await call(cluster, Get(key="{a}y")) == ValueReply(
        found=True, value=3, version=committed.versions[1]
    )


async def test_write_skew_is_prevented(cluster: Cluster) -> None:
    """Two doctors on call: each reads both, each takes himself off. Only one may commit."""
    one = await call(cluster, Put(key="{a}alice", value=True, op_id=op()))
    two = await call(cluster, Put(key="{a}bob", value=True, op_id=op()))
    assert isinstance(one, Written) and isinstance(two, Written)
    reads: list[tuple[Key, int]] = [("{a}alice", one.version), ("{a}bob", two.version)]
    outcomes: list[str] = []

    async def off_call(name: str) -> None:
        try:
            await call(cluster, TxnCommit(reads=reads, writes=[(name, "put", False)], op_id=op()))
            outcomes.append("committed")
        except Conflict:
            outcomes.append("conflict")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(off_call, "{a}alice")
        nursery.start_soon(off_call, "{a}bob")
    assert sorted(outcomes) == ["committed", "conflict"]
    many = await call(cluster, GetMany(keys=["{a}alice", "{a}bob"]))
    assert isinstance(many, ValuesReply)
    assert any(value for _, value, _ in many.items)


async def test_slot_not_held_is_moved_with_known_owner(cluster: Cluster) -> None:
    cluster.commander.others = [(SLOT_C, SLOT_C, "drone-2", 7)]
    cluster.commander.map_version += 1
    await trio.sleep(0.3)  # a heartbeat sees the new map version and fetches the map
    with pytest.raises(Moved) as moved:
        await call(cluster, Get(key="{c}k"))
    assert moved.value.detail == {
        "slot": SLOT_C,
        "epoch": 7,
        "owner": "drone-2",
        "address": "drone2.test:1",
    }


async def test_limits_and_bad_requests(cluster: Cluster) -> None:
    with pytest.raises(TooLarge):
        await call(cluster, Put(key="{a}" + "k" * 100, value=1, op_id=op()))
    with pytest.raises(TooLarge):
        await call(cluster, Put(key="{a}k", value="v" * 2000, op_id=op()))
    with pytest.raises(BadRequest):
        await call(cluster, Put(key="{a}k", value=1, op_id=b"short"))
    with pytest.raises(BadRequest):
        await call(cluster, Put(key="{a}k", value=1, op_id=op(), ack="eventually"))
    with pytest.raises(BadRequest):
        await call(cluster, Scan(slot=SLOT_A, prefix=5))
    with pytest.raises(BadRequest):
        await call(cluster, Scan(slot=SLOT_A, limit=0))
    with pytest.raises(BadRequest):
        await call(cluster, TxnCommit(reads=[], writes=[("{a}k", "upsert", 1)], op_id=op()))
    with pytest.raises(BadRequest):
        await call(
            cluster,
            TxnCommit(reads=[], writes=[("{a}k", "put", 1), ("{a}k", "del", None)], op_id=op()),
        )


def unchecked_get(key: object) -> Get:
    """A kv.get whose key skipped the message layer's check (as a buggy peer would send)."""
    msg = Get(key="placeholder")
    object.__setattr__(msg, "key", key)
    return msg


async def test_wrong_key_type_is_bad_request(cluster: Cluster) -> None:
    # On the wire the message layer refuses it: the drone answers BAD_REQUEST.
    with pytest.raises(BadRequest):
        await call(cluster, unchecked_get(1.5))
    # And the drone's own admission (keyval.keys) refuses a bool should one get through.
    handler = cluster.net.servers["drone.test:1"][1]
    with pytest.raises(BadRequest):
        await handler(PeerInfo("client", "client"), unchecked_get(True))


async def test_roles_and_key_prefixes(cluster: Cluster) -> None:
    with pytest.raises(Unauthorized):
        await call(cluster, Get(key="{a}k"), principal="other-drone")
    assert isinstance(await call(cluster, Get(key="{a}k"), principal="admin"), ValueReply)
    handler = cluster.net.servers["drone.test:1"][1]
    limited = PeerInfo("app", "client", permissions=("{a}app:",))
    assert isinstance(await handler(limited, Put(key="{a}app:1", value=1, op_id=op())), Written)
    with pytest.raises(Unauthorized):
        await handler(limited, Put(key="{a}other", value=1, op_id=op()))
    with pytest.raises(Unauthorized):
        await handler(limited, Put(key=12, value=1, op_id=op()))


async def test_lease_lapse_stops_serving_until_renewed(cluster: Cluster) -> None:
    await call(cluster, Put(key="{a}k", value=1, op_id=op()))
    cluster.commander.silent = True
    await trio.sleep(1.0)  # longer than the 600 ms lease
    with pytest.raises(Unavailable) as unavailable:
        await call(cluster, Get(key="{a}k"))
    assert unavailable.value.detail["retry_after_ms"] > 0
    with pytest.raises(Unavailable):
        await call(cluster, Put(key="{a}k", value=2, op_id=op()))
    with pytest.raises(Unavailable):  # a whole-drone scan must not look complete and empty
        await call(cluster, Scan(after=SLOT_A.to_bytes(2, "big") + canonical_key("{a}k")))
    cluster.commander.silent = False
    await trio.sleep(0.3)
    assert isinstance(await call(cluster, Get(key="{a}k")), ValueReply)


async def test_memory_ack_answers_before_the_db_and_flushes_behind(cluster: Cluster) -> None:
    written = await call(cluster, Put(key="{a}m", value="fast", op_id=op(), ack=ACK_MEMORY))
    assert isinstance(written, Written)
    got = await call(cluster, Get(key="{a}m"))
    assert isinstance(got, ValueReply) and got.value == "fast"
    await trio.sleep(0.1)  # the batch goes out behind the reply
    assert (await cluster.db_rows(SLOT_A))[canonical_key("{a}m")] == ("fast", written.version)


async def test_op_id_retry_applies_once(cluster: Cluster) -> None:
    op_id = op()
    first = await call(cluster, Put(key="{a}r", value=1, op_id=op_id))
    batcher = cluster.drone.state.batcher
    sent = batcher.ops_sent
    again = await call(cluster, Put(key="{a}r", value=1, op_id=op_id))
    assert again == first and batcher.ops_sent == sent
    # A retry the drone has forgotten reaches the db, which answers with the first result.
    cluster.drone.state.ops = type(cluster.drone.state.ops)()
    third = await call(cluster, Put(key="{a}r", value=1, op_id=op_id))
    assert isinstance(third, Written) and isinstance(first, Written)
    assert third.version == first.version
    got = await call(cluster, Get(key="{a}r"))
    assert isinstance(got, ValueReply) and got.version == first.version


async def test_db_failure_fails_the_write_and_applies_nothing(cluster: Cluster) -> None:
    cluster.net.down.add(DB_ADDRESS)  # the db becomes unreachable
    await cluster.drone.db.aclose()
    with pytest.raises(Unavailable):
        await call(cluster, Put(key="{a}f", value=1, op_id=op()))
    assert await call(cluster, Get(key="{a}f")) == ValueReply(found=False)


async def test_stale_grant_is_fenced_and_answered_unavailable(cluster: Cluster) -> None:
    # Another drone presented a grant with a newer epoch: the db fences this drone's old one.
    newer = cluster.grant_for("other-drone", (SLOT_A, SLOT_A, 5))
    await cluster.db_request("other-drone", DbReadSlot(grant=newer, slot=SLOT_A))
    with pytest.raises(Unavailable) as unavailable:
        await call(cluster, Put(key="{a}z", value=1, op_id=op()))
    assert unavailable.value.detail["db_code"] == "FENCED"
    assert await call(cluster, Get(key="{a}z")) == ValueReply(found=False)


async def test_reseed_loads_a_newly_granted_slot_and_dropped_slot_moves(cluster: Cluster) -> None:
    # The slot's previous owner wrote it under epoch 2.
    before = cluster.grant_for("other-drone", (SLOT_C, SLOT_C, 2))
    write = (SLOT_C, canonical_key("{c}seed"), (2 << 40) + 5, codec.encode("old"))
    batch = DbWriteBatch.of([before], [pack_op(op(), [write])])
    assert isinstance(await cluster.db_request("other-drone", batch), DbBatchResult)
    await cluster.grant_and_wait((SLOT_A, SLOT_A, 1), (SLOT_C, SLOT_C, 2))
    got = await call(cluster, Get(key="{c}seed"))
    assert got == ValueReply(found=True, value="old", version=(2 << 40) + 5)
    written = await call(cluster, Put(key="{c}seed", value="new", op_id=op()))
    assert isinstance(written, Written) and written.version > (2 << 40) + 5
    with pytest.raises(Moved):
        await call(cluster, Get(key="{b}k"))
    assert not cluster.drone.state.store.has_slot(SLOT_B)


async def test_unknown_incarnation_makes_the_drone_register_again(cluster: Cluster) -> None:
    heartbeater = cluster.drone.heartbeater
    assert heartbeater is not None and heartbeater.incarnation == 1
    cluster.commander.incarnation = 2  # as if the commander restarted
    await trio.sleep(0.5)
    assert heartbeater.incarnation == 2
    assert isinstance(await call(cluster, Get(key="{a}k")), ValueReply)


async def test_cas_waits_for_a_pending_write_then_validates_against_it(cluster: Cluster) -> None:
    written = await call(cluster, Put(key="{a}p", value=1, op_id=op(), ack=ACK_MEMORY))
    assert isinstance(written, Written)
    # The memory-acked write may still be on its way to the db: the cas waits for it.
    swapped = await call(
        cluster, CompareAndSet(key="{a}p", expected_version=written.version, value=2, op_id=op())
    )
    assert isinstance(swapped, Written) and swapped.version > written.version
    assert not cluster.drone.state.pending.is_pending(SLOT_A, canonical_key("{a}p"))


async def test_get_many_refuses_a_reply_over_its_byte_limit(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys: list[Key] = [f"{{a}}big{index}" for index in range(2)]
    for key in keys:
        await call(cluster, Put(key=key, value="v" * 900, op_id=op()))
    reply = await call(cluster, GetMany(keys=keys))
    assert isinstance(reply, ValuesReply)
    monkeypatch.setattr(reads, "MAX_GET_MANY_BYTES", 1500)  # two values no longer fit
    with pytest.raises(TooLarge):
        await call(cluster, GetMany(keys=keys))
    with pytest.raises(BadRequest):
        await call(cluster, GetMany(keys=["{a}k"] * (reads.MAX_GET_MANY_KEYS + 1)))
