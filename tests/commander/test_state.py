"""The commander state machine driven directly, with time passed in."""

from __future__ import annotations

import pytest

from keyval.commander.slotmap import NO_OWNER
from keyval.commander.state import CommanderState, DroneFailed, Phase, SaveMap
from keyval.grants import NUM_SLOTS
from keyval.timing import commander_expiry_ms
from wire.errors import BadRequest, NotFound, Unavailable

EXPIRY_S = commander_expiry_ms(600) / 1000


def save_all(state: CommanderState, now: float) -> list[SaveMap]:
    """Tick and confirm every save, as the daemon does when the db answers."""
    saves = []
    for _ in range(5):
        instructions = [i for i in state.tick(now) if isinstance(i, SaveMap)]
        if not instructions:
            break
        for save in instructions:
            state.map_saved(save.version, now)
            saves.append(save)
    return saves


def start(drones: int, now: float = 0.0) -> tuple[CommanderState, dict[str, int]]:
    state = CommanderState(name="commander-1", term=1, now=now, expect_drones=drones)
    incarnations = {}
    for index in range(1, drones + 1):
        name = f"drone-{index}"
        incarnations[name] = state.register(name, f"127.0.0.1:{6240 + index}", 0, now).incarnation
    save_all(state, now)
    return state, incarnations


def slot_count(ranges: list[tuple[int, int, int]]) -> int:
    return sum(last - first + 1 for first, last, _ in ranges)


def beat_all(state: CommanderState, incarnations: dict[str, int], now: float) -> dict[str, list]:
    return {name: state.heartbeat(name, inc, {}, now) for name, inc in incarnations.items()}


def test_waits_for_expected_drones_then_splits_evenly_and_saves_before_granting() -> None:
    state = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=3)
    one = state.register("drone-1", "127.0.0.1:6241", 0, 0.0).incarnation
    assert state.tick(0.0) == []
    assert state.heartbeat("drone-1", one, {}, 0.05) == []
    state.register("drone-2", "127.0.0.1:6242", 0, 0.1)
    state.register("drone-3", "127.0.0.1:6243", 0, 0.1)
    [save] = state.tick(0.1)
    assert isinstance(save, SaveMap) and save.version == 1
    assert save.ranges == [
        (0, 5461, "drone-1", 1),
        (5462, 10922, "drone-2", 1),
        (10923, 16383, "drone-3", 1),
    ]
    # Not saved yet: still no grant.
    assert state.heartbeat("drone-1", one, {}, 0.15) == []
    state.map_saved(1, 0.2)
    assert state.heartbeat("drone-1", one, {}, 0.25) == [(0, 5461, 1)]
    assert state.map_ranges() == save.ranges


def test_failed_drone_is_declared_only_after_its_lease_surely_expired() -> None:
    state, incs = start(3)
    beat_all(state, incs, 1.0)
    state.heartbeat("drone-1", incs["drone-1"], {}, 1.5)
    state.heartbeat("drone-2", incs["drone-2"], {}, 1.5)
    assert state.tick(1.0 + EXPIRY_S - 0.001) == []
    instructions = state.tick(1.0 + EXPIRY_S)
    assert DroneFailed("drone-3", incs["drone-3"]) in instructions
    [save] = [i for i in instructions if isinstance(i, SaveMap)]
    owners = {drone for _, _, drone, _ in save.ranges}
    assert owners == {"drone-1", "drone-2"}
    # drone-3's slots went to both survivors, not all onto one.
    moved = [r for r in save.ranges if r[0] >= 10923]
    assert {d for _, _, d, _ in moved} == {"drone-1", "drone-2"}
    assert all(e == 2 for _, _, _, e in moved)
    state.map_saved(save.version, 1.0 + EXPIRY_S)
    grants = {n: slot_count(state.heartbeat(n, incs[n], {}, 1.7)) for n in ("drone-1", "drone-2")}
    assert grants == {"drone-1": 8192, "drone-2": 8192}
    with pytest.raises(NotFound):
        state.heartbeat("drone-3", incs["drone-3"], {}, 1.7)


