from __future__ import annotations

import pytest
import trio
import trio.testing

import keyval
from keyval.client.aio import AsyncClient
from keyval.client.errors import TooManyConflicts, TransactionFinished
from keyval.client.txn import AsyncTransaction, Entry, TxnBuffer
from keyval.keys import canonical_key, key_slot
from keyval.messages import TxnCommit, TxnPrepare
from tests.client.fakes import FakeCluster
from tests.client.test_client import drone_of, keys_on_each_drone
from wire.errors import BadRequest, Conflict, TooLarge, Unavailable


def commits(cluster: FakeCluster) -> list[TxnCommit]:
    return [m for d in cluster.drones.values() for m in d.requests if isinstance(m, TxnCommit)]


def test_buffer_reads_its_own_writes_and_keeps_order() -> None:
    buffer = TxnBuffer()
    a, b = canonical_key("a"), canonical_key("b")
    assert buffer.lookup(a) is None
    buffer.record_read(a, "a", Entry("old", 4))
    assert buffer.lookup(a) == ("old", 4)
    buffer.put(b, "b", 1)
    buffer.put(a, "a", "new")
    assert buffer.lookup(a) == ("new", -1)
    buffer.delete(b, "b")
    assert buffer.lookup(b) == (None, 0)
    message = buffer.commit_message(b"o" * 16, "durable")
    assert message.reads == [("a", 4)]
    assert message.writes == [("b", "del", None), ("a", "put", "new")]


def test_buffer_keeps_the_first_version_read() -> None:
    buffer = TxnBuffer()
    a = canonical_key("a")
    buffer.record_read(a, "a", Entry(1, 4))
    buffer.record_read(a, "a", Entry(2, 9))
    assert buffer.commit_message(b"o" * 16, "durable").reads == [("a", 4)]


def test_buffer_limits_keys_per_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyval.client.txn.MAX_TRANSACTION_KEYS", 2)
    buffer = TxnBuffer()
    buffer.put(canonical_key(1), 1, 1)
    buffer.put(canonical_key(2), 2, 2)
    buffer.put(canonical_key(2), 2, 3)  # the same key again is fine
    with pytest.raises(TooLarge):
        buffer.put(canonical_key(3), 3, 3)


async def test_writes_are_buffered_until_commit(kv: AsyncClient, cluster: FakeCluster) -> None:
    first_version = await kv.put("{t}a", 10)
    async with kv.transaction() as tx:
        assert await tx.get("{t}a") == 10
        await tx.put("{t}a", 11)
        await tx.put("{t}b", 1)
        assert await tx.get("{t}a") == 11  # read your own write
        assert await tx.get("{t}b") == 1
        await tx.delete("{t}b")
        assert await tx.get("{t}b", "none") == "none"
        assert commits(cluster) == []
        assert await kv.get("{t}a") == 10  # others do not see it yet
    assert await kv.get("{t}a") == 11
    assert await kv.get("{t}b") is None
    (sent,) = commits(cluster)
    assert sent.reads == [("{t}a", first_version)]
    assert sent.writes == [("{t}a", "put", 11), ("{t}b", "del", None)]
    assert len(tx.versions) == 2


