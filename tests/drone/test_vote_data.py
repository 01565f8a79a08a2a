"""A drone's --data directory keeps its election vote across a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from keyval.client.config import Endpoint
from keyval.drone.daemon import (
    VOTE_FILE_NAME,
    Drone,
    DroneSettings,
    Security,
    settings_from_options,
)
from keyval.drone.vote import VoteFileError
from keyval.nodeconfig import NodeOptions
from tests.drone.harness import COMMANDER_ADDRESS, DB_ADDRESS, DRONE_ADDRESS, MemoryNet, server_auth


def drone_with_data(nursery: trio.Nursery, data: Path) -> Drone:
    net = MemoryNet(nursery)
    settings = DroneSettings(
        db=DB_ADDRESS, commanders=(Endpoint("commander-1", COMMANDER_ADDRESS),), data=data
    )
    security = Security(net.dialer("drone-1"), lambda: server_auth("drone-1"))
    return Drone("drone-1", settings, security)


def test_settings_carry_the_data_directory(tmp_path: Path) -> None:
    options = NodeOptions(
        name="drone-1",
        key=tmp_path / "k",
        authority="127.0.0.1:1",
        authority_key="00" * 32,
        data=tmp_path / "drone-1",
        extra={"db": "127.0.0.1:1", "commander": "127.0.0.1:2"},
    )
    assert settings_from_options(options).data == tmp_path / "drone-1"


async def test_a_restarted_drone_remembers_its_vote(tmp_path: Path) -> None:
    data = tmp_path / "drone-1"
    async with trio.open_nursery() as nursery:
        first = drone_with_data(nursery, data)
        await first.start_background(nursery, DRONE_ADDRESS)
        assert first.heartbeater is not None
        first.heartbeater.voter._store(7, "commander-2")
        nursery.cancel_scope.cancel()
    assert json.loads((data / VOTE_FILE_NAME).read_text()) == {
        "term": 7,
        "voted_for": "commander-2",
    }
    async with trio.open_nursery() as nursery:
        second = drone_with_data(nursery, data)
        await second.start_background(nursery, DRONE_ADDRESS)
        assert second.heartbeater is not None
        assert (second.heartbeater.voter.term, second.heartbeater.voter.voted_for) == (
            7,
            "commander-2",
        )
        nursery.cancel_scope.cancel()


async def test_a_corrupt_vote_file_stops_the_start(tmp_path: Path) -> None:
    data = tmp_path / "drone-1"
    data.mkdir()
    (data / VOTE_FILE_NAME).write_text("{not json")
    async with trio.open_nursery() as nursery:
        drone = drone_with_data(nursery, data)
        with pytest.raises(VoteFileError):
            await drone.start_background(nursery, DRONE_ADDRESS)
        nursery.cancel_scope.cancel()
