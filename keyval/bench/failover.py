"""Failover timings on a local cluster, measured as tests/e2e/test_failover.py and
tests/e2e/test_election.py measure them (same method, the bench's own cluster):

- drone loss: put `keys` keys, start a light write load, SIGKILL drone-2; the time from the
  kill until a fresh client sees a map without drone-2 and has read one key of every slot
  drone-2 held (each get retries while its slot reseeds from the db);
- leader loss: with 3 commanders, SIGKILL the one that leads; the time until a commander of a
  newer term serves a slot map.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

import trio

from keyval.bench.cluster import ClusterHandle
from keyval.bench.errors import BenchError
from keyval.client.aio import AsyncClient, aconnect
from keyval.keys import NUM_SLOTS, key_slot
from keyval.messages import SlotMap
from wire.errors import WireError

VICTIM_DRONE = "drone-2"
WRITERS = 8  # concurrent writers making the steady load during the kill (as the e2e test)
FILL_TASKS = 64  # concurrent puts while filling
PROBE_TASKS = 64  # concurrent probe reads (the e2e test's LOAD_CONCURRENCY)
SETTLE_S = 0.5  # load before the kill, and after the recovery
POLL_S = 0.01  # how often the map is asked for after a kill
LIMIT_S = 60.0  # a failover slower than this is reported as a failure, not waited for


@dataclass
class _Load:
    writes: int = 0
    errors: list[str] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)


async def _writer(kv: AsyncClient, load: _Load, index: int) -> None:
    counter = 0
    while not load.stop.is_set():
        counter += 1
        try:
            await kv.put(f"failover:{index}:{counter % 100}", counter)
            load.writes += 1
        except WireError as error:
            load.errors.append(f"{type(error).__name__}: {error}")


async def _fill(kv: AsyncClient, keys: int) -> None:
    indexes = iter(range(keys))

    async def putter() -> None:
        for index in indexes:
            await kv.put(f"k:{index}", index)

    async with trio.open_nursery() as nursery:
        for _ in range(min(FILL_TASKS, keys)):
            nursery.start_soon(putter)


async def _read_all(kv: AsyncClient, keys: list[str]) -> None:
    """One get per key, PROBE_TASKS at a time (a get retries while its slot reseeds)."""
    pending = iter(keys)

    async def reader() -> None:
        for key in pending:
            await kv.get(key)

    async with trio.open_nursery() as nursery:
        for _ in range(min(PROBE_TASKS, len(keys))):
            nursery.start_soon(reader)


def probe_keys(slots: set[int]) -> list[str]:
    """One key per slot in `slots`."""
    found: dict[int, str] = {}
    candidate = 0
    while len(found) < len(slots):
        key = f"probe:{candidate}"
        slot = key_slot(key)
        if slot in slots and slot not in found:
            found[slot] = key
        candidate += 1
    return list(found.values())


async def _slots_of(kv: AsyncClient, drone: str) -> set[int]:
    table = await kv.router.current_table(kv.router.start())
    return {
        slot
        for slot in range(NUM_SLOTS)
        if (route := table.route(slot)) is not None and route.drone == drone
    }


def _kill(handle: ClusterHandle, name: str) -> None:
    for process in handle.processes():
        if process.name == name:
            os.kill(process.pid, signal.SIGKILL)
            return
    raise BenchError(f"no process {name} in {handle.root / 'nodes.json'}")


async def drone_failover(handle: ClusterHandle, keys: int) -> dict[str, Any]:
    async with aconnect(handle.client_config) as kv:
        await _fill(kv, keys)
        dead_slots = await _slots_of(kv, VICTIM_DRONE)
        if not dead_slots:
            raise BenchError(f"{VICTIM_DRONE} owns no slots: nothing to fail over")
        probes = probe_keys(dead_slots)
        load = _Load()
        async with trio.open_nursery() as nursery:
            for index in range(WRITERS):
                nursery.start_soon(_writer, kv, load, index)
            await trio.sleep(SETTLE_S)
            killed_at = trio.current_time()
            _kill(handle, VICTIM_DRONE)
            async with aconnect(handle.client_config) as fresh:
                with trio.fail_after(LIMIT_S):
                    while True:
                        await fresh.router.refresh(
                            fresh.router.start(), seen=fresh.router.refreshes
                        )
                        table = fresh.router.table
                        if table is not None and VICTIM_DRONE not in table.drones():
                            break
                        await trio.sleep(POLL_S)
                    detected_s = trio.current_time() - killed_at
                    await _read_all(fresh, probes)
            recovery_s = trio.current_time() - killed_at
            await trio.sleep(SETTLE_S)
            load.stop.set()
        probe_started = trio.current_time()
        await _read_all(kv, probes)  # the probe's own cost once settled, for comparison
        probe_settled_s = trio.current_time() - probe_started
    return {
        "event": "drone loss",
        "keys": keys,
        "seconds": recovery_s,
        "map_changed_s": detected_s,
        "probe_read_settled_s": probe_settled_s,
        "dead_slots": len(dead_slots),
        "client_errors": len(load.errors),
        "writes": load.writes,
        "measured_as": (
            f"SIGKILL {VICTIM_DRONE} -> map without it {detected_s:.3f} s -> a key of each of "
            f"its {len(dead_slots)} slots read (same reads settled: {probe_settled_s:.3f} s)"
        ),
    }


async def _current_map(kv: AsyncClient) -> SlotMap:
    # The router's own map fetch (tests/e2e/test_election.py uses it too): the client has no
    # public call that returns the map's leader and term.
    return await kv.router._fetch_map_once(kv.router.start())


async def leader_failover(handle: ClusterHandle) -> dict[str, Any]:
    load = _Load()
    async with aconnect(handle.client_config) as kv:
        with trio.fail_after(LIMIT_S):
            while not (before := await _current_map(kv)).ranges:
                await trio.sleep(POLL_S)
        async with trio.open_nursery() as nursery:
            for index in range(WRITERS):
                nursery.start_soon(_writer, kv, load, index)
            await trio.sleep(SETTLE_S)
            killed_at = trio.current_time()
            _kill(handle, before.leader)
            async with aconnect(handle.client_config) as fresh:
                with trio.fail_after(LIMIT_S):
                    while True:
                        try:
                            after = await _current_map(fresh)
                        except WireError:
                            after = before
                        if after.term > before.term and after.leader != before.leader:
                            break
                        await trio.sleep(POLL_S)
            took_s = trio.current_time() - killed_at
            await trio.sleep(SETTLE_S)
            load.stop.set()
    return {
        "event": "leader loss",
        "keys": None,
        "seconds": took_s,
        "client_errors": len(load.errors),
        "writes": load.writes,
        "measured_as": f"SIGKILL {before.leader} -> {after.leader} serves term {after.term}",
    }
