"""A failed drone's slots reach the survivors with the map save, not at their next heartbeat:
while a drone is near its verdict the commander holds the others' heartbeats until the next
save (daemon.FAILURE_NEAR_MS, HEARTBEAT_HOLD_MAX_MS)."""

from __future__ import annotations

import math

import pytest
import trio
from trio.testing import MockClock

from keyval.commander.daemon import FAILURE_NEAR_MS, HEARTBEAT_HOLD_MAX_MS, Commander
from keyval.commander.slotmap import MapRange
from keyval.commander.state import CommanderState
from keyval.grants import NUM_SLOTS
from keyval.messages import Heartbeat, HeartbeatReply
from keyval.timing import HEARTBEAT_MS, commander_expiry_ms
from wire.channel import PeerInfo
from wire.errors import NotFound

EXPIRY_S = commander_expiry_ms(600) / 1000
SAVE_S = 0.005  # how long the fake db takes to save a map


class SavingDb:
    """The db link's map save, taking SAVE_S; records when each version was saved."""

    def __init__(self) -> None:
        self.saved_at: dict[int, float] = {}

    async def save_map(self, term: int, version: int, ranges: list[MapRange]) -> None:
        await trio.sleep(SAVE_S)
        self.saved_at[version] = trio.current_time()


def registered(state: CommanderState, *names: str) -> dict[str, int]:
    return {name: state.register(name, "127.0.0.1:1", 0, 0.0).incarnation for name in names}


def test_failure_near_only_in_the_last_window_of_a_silent_drone() -> None:
    state = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=2)
    registered(state, "drone-1", "drone-2")
    window_s = FAILURE_NEAR_MS / 1000
    assert not state.failure_near(EXPIRY_S - window_s - 0.01, window_s)
    assert state.failure_near(EXPIRY_S - window_s, window_s)


def test_a_renewed_grant_counts_the_lease_from_the_answer_not_the_drone_as_heard() -> None:
    state = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=1)
    incarnation = registered(state, "drone-1")["drone-1"]
    for instruction in state.tick(0.0):
        state.map_saved(instruction.version, 0.0)  # type: ignore[union-attr]
    assert state.heartbeat("drone-1", incarnation, {}, 0.1) == [(0, NUM_SLOTS - 1, 1)]
    assert state.renew_grant("drone-1", incarnation, 0.25) == [(0, NUM_SLOTS - 1, 1)]
    assert state.drones["drone-1"].last_heartbeat_at == 0.1  # heard at the receive only
    assert math.isclose(state._lease_end["drone-1"], 0.25 + EXPIRY_S)
    with pytest.raises(NotFound):
        state.renew_grant("drone-1", incarnation + 1, 0.3)


async def test_survivor_gets_the_dead_drones_slots_as_soon_as_the_map_is_saved(
    autojump_clock: MockClock,
) -> None:
    state = CommanderState(name="commander-1", term=1, now=trio.current_time(), expect_drones=2)
    incarnations = registered(state, "drone-1", "drone-2")
    db = SavingDb()
    commander = Commander(state, b"k" * 32, db)  # type: ignore[arg-type]
    grants: list[tuple[float, float, int]] = []  # (sent, answered, slots)

    async def beat(name: str) -> HeartbeatReply:
        msg = Heartbeat(name, incarnations[name], {}, [])
        reply = await commander.handle(PeerInfo(name, "drone"), msg)
        assert isinstance(reply, HeartbeatReply)
        return reply

    async def survivor() -> None:
        while True:
            sent = trio.current_time()
            reply = await beat("drone-1")
            grants.append((sent, trio.current_time(), reply.grant.slots()))
            if reply.grant.slots() == NUM_SLOTS:
                return
            await trio.sleep_until(sent + HEARTBEAT_MS / 1000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commander.run_ticker)
        with trio.fail_after(5):
            while state.saved_version == 0:
                await beat("drone-2")
                await trio.sleep(HEARTBEAT_MS / 1000)
        await beat("drone-2")  # drone-2's last heartbeat: it dies now
        with trio.fail_after(5):
            await survivor()
        nursery.cancel_scope.cancel()
    sent, answered, _ = grants[-1]
    saved_at = db.saved_at[max(db.saved_at)]
    assert answered - saved_at < 0.002  # answered with the save, not a heartbeat later
    assert 0 < answered - sent <= HEARTBEAT_HOLD_MAX_MS / 1000  # a held reply
    assert all(b - a < 0.002 for a, b, slots in grants[:-2])  # nothing held before the window


async def test_a_drone_that_is_itself_late_is_not_held(autojump_clock: MockClock) -> None:
    state = CommanderState(name="commander-1", term=1, now=trio.current_time(), expect_drones=2)
    incarnations = registered(state, "drone-1", "drone-2")
    commander = Commander(state, b"k" * 32, SavingDb())  # type: ignore[arg-type]

    async def beat(name: str) -> float:
        started = trio.current_time()
        await commander.handle(PeerInfo(name, "drone"), Heartbeat(name, incarnations[name], {}, []))
        return trio.current_time() - started

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commander.run_ticker)
        await beat("drone-1")
        await beat("drone-2")
        # Both silent until drone-2's verdict is near; drone-1's own gap is far over the limit.
        await trio.sleep(EXPIRY_S - FAILURE_NEAR_MS / 2000)
        assert commander._failure_near
        assert await beat("drone-1") < 0.002
        nursery.cancel_scope.cancel()
