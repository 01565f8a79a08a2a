from __future__ import annotations

import pytest
import trio

from tests.admin.harness import Cluster


@pytest.fixture
async def cluster(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> Cluster:
    running = Cluster(nursery, drones=3)
    await running.start()
    return running
