"""Reseed: newly granted slots load in contiguous runs with db.read_slots.

The drone side (Reseeder, SlotTable, SlotStore) runs against the real db service on SQLite;
the link between them calls the service's handler directly (as keyval.net would deliver the
request) and counts the requests, and can hold a page back to observe progress.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from keyval.db.service import Database
from keyval.db.sqlite import SqliteBackend
from keyval.drone.reseed import (
    MAX_RUN_SLOTS,
    Reseeder,
    decode_value,
    first_contiguous,
    plan_runs,
)
from keyval.drone.slots import Reseed, SlotStatus
from keyval.drone.state import DroneState
from keyval.grants import Grant, sign_grant
from keyval.keys import NUM_SLOTS, canonical_key, key_slot
from keyval.messages import (
    DbBatchResult,
    DbGrantKey,
    DbGrantKeyReply,
    DbReadSlot,
    DbReadSlots,
    DbWriteBatch,
    pack_op,
)
from tests.drone.harness import AUTOJUMP_S
from wire import codec
from wire.channel import PeerInfo
from wire.errors import Internal
from wire.messages import Message

DRONE = PeerInfo("drone-1", "drone")
OTHER_DRONE = PeerInfo("drone-2", "drone")
COMMANDER = PeerInfo("commander-1", "commander")
LEASE_MS = 60_000
WRITE_CHUNK = 4000  # ops per DbWriteBatch, under the db's MAX_OPS_PER_REQUEST


class DbServiceLink:
    """A DbLink to the real db service: requests go to its handler as peer `drone-1`."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.requests: list[Message] = []
        self.gate: trio.Event | None = None  # when set: pages after the first wait for it

    async def request(self, msg: Message, *, timeout: float) -> Message:
        self.requests.append(msg)
        if self.gate is not None and len(self.requests) > 1:
            await self.gate.wait()
        with trio.fail_after(timeout):
            return await self.database.handle(DRONE, msg)


class Rig:
    def __init__(self, database: Database, grant_key: bytes, nursery: trio.Nursery) -> None:
        self.database = database
        self.grant_key = grant_key
        self.nursery = nursery
        self.link = DbServiceLink(database)
        self.state = DroneState("drone-1", self.link)
        self.reseeder = Reseeder(self.state, self.link)

    def grant(self, *ranges: tuple[int, int, int], drone: str = "drone-1") -> Grant:
        return sign_grant(Grant(drone, 1, tuple(ranges), 0), self.grant_key)

    def give(self, *ranges: tuple[int, int, int], issued_ms: int = 0) -> None:
        grant = sign_grant(Grant("drone-1", 1, tuple(ranges), issued_ms), self.grant_key)
        instructions = self.state.table.apply_grant(
            grant, sent_at=trio.current_time(), lease_ms=LEASE_MS
        )
        self.reseeder.carry_out(instructions, self.nursery)

    async def write(self, items: list[tuple[str, object]]) -> None:
        """Store `items` as the previous owner (drone-2, epoch 1 of every slot) would."""
        grant = self.grant((0, 16383, 1), drone="drone-2")
        for start in range(0, len(items), WRITE_CHUNK):
            ops = [
                pack_op(os.urandom(16), [(key_slot(k), canonical_key(k), 7, codec.encode(v))])
                for k, v in items[start : start + WRITE_CHUNK]
            ]
            reply = await self.database.handle(OTHER_DRONE, DbWriteBatch.of([grant], ops))
            assert isinstance(reply, DbBatchResult)
            assert all(result[0] == "ok" for result in reply.results)

    async def wait_ready(self, slots: range) -> None:
        with trio.fail_after(30):
            while any(self.state.table.status_of(s) is not SlotStatus.READY for s in slots):
                await trio.sleep(0.01)

    def value(self, key: str) -> object:
        found = self.state.store.get(key_slot(key), canonical_key(key))
        return None if found is None else found[0]


@pytest.fixture
async def rig(mock_clock: MockClock, tmp_path: Path) -> AsyncIterator[Rig]:
    mock_clock.autojump_threshold = AUTOJUMP_S  # SQLite works in a thread: see harness.py
    async with trio.open_nursery() as nursery:
        database = Database(SqliteBackend(tmp_path / "keyval.sqlite3"))
        await database.open()
        await nursery.start(database.run)
        reply = await database.handle(COMMANDER, DbGrantKey())
        assert isinstance(reply, DbGrantKeyReply)
        yield Rig(database, reply.key, nursery)
        nursery.cancel_scope.cancel()
    await database.aclose()


def keys_in(slots: range, per_slot: int) -> list[str]:
    """`per_slot` {tag} keys in each slot of `slots`."""
    tags: dict[int, str] = {}
    candidate = 0
    while len(tags) < len(slots):
        tag = f"t{candidate}"
        candidate += 1
        slot = key_slot(tag)
        if slot in slots and slot not in tags:
            tags[slot] = tag
    return [f"{{{tag}}}{index}" for tag in tags.values() for index in range(per_slot)]


def reads_of(link: DbServiceLink) -> list[DbReadSlots]:
    return [msg for msg in link.requests if isinstance(msg, DbReadSlots)]


# ------------------------------------------------------------------ planning


