"""The drone slot table's side of a live move: freeze, refuse, hand over, ignore stale grants."""

from __future__ import annotations

import pytest

from keyval.drone.slots import Reseed, SlotStatus, SlotTable
from keyval.grants import Grant
from wire.errors import Moved, Unavailable


def _grant(ranges: tuple[tuple[int, int, int], ...], issued_ms: int, term: int = 1) -> Grant:
    return Grant("drone-1", term, ranges, issued_ms)


def _loaded_table() -> SlotTable:
    table = SlotTable("drone-1")
    for instruction in table.apply_grant(_grant(((0, 3, 1),), 10), sent_at=0.0, lease_ms=600):
        assert isinstance(instruction, Reseed)
        table.mark_loaded(instruction.slot, instruction.epoch)
    return table


def test_release_freezes_one_slot_then_hands_it_over_for_good() -> None:
    table = _loaded_table()
    assert table.begin_release(0) == 1
    assert table.begin_release(9) is None  # not held
    assert table.status_of(0) is SlotStatus.RELEASING
    with pytest.raises(Unavailable, match="moving away") as frozen:
        table.check_serving(0, 0.1)
    assert frozen.value.detail["retry_after_ms"] < table.retry_after_ms
    assert table.check_serving(1, 0.1) == 1  # other slots keep serving
    assert table.finish_release(0, 1) is True
    table.note_owner(0, "drone-2", "127.0.0.1:2", 2)
    with pytest.raises(Moved) as moved:
        table.check_serving(0, 0.1)
    assert moved.value.detail["owner"] == "drone-2" and moved.value.detail["epoch"] == 2
    # A grant issued before the commander saved the move still lists slot 0 under epoch 1:
    assert table.apply_grant(_grant(((0, 3, 1),), 20), sent_at=0.1, lease_ms=600) == []
    assert table.epoch_of(0) is None
    # Once the slot comes back under a new epoch it is reseeded as usual.
    instructions = table.apply_grant(_grant(((0, 3, 3),), 30), sent_at=0.2, lease_ms=600)
    assert Reseed(0, 3) in instructions


def test_cancelled_release_serves_again() -> None:
    table = _loaded_table()
    table.begin_release(2)
    table.cancel_release(2, 1)
    assert table.check_serving(2, 0.1) == 1


def test_an_overtaken_grant_renews_the_lease_but_changes_no_slot() -> None:
    table = _loaded_table()
    newer = _grant(((0, 1, 1),), 50)
    table.apply_grant(newer, sent_at=0.3, lease_ms=600)
    older = _grant(((0, 3, 1),), 40)
    assert table.apply_grant(older, sent_at=0.5, lease_ms=600) == []
    assert table.held_slots() == [0, 1]
    assert table.lease_valid(0.5 + 0.5)
