"""The load a drone reports in its heartbeats: keys, resident memory, requests per second."""

from __future__ import annotations

import trio

from keyval.drone.state import DroneState, resident_bytes


class _NoDb:
    """The load report never talks to the db."""


async def test_load_reports_memory_and_request_rate(autojump_clock: trio.abc.Clock) -> None:
    state = DroneState("drone-1", _NoDb())  # type: ignore[arg-type]
    first = state.load()
    assert first["keys"] == 0 and first["ops_per_s"] == 0  # no earlier mark to rate against
    assert first["bytes"] == resident_bytes() or first["bytes"] > 0
    state.requests_served += 500
    await trio.sleep(2.0)
    assert state.load()["ops_per_s"] == 250
    await trio.sleep(1.0)
    assert state.load()["ops_per_s"] == 0
