"""Commands carried out against a real commander handler (see harness.py)."""

from __future__ import annotations

import pytest

from keyval.admin.actions import execute
from keyval.admin.errors import AdminError, describe
from keyval.admin.grammar import parse_line
from keyval.admin.results import (
    ClusterResult,
    DoneResult,
    HelpResult,
    SlotResult,
    SlotsResult,
)
from keyval.keys import NUM_SLOTS, key_slot
from tests.admin.harness import Cluster
from wire.errors import BadRequest, NotFound, Unauthorized, Unavailable


async def run(cluster: Cluster, line: str, **remote_options: object) -> object:
    invocation = parse_line(line)
    assert invocation is not None
    remote = cluster.remote(**remote_options)  # type: ignore[arg-type]
    progress: list[str] = []
    try:
        return await execute(invocation, remote, progress.append)
    finally:
        await remote.aclose()


async def test_slots_covers_every_slot_split_over_the_drones(cluster: Cluster) -> None:
    result = await run(cluster, "slots")
    assert isinstance(result, SlotsResult)
    assert result.term == 1 and result.leader == "commander-1" and result.version >= 1
    assert sum(row.count for row in result.ranges) == NUM_SLOTS and result.unowned == 0
    assert {row.drone for row in result.ranges} == {"drone-1", "drone-2", "drone-3"}
    assert result.ranges[0].first == 0 and result.ranges[-1].last == NUM_SLOTS - 1


async def test_slots_of_one_drone_and_of_an_unknown_one(cluster: Cluster) -> None:
    result = await run(cluster, "slots drone-2")
    assert isinstance(result, SlotsResult) and result.drone == "drone-2"
    assert result.ranges and {row.drone for row in result.ranges} == {"drone-2"}
    with pytest.raises(NotFound, match=r"drone-9.*drones: drone-1, drone-2, drone-3"):
        await run(cluster, "slots drone-9")


async def test_slot_and_keyslot_name_the_owner(cluster: Cluster) -> None:
    result = await run(cluster, "slot 0")
    assert isinstance(result, SlotResult)
    assert (result.slot, result.drone, result.address, result.epoch) == (
        0,
        "drone-1",
        "drone-1:6240",
        1,
    )
    result = await run(cluster, "keyslot foo")
    assert isinstance(result, SlotResult)
    assert result.key == "foo" and result.slot == key_slot("foo") == 12182
    assert result.drone == "drone-3"


async def test_nodes_and_status_fall_back_to_the_map_without_cmd_status(cluster: Cluster) -> None:
    # The commander does not answer cmd.status yet: status says so instead of failing.
    for command in ("nodes", "status"):
        result = await run(cluster, command)
        assert isinstance(result, ClusterResult) and result.view == command
        assert not result.detailed and result.phase == ""
        assert [d.name for d in result.drones] == ["drone-1", "drone-2", "drone-3"]
        assert all(d.health == "unknown" and d.address for d in result.drones)
        assert sum(d.slots for d in result.drones) == NUM_SLOTS == result.slots_owned
        [commander] = result.commanders
        assert commander.reachable and commander.leader and commander.name == "commander-1"


async def test_move_waits_until_the_map_shows_the_new_owner(cluster: Cluster) -> None:
    invocation = parse_line("move 0 drone-2")
    assert invocation is not None
    remote = cluster.remote()
    progress: list[str] = []
    result = await execute(invocation, remote, progress.append)
    await remote.aclose()
    assert isinstance(result, DoneResult)
    assert result.data["moved"] and result.data["from"] == "drone-1"
    assert result.data["epoch"] > 1
    assert progress and "slot 0 drone-1 -> drone-2" in progress[0]
    after = await run(cluster, "slot 0")
    assert isinstance(after, SlotResult) and after.drone == "drone-2"
    again = await run(cluster, "move 0 drone-2")
    assert isinstance(again, DoneResult) and not again.data["moved"]


async def test_move_to_a_dead_drone_is_not_found(cluster: Cluster) -> None:
    with pytest.raises(NotFound, match="no live drone named 'drone-7'"):
        await run(cluster, "move 5 drone-7")


async def test_drain_moves_every_slot_away(cluster: Cluster) -> None:
    result = await run(cluster, "drain drone-3")
    assert isinstance(result, DoneResult) and result.data["slots_moved"] > 5000
    slots = await run(cluster, "slots")
    assert isinstance(slots, SlotsResult)
    assert "drone-3" not in {row.drone for row in slots.ranges}
    with pytest.raises(BadRequest, match="draining"):
        await run(cluster, "move 1 drone-3")


async def test_rebalance_reports_the_shares_it_reached(cluster: Cluster) -> None:
    result = await run(cluster, "rebalance")
    assert isinstance(result, DoneResult)
    shares = result.data["slots_per_drone"]
    assert sum(shares.values()) == 16384
    assert result.data["slots_moved"] >= 0 and result.data["map_version"] >= 1


async def test_a_non_admin_principal_gets_unauthorized_with_a_hint(cluster: Cluster) -> None:
    with pytest.raises(Unauthorized) as caught:
        await run(cluster, "move 1 drone-2", name="client", role="client")
    line = describe(caught.value)
    assert line.startswith("UNAUTHORIZED: move needs role admin")
    assert "admin.toml" in line
    # Reading the map is open to every principal (clients route with it).
    assert isinstance(await run(cluster, "slots", name="client", role="client"), SlotsResult)


async def test_an_unreachable_commander_is_unavailable(cluster: Cluster) -> None:
    with pytest.raises(Unavailable, match="no commander answered: commander-1 at memory:1"):
        await run(cluster, "slots", refuse=True)


async def test_principals_without_an_authority_identity_is_an_admin_error(
    cluster: Cluster,
) -> None:
    with pytest.raises(AdminError, match="names no ticket authority identity"):
        await run(cluster, "principals")


async def test_help_needs_no_cluster(cluster: Cluster) -> None:
    result = await run(cluster, "help principal add")
    assert isinstance(result, HelpResult)
    assert result.entries[0][0] == "principal add NAME --role ROLE [--out OUT] [--prefix PREFIX]"