def test_spread_follows_free_capacity_when_every_drone_reports_it() -> None:
    state = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=3)
    incs = {}
    for name, capacity in (("drone-1", 1000), ("drone-2", 3000), ("drone-3", 1000)):
        incs[name] = state.register(name, "127.0.0.1:1", capacity, 0.0).incarnation
    save_all(state, 0.0)
    state.heartbeat("drone-1", incs["drone-1"], {"keys": 500}, 0.5)
    state.heartbeat("drone-2", incs["drone-2"], {"keys": 500}, 0.5)
    [save] = [i for i in state.tick(0.0 + EXPIRY_S + 0.01) if isinstance(i, SaveMap)]
    taken = {"drone-1": 0, "drone-2": 0}
    for first, last, drone, _ in save.ranges:
        if first >= 10923:
            taken[drone] += last - first + 1
    # Free capacity 500 vs 2500: one sixth and five sixths of the 5461 orphaned slots.
    assert taken == {"drone-1": 910, "drone-2": 4551}


def test_returning_failed_drone_is_new_and_gets_only_a_rebalanced_share() -> None:
    state, incs = start(2)
    state.heartbeat("drone-1", incs["drone-1"], {}, 0.5)
    save_all(state, 1.0)
    assert {d for _, _, d, _ in state.map_ranges()} == {"drone-1"}
    state.heartbeat("drone-1", incs["drone-1"], {}, 1.1)
    record = state.register("drone-2", "127.0.0.1:6242", 0, 1.2)
    assert record.incarnation != incs["drone-2"]
    [save] = save_all(state, 1.2)
    counts: dict[str, int] = {}
    for first, last, drone, _ in save.ranges:
        counts[drone] = counts.get(drone, 0) + last - first + 1
    assert counts == {"drone-1": 8192, "drone-2": 8192}
    # Its share is the high half under new epochs, not its old slots with old epochs.
    assert all(epoch >= 3 for first, _, drone, epoch in save.ranges if drone == "drone-2")


def test_new_owner_is_not_granted_a_moved_slot_until_the_old_lease_ended() -> None:
    state, incs = start(2)
    beat_all(state, incs, 1.0)  # drone-1 holds slot 0 with a lease until 1.0 + EXPIRY_S
    version = state.move(0, "drone-2", 1.1, live=False)
    [save] = save_all(state, 1.1)
    assert save.version == version == 2
    assert (0, 0, "drone-2", 2) in save.ranges
    first_grant = state.heartbeat("drone-1", incs["drone-1"], {}, 1.2)
    assert first_grant[0][0] == 1  # drone-1 no longer has slot 0
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 1.2)[0][0] != 0
    later = state.heartbeat("drone-2", incs["drone-2"], {}, 1.0 + EXPIRY_S)
    assert later[0] == (0, 0, 2)


def test_a_slot_moving_while_its_save_is_in_flight_keeps_the_latest_lease() -> None:
    state, incs = start(2)
    state.move(0, "drone-2", 0.1, live=False)
    [save] = [i for i in state.tick(0.1) if isinstance(i, SaveMap)]
    state.heartbeat("drone-1", incs["drone-1"], {}, 0.3)  # still granted slot 0 by the old map
    state.map_saved(save.version, 0.4)
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 0.1 + EXPIRY_S + 0.1)[0][0] != 0
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 0.3 + EXPIRY_S)[0] == (0, 0, 2)


def test_drain_moves_everything_off_and_refuses_the_last_drone() -> None:
    state, incs = start(3)
    state.drain("drone-2", 0.1)
    save_all(state, 0.1)
    owners = {d for _, _, d, _ in state.map_ranges()}
    assert owners == {"drone-1", "drone-3"}
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 0.15) == []
    state.drain("drone-1", 0.2)
    save_all(state, 0.2)
    before = (state.saved_version, list(state.map_ranges()))
    with pytest.raises(BadRequest, match="no other drone"):
        state.drain("drone-3", 0.3)
    assert state.tick(0.3) == [] and (state.saved_version, state.map_ranges()) == before


