"""SlotTable: grants, reseed/drop instructions, lease from send time, serving checks."""

from __future__ import annotations

import pytest

from keyval.drone.slots import Drop, Reseed, SlotStatus, SlotTable
from keyval.grants import Grant
from keyval.timing import drone_lease_ms
from wire.errors import BadRequest, Moved, Unauthorized, Unavailable

LEASE_MS = 600


def grant(*ranges: tuple[int, int, int], term: int = 1, drone: str = "drone-1") -> Grant:
    return Grant(drone=drone, term=term, ranges=tuple(ranges), issued_ms=0, mac=b"m")


def test_new_grant_reseeds_every_slot_and_serves_after_load() -> None:
    table = SlotTable("drone-1")
    instructions = table.apply_grant(grant((0, 2, 4)), sent_at=10.0, lease_ms=LEASE_MS)
    assert instructions == [Reseed(0, 4), Reseed(1, 4), Reseed(2, 4)]
    with pytest.raises(Unavailable) as loading:
        table.check_serving(1, 10.1)
    assert loading.value.detail["retry_after_ms"] > 0
    assert table.mark_loaded(1, 4)
    assert table.check_serving(1, 10.1) == 4
    assert table.ready_ranges() == [(1, 1, 4)]


def test_lease_runs_from_send_time_with_drift_margin() -> None:
    table = SlotTable("drone-1")
    table.apply_grant(grant((5, 5, 1)), sent_at=100.0, lease_ms=LEASE_MS)
    table.mark_loaded(5, 1)
    end = 100.0 + drone_lease_ms(LEASE_MS) / 1000
    assert end < 100.0 + LEASE_MS / 1000
    assert table.check_serving(5, end - 0.001) == 1
    with pytest.raises(Unavailable, match="lease"):
        table.check_serving(5, end)
    assert table.serving_slots(end) == []
    # A renewal restores service without reloading.
    assert table.apply_grant(grant((5, 5, 1)), sent_at=end + 0.05, lease_ms=LEASE_MS) == []
    assert table.check_serving(5, end + 0.1) == 1


def test_removed_slots_are_dropped_and_answer_moved() -> None:
    table = SlotTable("drone-1")
    table.apply_grant(grant((0, 3, 1)), sent_at=0.0, lease_ms=LEASE_MS)
    instructions = table.apply_grant(grant((0, 1, 1)), sent_at=0.1, lease_ms=LEASE_MS)
    assert instructions == [Drop(2), Drop(3)]
    table.note_owner(3, "drone-2", "127.0.0.1:7000", 2)
    with pytest.raises(Moved) as moved:
        table.check_serving(3, 0.2)
    assert moved.value.detail == {
        "slot": 3,
        "epoch": 2,
        "owner": "drone-2",
        "address": "127.0.0.1:7000",
    }


def test_epoch_change_drops_and_reseeds_and_stale_load_is_refused() -> None:
    table = SlotTable("drone-1")
    table.apply_grant(grant((9, 9, 1)), sent_at=0.0, lease_ms=LEASE_MS)
    instructions = table.apply_grant(grant((9, 9, 3), term=2), sent_at=0.1, lease_ms=LEASE_MS)
    assert instructions == [Drop(9), Reseed(9, 3)]
    assert not table.mark_loaded(9, 1)  # the old epoch's reseed finished late
    assert table.status_of(9) is SlotStatus.LOADING


def test_grant_from_an_older_term_is_ignored() -> None:
    table = SlotTable("drone-1")
    table.apply_grant(grant((0, 0, 2), term=3), sent_at=0.0, lease_ms=LEASE_MS)
    assert table.apply_grant(grant((1, 1, 2), term=2), sent_at=0.1, lease_ms=LEASE_MS) == []
    assert table.held_slots() == [0]


def test_bad_grants_are_refused_without_changing_state() -> None:
    table = SlotTable("drone-1")
    with pytest.raises(Unauthorized):
        table.apply_grant(grant((0, 0, 1), drone="drone-2"), sent_at=0.0, lease_ms=LEASE_MS)
    with pytest.raises(BadRequest):
        table.apply_grant(grant((5, 3, 1)), sent_at=0.0, lease_ms=LEASE_MS)
    with pytest.raises(BadRequest):
        table.apply_grant(grant((0, 0, 1)), sent_at=0.0, lease_ms=0)
    assert table.grant is None and table.held_slots() == []


def test_slot_out_of_range_is_bad_request_and_unheld_is_moved_without_owner() -> None:
    table = SlotTable("drone-1")
    with pytest.raises(BadRequest):
        table.check_serving(16384, 0.0)
    with pytest.raises(Moved) as moved:
        table.check_serving(1, 0.0)
    assert moved.value.detail["owner"] == "" and moved.value.detail["address"] == ""


def test_ready_ranges_merge_adjacent_slots_of_one_epoch() -> None:
    table = SlotTable("drone-1")
    table.apply_grant(grant((0, 3, 1), (4, 5, 2)), sent_at=0.0, lease_ms=LEASE_MS)
    for slot in (0, 1, 2, 4, 5):
        table.mark_loaded(slot, table.epoch_of(slot) or 0)
    assert table.ready_ranges() == [(0, 2, 1), (4, 5, 2)]


def test_a_new_term_granting_the_same_epochs_keeps_the_loaded_slots() -> None:
    """Continuity across commander terms: same slots, same epochs, newer term: no Drop, no
    Reseed; the lapsed lease is renewed and the slots serve again at once."""
    table = SlotTable("drone-1")
    for instruction in table.apply_grant(grant((0, 3, 4)), sent_at=10.0, lease_ms=LEASE_MS):
        assert isinstance(instruction, Reseed)
        table.mark_loaded(instruction.slot, instruction.epoch)
    assert table.ready_ranges() == [(0, 3, 4)]  # what a re-registration reports
    assert table.serving_slots(20.0) == []  # the old term's lease lapsed meanwhile
    kept = table.apply_grant(grant((0, 3, 4), term=2), sent_at=20.0, lease_ms=LEASE_MS)
    assert kept == []
    assert table.serving_slots(20.1) == [0, 1, 2, 3]
    bumped = table.apply_grant(grant((0, 1, 4), (2, 3, 5), term=3), sent_at=20.2, lease_ms=600)
    assert bumped == [Drop(2), Drop(3), Reseed(2, 5), Reseed(3, 5)]


def test_ready_ranges_follow_every_change_of_a_held_slot() -> None:
    """ready_ranges is cached between heartbeats; every change of a held slot shows at once."""
    table = SlotTable("drone-1")
    table.apply_grant(grant((0, 3, 1)), sent_at=0.0, lease_ms=LEASE_MS)
    assert table.ready_ranges() == []
    table.mark_loaded(1, 1)
    table.mark_loaded(2, 1)
    assert table.ready_ranges() == [(1, 2, 1)]
    table.ready_ranges().append((9, 9, 9))  # a caller's list is its own
    assert table.ready_ranges() == [(1, 2, 1)]
    assert table.begin_release(2) == 1
    assert table.ready_ranges() == [(1, 1, 1)]
    table.cancel_release(2, 1)
    assert table.ready_ranges() == [(1, 2, 1)]
    table.begin_release(2)
    assert table.finish_release(2, 1)
    assert table.ready_ranges() == [(1, 1, 1)]
    table.apply_grant(grant((1, 1, 2), term=1), sent_at=0.1, lease_ms=LEASE_MS)
    assert table.ready_ranges() == []