async def test_a_one_drone_commit_follows_a_slot_moved_since_the_reads(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, two = keys_on_each_drone(cluster)
    version = await kv.put(one, 1)
    async with kv.transaction() as tx:
        assert await tx.get(one) == 1
        await tx.put(one, 2)
        new_owner = cluster.drones[drone_of(cluster, two)].name
        cluster.move_slot(key_slot(one), new_owner)  # the client's map now names the old owner
    assert await kv.get(one) == 2
    first, retried = commits(cluster)  # MOVED at the old owner, committed at the new one
    assert first.op_id == retried.op_id and first.reads == [(one, version)]
    assert tx.versions[0] > version


async def test_a_one_drone_commit_is_retried_after_unavailable(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    await kv.put("{u}a", 1)
    async with kv.transaction() as tx:
        await tx.put("{u}a", (await tx.get("{u}a")) + 1)
        cluster.inject(drone_of(cluster, "{u}a"), Unavailable("loading"), count=2)
    assert await kv.get("{u}a") == 2
    assert len(commits(cluster)) == 1  # the two refused tries reached no drone's commit
    assert len(tx.versions) == 1


async def test_commit_conflicts_when_a_read_changed(kv: AsyncClient) -> None:
    await kv.put("{c}x", 1)
    with pytest.raises(Conflict):
        async with kv.transaction() as tx:
            value = await tx.get("{c}x")
            await kv.put("{c}x", 100)  # someone else writes in between
            await tx.put("{c}x", value + 1)
    assert await kv.get("{c}x") == 100


async def test_an_error_in_the_block_sends_nothing(kv: AsyncClient, cluster: FakeCluster) -> None:
    with pytest.raises(RuntimeError):
        async with kv.transaction() as tx:
            await tx.put("{e}x", 1)
            raise RuntimeError("caller bug")
    assert commits(cluster) == []
    with pytest.raises(TransactionFinished):
        await tx.get("{e}x")


async def test_a_committed_transaction_cannot_be_reused(kv: AsyncClient) -> None:
    async with kv.transaction() as tx:
        await tx.put("{r}x", 1)
    with pytest.raises(TransactionFinished):
        await tx.put("{r}x", 2)


def prepares(cluster: FakeCluster) -> list[TxnPrepare]:
    return [m for d in cluster.drones.values() for m in d.requests if isinstance(m, TxnPrepare)]


async def test_keys_on_two_drones_go_to_two_phase_commit(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    # The fake drones do not speak 2PC (tests/twopc runs it against real drones): each
    # refuses kv.txn_prepare, and the refusal reaches the caller with nothing committed.
    one, two = keys_on_each_drone(cluster)
    with pytest.raises(BadRequest):
        async with kv.transaction() as tx:
            await tx.put(one, 1)
            await tx.put(two, 2)
    sent = prepares(cluster)
    assert commits(cluster) == []
    assert len(sent) == 2 and len({m.txid for m in sent}) == 1
    assert len({tuple(m.participants) for m in sent}) == 1 and len(sent[0].participants) == 2


async def test_read_only_transactions_on_two_drones_are_prepared_too(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    one, two = keys_on_each_drone(cluster)
    with pytest.raises(BadRequest):
        async with kv.transaction() as tx:
            await tx.get(one)
            await tx.get(two)
    assert sorted(len(m.reads) for m in prepares(cluster)) == [1, 1]


async def test_transact_reruns_the_function_on_conflict(
    kv: AsyncClient, autojump_clock: trio.testing.MockClock
) -> None:
    await kv.put("{n}counter", 0)
    runs = 0

    async def increment(tx: AsyncTransaction) -> int:
        nonlocal runs
        runs += 1
        value: int = await tx.get("{n}counter")
        if runs == 1:
            await kv.put("{n}counter", 50)  # interference on the first run only
        await tx.put("{n}counter", value + 1)
        return value + 1

    assert await kv.transact(increment) == 51
    assert runs == 2
    assert await kv.get("{n}counter") == 51


async def test_transact_gives_up_after_its_attempts(
    kv: AsyncClient, autojump_clock: trio.testing.MockClock
) -> None:
    await kv.put("{g}x", 0)

    async def always_interfered(tx: AsyncTransaction) -> None:
        value = await tx.get("{g}x")
        await kv.put("{g}x", value + 100)
        await tx.put("{g}x", value + 1)

    with pytest.raises(TooManyConflicts) as caught:
        await kv.transact(always_interfered, max_attempts=3)
    assert caught.value.detail == {"attempts": 3}


async def test_transactional_decorator_runs_or_joins(
    kv: AsyncClient, autojump_clock: trio.testing.MockClock
) -> None:
    @keyval.transactional
    async def add(tx: AsyncTransaction, key: str, amount: int) -> None:
        await tx.put(key, (await tx.get(key, 0)) + amount)

    await add(kv, "{d}x", 5)
    assert await kv.get("{d}x") == 5
    async with kv.transaction() as tx:
        await add(tx, "{d}x", 1)
        await add(tx, "{d}x", 1)
    assert await kv.get("{d}x") == 7