def test_runs_are_consecutive_slots_of_bounded_length() -> None:
    reseeds = [Reseed(slot, 2) for slot in (9, 3, 4, 5, 7, 8)]
    assert plan_runs(reseeds) == [[(3, 2), (4, 2), (5, 2)], [(7, 2), (8, 2), (9, 2)]]
    long = plan_runs(Reseed(slot, 1) for slot in range(MAX_RUN_SLOTS + 5))
    assert [len(run) for run in long] == [MAX_RUN_SLOTS, 5]
    assert plan_runs([]) == []


def test_an_undecodable_stored_value_is_an_internal_error() -> None:
    assert decode_value(b"\x83\x01\x02\x03", 5) == [1, 2, 3]
    with pytest.raises(Internal):
        decode_value(b"\xff", 5)


def test_first_contiguous() -> None:
    assert first_contiguous([(1, 1), (2, 1), (4, 1)]) == [(1, 1), (2, 1)]
    assert first_contiguous([(5, 3)]) == [(5, 3)]


# ------------------------------------------------------------------ loading


async def test_many_slots_load_in_a_few_bulk_reads(rig: Rig) -> None:
    slots = range(0, MAX_RUN_SLOTS + 100)
    keys = keys_in(slots, 3)
    big = [f"{{big}}{index}" for index in range(6000)]  # one slot of more than a page
    await rig.write([(key, key) for key in keys + big])
    rig.give((0, 16383, 2))
    await rig.wait_ready(range(NUM_SLOTS))
    assert all(rig.value(key) == key for key in keys + big)
    reads = reads_of(rig.link)
    # Runs of MAX_RUN_SLOTS slots, each a page or two: 16 runs, under 40 requests in all,
    # where one request per slot would take 16384.
    assert 16 <= len(reads) < 40
    assert not any(isinstance(msg, DbReadSlot) for msg in rig.link.requests)


async def test_a_slot_serves_once_a_page_has_passed_it(rig: Rig) -> None:
    low = keys_in(range(10, 13), 2000)  # 6000 items: the first page (5000) ends in slot 12
    await rig.write([(key, 1) for key in low])
    rig.link.gate = trio.Event()
    rig.give((10, 14, 1))
    with trio.fail_after(10):
        while rig.state.table.status_of(11) is not SlotStatus.READY:
            await trio.sleep(0.01)
    assert len(reads_of(rig.link)) == 2  # the second page is held back at the gate
    assert rig.state.table.status_of(10) is SlotStatus.READY
    assert rig.state.table.status_of(12) is SlotStatus.LOADING
    assert rig.state.table.status_of(14) is SlotStatus.LOADING
    rig.link.gate.set()
    await rig.wait_ready(range(10, 15))
    assert all(rig.value(key) == 1 for key in low)
    second = reads_of(rig.link)[1]
    assert second.first == 12 and second.after_slot == 12


async def test_a_fenced_slot_is_set_aside_and_the_rest_loads(rig: Rig) -> None:
    keys = keys_in(range(20, 25), 2)
    await rig.write([(key, "v") for key in keys])
    # The commander moved slot 22 on (epoch 5) before this drone heard of it.
    newer = rig.grant((22, 22, 5), drone="drone-2")
    await rig.database.handle(OTHER_DRONE, DbReadSlot(newer, 22))
    rig.give((20, 24, 3))
    await rig.wait_ready(range(20, 22))
    await rig.wait_ready(range(23, 25))
    assert rig.state.table.status_of(22) is SlotStatus.LOADING
    # The next grant no longer lists it: the reseed of the run ends.
    rig.give((20, 21, 3), (23, 24, 3), issued_ms=1)
    await trio.sleep(1)
    assert rig.state.table.status_of(22) is None
    assert not rig.state.store.has_slot(22)
    assert all(rig.value(key) == "v" for key in keys if key_slot(key) != 22)


async def test_a_slot_dropped_mid_run_is_not_installed(rig: Rig) -> None:
    keys = keys_in(range(30, 33), 2000)
    await rig.write([(key, 1) for key in keys])
    rig.link.gate = trio.Event()
    rig.give((30, 32, 1))
    with trio.fail_after(10):
        while rig.state.table.status_of(30) is not SlotStatus.READY:
            await trio.sleep(0.01)
    rig.give((30, 31, 1), issued_ms=1)  # slot 32 taken away while its page is in flight
    rig.link.gate.set()
    await rig.wait_ready(range(30, 32))
    await trio.sleep(1)
    assert rig.state.table.status_of(32) is None
    assert not rig.state.store.has_slot(32)


async def test_a_live_move_reloads_one_slot(rig: Rig) -> None:
    await rig.write([("{m}k", "before")])
    slot = key_slot("{m}")
    rig.give((slot, slot, 1))
    await rig.wait_ready(range(slot, slot + 1))
    assert rig.value("{m}k") == "before"
    await rig.write([("{m}k2", "later")])
    rig.give((slot, slot, 2), issued_ms=1)  # back under a new epoch: dropped and reloaded
    await rig.wait_ready(range(slot, slot + 1))
    assert rig.state.table.epoch_of(slot) == 2
    assert rig.value("{m}k2") == "later"
    last = reads_of(rig.link)[-1]
    assert (last.first, last.last) == (slot, slot)
