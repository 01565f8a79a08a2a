from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import trio

from keyval.client.aio import AsyncClient, aconnect
from keyval.client.config import ClientSettings, Endpoint
from tests.client.fakes import FakeCluster, MemoryDialer


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(drones=2, commanders=2)


def settings_for(cluster: FakeCluster, *, deadline_s: float = 10.0) -> ClientSettings:
    return ClientSettings(
        commanders=tuple(
            Endpoint(f"commander-{i + 1}", address) for i, address in enumerate(cluster.commanders)
        ),
        deadline_s=deadline_s,
    )


@pytest.fixture
async def kv(cluster: FakeCluster, nursery: trio.Nursery) -> AsyncIterator[AsyncClient]:
    # A test that needs virtual time asks for `autojump_clock` itself: pytest-trio only
    # installs a clock the test function requests directly.
    settings = settings_for(cluster)
    dialer = MemoryDialer(cluster, nursery)
    async with aconnect(settings, dialer=dialer, rng=random.Random(7)) as client:
        yield client