def test_bad_operator_and_drone_input_is_refused_without_change() -> None:
    state, incs = start(2)
    before = list(state.map_ranges())
    with pytest.raises(NotFound):
        state.move(5, "drone-9", 0.1)
    with pytest.raises(BadRequest):
        state.move(NUM_SLOTS, "drone-1", 0.1)
    with pytest.raises(NotFound):
        state.drain("drone-9", 0.1)
    with pytest.raises(BadRequest, match="already live"):
        state.register("drone-1", "127.0.0.1:7000", 0, 0.1)
    with pytest.raises(BadRequest):
        state.register("drone-5", "no-port", 0, 0.1)
    with pytest.raises(BadRequest):
        state.register("drone-5", "127.0.0.1:1", -1, 0.1)
    with pytest.raises(NotFound):
        state.heartbeat("drone-1", incs["drone-1"] + 1, {}, 0.1)
    with pytest.raises(NotFound):
        state.heartbeat("drone-7", 1, {}, 0.1)
    assert state.tick(0.1) == [] and state.map_ranges() == before
    assert state.heartbeat("drone-1", incs["drone-1"], {}, 0.15) != []


def test_operator_commands_wait_for_the_first_assignment() -> None:
    state = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=2)
    state.register("drone-1", "127.0.0.1:1", 0, 0.0)
    with pytest.raises(Unavailable):
        state.move(3, "drone-1", 0.0)


def test_resume_regrants_returning_owners_with_bumped_epochs() -> None:
    persisted = [(0, 8191, "drone-1", 4), (8192, 16383, "drone-2", 7)]
    state = CommanderState(
        name="commander-1", term=5, now=10.0, persisted_version=9, persisted_ranges=persisted
    )
    assert state.phase is Phase.RESUMING
    one = state.register("drone-1", "127.0.0.1:1", 0, 10.1).incarnation
    assert state.tick(10.1) == []  # drone-2 may still come back
    assert state.heartbeat("drone-1", one, {}, 10.1) == []  # not saved under our term yet
    state.register("drone-2", "127.0.0.1:2", 0, 10.2)
    [save] = save_all(state, 10.2)
    assert save.version == 10
    assert save.ranges == [(0, 8191, "drone-1", 5), (8192, 16383, "drone-2", 8)]
    assert state.heartbeat("drone-1", one, {}, 10.3) == [(0, 8191, 5)]


def test_resume_gives_missing_owners_slots_away_only_after_their_old_leases() -> None:
    persisted = [(0, 8191, "drone-1", 4), (8192, 16383, "drone-2", 7)]
    state = CommanderState(
        name="commander-1",
        term=5,
        now=10.0,
        persisted_ranges=persisted,
        persisted_version=3,
        resume_grace_ms=200,
    )
    one = state.register("drone-1", "127.0.0.1:1", 0, 10.0).incarnation
    assert save_all(state, 10.1) == []
    state.heartbeat("drone-1", one, {}, 10.15)
    [save] = save_all(state, 10.2)
    assert save.ranges == [(0, 8191, "drone-1", 5), (8192, 16383, "drone-1", 8)]
    assert state.heartbeat("drone-1", one, {}, 10.3) == [(0, 8191, 5)]
    assert state.heartbeat("drone-1", one, {}, 10.0 + EXPIRY_S) == [(0, 8191, 5), (8192, 16383, 8)]


def test_unowned_slots_have_no_grant_and_map_has_gaps() -> None:
    state = CommanderState(
        name="c", term=2, now=0.0, persisted_ranges=[(0, 99, "drone-1", 1)], persisted_version=1
    )
    assert state.saved.owners[100] == NO_OWNER
    one = state.register("drone-1", "127.0.0.1:1", 0, 0.0).incarnation
    save_all(state, 0.0)
    assert slot_count(state.heartbeat("drone-1", one, {}, 0.1)) == NUM_SLOTS


