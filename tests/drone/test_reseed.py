"""Reseed: newly granted slots load in contiguous runs with db.read_slots.

The drone side (Reseeder, SlotTable, SlotStore) runs against the real db service on SQLite;
the link between them calls the service's handler directly (as keyval.net would deliver the
request) and counts the requests, and can hold a page back to observe progress.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from keyval.db.service import Database
from keyval.db.sqlite import SqliteBackend
from keyval.drone.reseed import (
    INSTALL_KEYS_PER_CHECKPOINT,
    MAX_RUN_SLOTS,
    MAX_SET_ASIDE_IN_A_ROW,
    RESEED_PAGE_ITEMS,
    RESEED_RETRY_MS,
    Reseeder,
    check_page,
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
    DbSlotsPage,
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
# Keys per slot so that two slots fit in one reseed page and three do not.
PER_SLOT = RESEED_PAGE_ITEMS * 2 // 5


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


def page(
    runs: list[tuple[int, int]], values: list[bytes], after: tuple[int, bytes] | None = None
) -> DbSlotsPage:
    keys = [b"k%d" % index for index in range(len(values))]
    return DbSlotsPage(runs, keys, values, [7] * len(values), after)


def test_a_well_formed_page_passes() -> None:
    check_page(page([(5, 2), (9, 1)], [b"\x83\x01\x02\x03", b"\x01", b"\xf6"], (9, b"k2")), 5, 9)
    check_page(page([], []), 5, 9)


@pytest.mark.parametrize(
    "bad",
    [
        page([(5, 1)], [b"\xff"]),  # not CBOR
        page([(5, 2)], [b"\x01\x02", b"\x03"]),  # two items in one value
        page([(5, 2)], [b"\x82\x01", b"\x02"]),  # one value cut, the next completes it
        page([(5, 1)], [b"\xc1\x01"]),  # a tag
        page([(4, 1)], [b"\x01"]),  # a slot before the range
        page([(10, 1)], [b"\x01"]),  # after it
        page([(6, 1), (6, 1)], [b"\x01", b"\x01"]),  # slots not rising
        page([(5, 1)], [b"\x01", b"\x01"]),  # runs do not cover the items
        page([(5, 0), (6, 1)], [b"\x01"]),  # an empty run
        page([(5, 1)], [b"\x01"], (11, b"k")),  # resumes outside the range
        DbSlotsPage([(5, 1)], [b"k"], [b"\x01"], [], None),  # columns differ in length
    ],
)
def test_a_malformed_page_is_an_internal_error(bad: DbSlotsPage) -> None:
    with pytest.raises(Internal):
        check_page(bad, 5, 9)


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
    low = keys_in(range(10, 13), PER_SLOT)  # the first page ends inside slot 12
    await rig.write([(key, 1) for key in low])
    rig.link.gate = trio.Event()
    rig.give((10, 14, 1))
    with trio.fail_after(10):  # slot 11 served; the second page asked for, held at the gate
        while rig.state.table.status_of(11) is not SlotStatus.READY or len(rig.link.requests) < 2:
            await trio.sleep(0.01)
    assert len(reads_of(rig.link)) == 2
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
    keys = keys_in(range(30, 33), PER_SLOT)  # the first page ends inside slot 32
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


async def test_installing_a_page_leaves_other_tasks_a_turn(rig: Rig) -> None:
    """A page is installed in batches of about INSTALL_KEYS_PER_CHECKPOINT keys with a
    checkpoint between them, so heartbeats and gets never wait behind a whole page."""
    keys = keys_in(range(40, 60), RESEED_PAGE_ITEMS // 20)  # one page: 20 slots
    await rig.write([(key, 1) for key in keys])
    installed: list[int] = []  # keys in the store at each checkpoint

    async def counted() -> None:
        installed.append(sum(rig.state.store.key_count(slot) for slot in range(40, 60)))
        await trio.lowlevel.checkpoint()

    rig.reseeder.checkpoint = counted
    rig.give((40, 59, 1))
    await rig.wait_ready(range(40, 60))
    steps = [after - before for before, after in itertools.pairwise([0, *installed, len(keys)])]
    assert len(installed) >= 1
    assert max(steps) <= INSTALL_KEYS_PER_CHECKPOINT + RESEED_PAGE_ITEMS // 20


async def test_a_row_of_fenced_slots_pauses_for_a_new_grant(rig: Rig) -> None:
    """A grant behind the map (the commander moved many slots on): a few fenced reads, then a
    pause for the next grant, not one db round trip per slot."""
    keys = keys_in(range(20, 51), 2)
    await rig.write([(key, "v") for key in keys])
    newer = rig.grant((20, 40, 5), drone="drone-2")
    await rig.database.handle(OTHER_DRONE, DbReadSlots(newer, 20, 40))
    started = trio.current_time()
    rig.give((20, 50, 3))
    await trio.sleep(RESEED_RETRY_MS / 1000 / 2)
    # A slow db thread may let the mock clock jump past a pause: a row of fenced reads per
    # pause that began. One read per slot would be 21 at once.
    pauses = 1 + int((trio.current_time() - started) // (RESEED_RETRY_MS / 1000))
    assert MAX_SET_ASIDE_IN_A_ROW <= len(reads_of(rig.link)) <= MAX_SET_ASIDE_IN_A_ROW * pauses
    before_catch_up = len(reads_of(rig.link))
    rig.give((41, 50, 3), issued_ms=1)  # the next grant catches up with the map
    await rig.wait_ready(range(41, 51))
    assert all(rig.value(key) == "v" for key in keys if key_slot(key) > 40)
    assert len(reads_of(rig.link)) <= before_catch_up + MAX_SET_ASIDE_IN_A_ROW + 2
