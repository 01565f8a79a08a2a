from __future__ import annotations

import pytest

from keyval.client.routing import Route, SlotTable, prefix_slot
from keyval.keys import NUM_SLOTS, key_slot
from keyval.messages import SlotMap
from wire.errors import BadRequest


def two_drone_map(version: int = 3) -> SlotMap:
    return SlotMap(
        term=2,
        version=version,
        ranges=[(0, 8191, "drone-1", 5), (8192, 16000, "drone-2", 6)],
        drones={"drone-1": "h1:1", "drone-2": "h2:2"},
    )


def test_table_routes_every_slot_of_its_ranges() -> None:
    table = SlotTable.from_map(two_drone_map())
    assert table.version == 3 and table.term == 2
    assert table.route(0) == Route("drone-1", "h1:1", 5)
    assert table.route(8191) == Route("drone-1", "h1:1", 5)
    assert table.route(8192) == Route("drone-2", "h2:2", 6)
    assert table.route(16001) is None  # a gap: no owner
    assert table.drones() == {"drone-1": "h1:1", "drone-2": "h2:2"}


def test_a_drone_without_an_address_is_no_route() -> None:
    reply = SlotMap(term=1, version=1, ranges=[(0, 10, "ghost", 1)], drones={})
    assert SlotTable.from_map(reply).route(5) is None


@pytest.mark.parametrize("bad", [(-1, 5), (5, 4), (0, NUM_SLOTS)])
def test_ranges_outside_the_slot_space_are_refused(bad: tuple[int, int]) -> None:
    reply = SlotMap(term=1, version=1, ranges=[(*bad, "d", 1)], drones={"d": "h:1"})
    with pytest.raises(BadRequest):
        SlotTable.from_map(reply)


def test_moved_patches_a_slot_only_with_a_newer_epoch() -> None:
    table = SlotTable.from_map(two_drone_map())
    newer = {"slot": 10, "epoch": 9, "owner": "drone-2", "address": "h2:2"}
    assert table.apply_moved(newer)
    assert table.route(10) == Route("drone-2", "h2:2", 9)
    stale = {"slot": 11, "epoch": 1, "owner": "drone-2", "address": "h2:2"}
    assert not table.apply_moved(stale)
    assert table.route(11) == Route("drone-1", "h1:1", 5)


@pytest.mark.parametrize(
    "detail",
    [
        {},
        {"slot": NUM_SLOTS, "epoch": 9, "owner": "d", "address": "h:1"},
        {"slot": 1, "epoch": "9", "owner": "d", "address": "h:1"},
        {"slot": 1, "epoch": 9, "owner": "", "address": ""},  # owner unknown
    ],
)
def test_malformed_or_empty_moved_details_leave_the_table(detail: dict[str, object]) -> None:
    table = SlotTable.from_map(two_drone_map())
    assert not table.apply_moved(detail)


def test_prefix_with_a_whole_tag_pins_one_slot() -> None:
    assert prefix_slot("{user1}:") == key_slot("{user1}:anything")
    assert prefix_slot(b"x{t}") == key_slot(b"x{t}y")


@pytest.mark.parametrize("prefix", ["user:", "{user", "{}x", "", b"plain", 12])
def test_prefix_without_a_whole_tag_spreads(prefix: str | bytes | int) -> None:
    assert prefix_slot(prefix) is None
