"""End-to-end failover: SIGKILL one of three drones under a steady client load.

Measures, on real processes over loopback:
- recovery: from the kill until a read of one key in every slot the dead drone held answers
  (the client library retries MOVED/UNAVAILABLE/connection errors under its default deadline);
- probe cost: the same reads once the cluster is settled (the part of `recovery` that is the
  probe's own work, not the failover's);
- client-visible errors: exceptions that reached the writers (the target is none);
- durability: every acknowledged (durable) write is readable afterwards with its last value.

The default run loads 10k keys; the 100k-key run of the issue is marked slow.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import keyval
from keyval.bench.failover import probe_keys
from keyval.client.aio import AsyncClient
from keyval.keys import NUM_SLOTS
from tests.e2e.cluster import LocalCluster, running_cluster

pytestmark = pytest.mark.e2e

log = logging.getLogger("tests.e2e.failover")

WRITERS = 8  # concurrent writer tasks making the steady load
LOAD_CONCURRENCY = 64  # tasks writing the initial keys
RECOVERY_TARGET_S = 1.0  # the target with default timing (asserted loosely below)
RECOVERY_LIMIT_S = 5.0
MAP_POLL_S = 0.01  # how often the probe asks the commander for the map after the kill
PROBE_LIMIT_S = 60.0  # what the default suite asserts: shared CI cores are slow


@pytest.fixture
def three_drones(tmp_path: Path) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path / "cluster", drones=3) as running:
        yield running


@dataclass
class Load:
    acked: dict[str, int] = field(default_factory=dict)  # key -> last acknowledged value
    errors: list[str] = field(default_factory=list)
    writes: int = 0
    stop: trio.Event = field(default_factory=trio.Event)


async def _writer(kv: AsyncClient, load: Load, index: int) -> None:
    counter = 0
    while not load.stop.is_set():
        key = f"load:{index}:{counter % 500}"
        counter += 1
        try:
            await kv.put(key, counter)
        except keyval.ServiceError as error:  # visible to the application: counted
            load.errors.append(f"{key}: {error}")
            continue
        load.acked[key] = counter
        load.writes += 1


async def _fill(kv: AsyncClient, keys: int) -> None:
    limiter = trio.CapacityLimiter(LOAD_CONCURRENCY)

    async def put(index: int) -> None:
        async with limiter:
            await kv.put(f"k:{index}", index)

    async with trio.open_nursery() as nursery:
        for index in range(keys):
            nursery.start_soon(put, index)


async def _read_all(kv: AsyncClient, keys: list[str]) -> dict[str, object]:
    """Read `keys` one get each (get follows MOVED and refreshes the map on a dead drone)."""
    limiter = trio.CapacityLimiter(LOAD_CONCURRENCY)
    values: dict[str, object] = {}

    async def get(key: str) -> None:
        async with limiter:
            values[key] = await kv.get(key)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(get, key)
    return values


async def _probe_until_served(cluster: LocalCluster, victim: str, probes: list[str]) -> float:
    """Return once every probe key answered a get; returns when the map dropped `victim`.

    A fresh client polls the commander's map until `victim` owns nothing (detection), then
    reads every probe key (each get retries UNAVAILABLE while its slot reseeds)."""
    async with keyval.aconnect(cluster.client_config) as fresh:
        with trio.fail_after(PROBE_LIMIT_S):
            while True:
                await fresh.router.refresh(fresh.router.start(), seen=fresh.router.refreshes)
                table = fresh.router.table
                assert table is not None
                if victim not in table.drones():
                    break
                await trio.sleep(MAP_POLL_S)
            detected_at = trio.current_time()
            await _read_all(fresh, probes)
    return detected_at


async def _slots_of(kv: AsyncClient, drone: str) -> set[int]:
    await kv.router.refresh(kv.router.start(), seen=kv.router.refreshes)
    table = kv.router.table
    assert table is not None
    slots = set()
    for slot in range(NUM_SLOTS):
        route = table.route(slot)
        if route is not None and route.drone == drone:
            slots.add(slot)
    return slots


async def _failover(cluster: LocalCluster, keys: int) -> dict[str, float]:
    async with keyval.aconnect(cluster.client_config) as kv:
        await _fill(kv, keys)
        victim = "drone-2"
        dead_slots = await _slots_of(kv, victim)
        assert 0 < len(dead_slots) < NUM_SLOTS
        probes = probe_keys(dead_slots)
        load = Load()
        async with trio.open_nursery() as nursery:
            for index in range(WRITERS):
                nursery.start_soon(_writer, kv, load, index)
            await trio.sleep(0.5)
            writes_before = load.writes
            killed_at = trio.current_time()
            cluster.kill(victim, signal.SIGKILL)
            detected_at = await _probe_until_served(cluster, victim, probes)
            recovered_s = trio.current_time() - killed_at
            detected_s = detected_at - killed_at
            await trio.sleep(0.5)
            load.stop.set()
        assert load.writes > writes_before
    async with keyval.aconnect(cluster.client_config) as kv:  # the map after the failover
        got = await _read_all(kv, list(load.acked))
        lost = {k: v for k, v in load.acked.items() if got.get(k) != v}
        assert lost == {}
        sample = [f"k:{index}" for index in range(0, keys, max(1, keys // 2000))]
        values = await _read_all(kv, sample)
        assert values == {key: int(key[2:]) for key in sample}
        probe_started = trio.current_time()
        await _read_all(kv, probes)
        probe_read_s = trio.current_time() - probe_started
        figures = {
            "keys": float(keys),
            "dead_slots": float(len(dead_slots)),
            "recovery_s": recovered_s,
            "map_changed_s": detected_s,
            "probe_read_settled_s": probe_read_s,
            "writes_during_run": float(load.writes),
            "client_errors": float(len(load.errors)),
        }
        log.warning("failover figures: %s", figures)
        print(f"\nfailover figures: {figures}; first errors: {load.errors[:3]}")
        assert load.errors == []
        return figures


async def test_kill_one_drone_under_load_10k(three_drones: LocalCluster) -> None:
    figures = await _failover(three_drones, 10_000)
    assert figures["recovery_s"] < RECOVERY_LIMIT_S, three_drones.logs()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KEYVAL_SLOW"), reason="set KEYVAL_SLOW=1 for long runs")
async def test_kill_one_drone_under_load_100k(three_drones: LocalCluster) -> None:
    figures = await _failover(three_drones, 100_000)
    assert figures["recovery_s"] < RECOVERY_LIMIT_S, three_drones.logs()
