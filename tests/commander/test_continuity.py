"""Continuity across commander terms: a resumed map keeps the epoch of every slot whose owner
still holds it at exactly that epoch (no reseed), and bumps every other slot."""

from __future__ import annotations

import pytest

from keyval.commander.state import CommanderState, Phase, SaveMap
from keyval.grants import NUM_SLOTS
from wire.errors import BadRequest

PERSISTED = [(0, 8191, "drone-1", 4), (8192, 16383, "drone-2", 7)]


def resumed(now: float = 10.0) -> CommanderState:
    return CommanderState(
        name="commander-2", term=5, now=now, persisted_version=9, persisted_ranges=PERSISTED
    )


def save_once(state: CommanderState, now: float) -> SaveMap:
    [save] = [i for i in state.tick(now) if isinstance(i, SaveMap)]
    state.map_saved(save.version, now)
    return save


def test_owners_that_still_hold_their_slots_keep_the_epochs() -> None:
    state = resumed()
    one = state.register("drone-1", "127.0.0.1:1", 0, 10.0, held=[(0, 8191, 4)]).incarnation
    state.register("drone-2", "127.0.0.1:2", 0, 10.0, held=[(8192, 16383, 7)])
    assert not state.granting
    save = save_once(state, 10.1)
    assert save.ranges == PERSISTED
    assert state.resume_kept == NUM_SLOTS
    assert state.granting
    assert state.heartbeat("drone-1", one, {}, 10.2) == [(0, 8191, 4)]


def test_only_exact_holdings_are_kept_the_rest_move_to_a_new_epoch() -> None:
    state = resumed()
    # drone-1 holds part of its range, one slot at a stale epoch; drone-2 restarted (nothing).
    held = [(0, 99, 4), (100, 100, 3), (200, 8191, 4)]
    state.register("drone-1", "127.0.0.1:1", 0, 10.0, held=held)
    state.register("drone-2", "127.0.0.1:2", 0, 10.0)
    save = save_once(state, 10.1)
    assert save.ranges == [
        (0, 99, "drone-1", 4),
        (100, 199, "drone-1", 5),
        (200, 8191, "drone-1", 4),
        (8192, 16383, "drone-2", 8),
    ]
    assert state.resume_kept == 8192 - 100


def test_a_drone_claiming_another_owners_slots_changes_nothing() -> None:
    state = resumed()
    state.register("drone-1", "127.0.0.1:1", 0, 10.0, held=[(0, 16383, 4)])
    state.register("drone-2", "127.0.0.1:2", 0, 10.0, held=[(0, 8191, 4)])
    save = save_once(state, 10.1)
    assert save.ranges == [(0, 8191, "drone-1", 4), (8192, 16383, "drone-2", 8)]


def test_slots_of_an_owner_that_did_not_come_back_move_under_new_epochs() -> None:
    state = CommanderState(
        name="commander-2",
        term=5,
        now=10.0,
        persisted_version=9,
        persisted_ranges=PERSISTED,
        resume_grace_ms=200,
    )
    state.register("drone-1", "127.0.0.1:1", 0, 10.0, held=[(0, 16383, 4)])
    assert state.tick(10.1) == []  # drone-2 may still come back
    save = save_once(state, 10.2)
    assert save.ranges == [(0, 8191, "drone-1", 4), (8192, 16383, "drone-1", 8)]


def test_holdings_reported_after_the_resume_are_ignored() -> None:
    state = resumed()
    state.register("drone-1", "127.0.0.1:1", 0, 10.0, held=[(0, 8191, 4)])
    state.register("drone-2", "127.0.0.1:2", 0, 10.0, held=[(8192, 16383, 7)])
    save_once(state, 10.1)
    assert state.phase is Phase.RUNNING
    record = state.register("drone-3", "127.0.0.1:3", 0, 10.2, held=[(0, 10, 4)])
    assert record.held == {}


@pytest.mark.parametrize(
    "held",
    [
        [(5, 4, 1)],  # first after last
        [(0, 10, 1), (5, 20, 1)],  # overlapping
        [(10, 20, 1), (0, 5, 1)],  # unsorted
        [(0, NUM_SLOTS, 1)],  # past the last slot
        [(-1, 3, 1)],  # negative slot
        [(0, 3, -1)],  # negative epoch
    ],
)
def test_bad_holdings_are_refused_and_nothing_registers(held: list[tuple[int, int, int]]) -> None:
    state = resumed()
    with pytest.raises(BadRequest, match="held"):
        state.register("drone-1", "127.0.0.1:1", 0, 10.0, held=held)
    assert state.drones == {}
