"""A write whose handler is cancelled after it took versions still reaches the db.

Found by the simulation (issue 9): a connection closing cancels its handlers. A transaction
that waited for an earlier write to its keys wakes when that write resolves; if its
connection is cancelled in the same moment, it runs on without a checkpoint, marks its keys
pending, and met the first checkpoint in the batcher's queue send: the op was never queued,
so nothing resolved its pending marks, and every later cas, transaction or snapshot on those
keys timed out for good.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from keyval.drone.writes import handle_txn_commit
from keyval.keys import canonical_key, key_slot
from keyval.messages import Committed, TxnCommit
from tests.drone.harness import Cluster, serving_cluster
from wire.channel import PeerInfo

SLOT_A = key_slot("{a}")
CLIENT = PeerInfo("client", "client")

# Virtual time for the cancelled handler to park on the pending write (PENDING_WAIT_MS is 2 s).
PARK_S = 0.1


@pytest.fixture
async def cluster(mock_clock: MockClock, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with serving_cluster(mock_clock, tmp_path, SLOT_A) as cluster:
        yield cluster


def _txn(value: int) -> TxnCommit:
    return TxnCommit(reads=[("{a}k", 0)], writes=[("{a}k", "put", value)], op_id=os.urandom(16))


async def test_txn_cancelled_as_its_keys_clear_still_resolves_its_pending(
    cluster: Cluster,
) -> None:
    state = cluster.drone.state
    key = (SLOT_A, canonical_key("{a}k"))
    state.pending.add([key])  # an earlier write to the key, on its way to the db
    outcome: list[str] = []

    async def commit(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await handle_txn_commit(state, CLIENT, _txn(1))
            outcome.append("committed")
        if scope.cancelled_caught:
            outcome.append("cancelled")

    async with trio.open_nursery() as nursery:
        scope: trio.CancelScope = await nursery.start(commit)
        await trio.sleep(PARK_S)  # the transaction waits for the earlier write
        state.pending.resolve([key])  # it wakes...
        scope.cancel()  # ...and its connection closes before it runs
    assert outcome == ["cancelled"]
    with trio.fail_after(1):  # one db batch
        while state.pending.is_pending(*key):
            await trio.sleep(0.01)
    # The key is usable: the cancelled transaction's write reached the db (version > 0).
    stored = state.store.version_of(*key)
    assert stored > 0
    committed = await handle_txn_commit(
        state,
        CLIENT,
        TxnCommit(reads=[("{a}k", stored)], writes=[("{a}k", "put", 2)], op_id=os.urandom(16)),
    )
    assert isinstance(committed, Committed) and committed.versions[0] > stored