def test_live_move_goes_target_waiting_then_source_release_without_a_lease_wait() -> None:
    state, incs = start(2)
    beat_all(state, incs, 1.0)
    version = state.move(0, "drone-2", 1.0)
    assert save_all(state, 1.0) == []  # nothing moves before the source released
    assert state.moves_for("drone-2") == ([], [0])
    assert state.moves_for("drone-1") == ([], [])  # the source waits for the target's poll
    assert state.target_waiting("drone-2", incs["drone-2"], [0, 5]) == [0]
    assert state.moves_for("drone-1") == ([0], [])
    assert state.heartbeat("drone-1", incs["drone-1"], {}, 1.1)[0] == (0, NUM_SLOTS // 2 - 1, 1)
    with pytest.raises(BadRequest, match="under epoch"):
        state.released("drone-1", incs["drone-1"], 0, 7, 1.1)
    with pytest.raises(BadRequest, match="not being released"):
        state.released("drone-2", incs["drone-2"], 0, 1, 1.1)
    with pytest.raises(NotFound):
        state.released("drone-1", incs["drone-1"] + 1, 0, 1, 1.1)
    assert state.released("drone-1", incs["drone-1"], 0, 1, 1.1) <= version
    [save] = save_all(state, 1.1)
    assert (0, 0, "drone-2", 2) in save.ranges
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 1.1)[0] == (0, 0, 2)  # at once
    assert state.heartbeat("drone-1", incs["drone-1"], {}, 1.1)[0][0] == 1
    assert state.migrations == {}


def test_live_move_is_dropped_when_a_side_fails_or_the_source_stays_silent() -> None:
    state, incs = start(3)
    beat_all(state, incs, 1.0)
    state.move(0, "drone-2", 1.0)
    state.move(1, "drone-3", 1.0)
    state.heartbeat("drone-1", incs["drone-1"], {}, 1.0 + EXPIRY_S)
    state.heartbeat("drone-3", incs["drone-3"], {}, 1.0 + EXPIRY_S)
    state.tick(1.0 + EXPIRY_S + 0.01)  # drone-2 (the target of slot 0) failed
    assert list(state.migrations) == [1]
    state.target_waiting("drone-3", incs["drone-3"], [1])  # slot 1 reaches RELEASING
    for at in (2.0, 3.0, 4.0, 5.0, 6.5):
        state.heartbeat("drone-1", incs["drone-1"], {}, at)
        state.heartbeat("drone-3", incs["drone-3"], {}, at)
        state.tick(at)
    state.tick(7.0)
    assert state.migrations == {}
    with pytest.raises(BadRequest, match="not being released"):
        state.released("drone-1", incs["drone-1"], 1, 1, 7.0)
    assert state.working.owners[1] == "drone-3"  # a silent source: plain handover instead


def test_live_move_to_a_target_that_never_polls_becomes_a_plain_handover() -> None:
    state, incs = start(2)
    beat_all(state, incs, 1.0)
    state.move(0, "drone-2", 1.0)
    beat_all(state, incs, 1.5)
    assert save_all(state, 1.5) == []
    beat_all(state, incs, 2.0)
    [save] = save_all(state, 2.0)
    assert (0, 0, "drone-2", 2) in save.ranges
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 2.0)[0][0] != 0  # lease wait
    assert state.heartbeat("drone-2", incs["drone-2"], {}, 2.0 + EXPIRY_S)[0] == (0, 0, 2)


def test_move_and_rebalance_refuse_bad_input_and_change_nothing() -> None:
    state, _ = start(2)
    before = state.working.copy()
    with pytest.raises(NotFound, match="no live drone"):
        state.move(0, "drone-9", 0.1)
    with pytest.raises(BadRequest, match="outside"):
        state.move(NUM_SLOTS, "drone-2", 0.1)
    state.move(0, "drone-2", 0.1)
    with pytest.raises(BadRequest, match="already moving"):
        state.move(0, "drone-1", 0.1)
    assert state.move(1, "drone-1", 0.1) == state.saved_version  # already its owner
    assert state.working.owners == before.owners and state.working.epochs == before.epochs
    waiting = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=2)
    with pytest.raises(Unavailable):
        waiting.rebalance(0.0)
