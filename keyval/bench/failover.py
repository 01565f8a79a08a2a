"""Failover timings on a local cluster, measured as tests/e2e/test_failover.py and
tests/e2e/test_election.py measure them (same method, the bench's own cluster):

- drone loss: put `keys` keys on each of the 3 drones (the issue's "100k keys per drone":
  drone-2 holds exactly `keys`), start a light write load, SIGKILL drone-2; the time from the
  kill until a fresh client sees a map without drone-2 and has read one key of every slot
  drone-2 held (each get retries while its slot reseeds from the db). The phases in between
  (declared failed, map saved, reseeds started and done) come from the cluster's logs
  (keyval.bench.timeline);
- leader loss: with 3 commanders, SIGKILL the one that leads; the time until a commander of a
  newer term serves a slot map.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from keyval.bench.cluster import ClusterHandle
from keyval.bench.errors import BenchError
from keyval.bench.timeline import read_phases
from keyval.client.aio import AsyncClient, aconnect
from keyval.client.txn import AsyncTransaction
from keyval.keys import NUM_SLOTS, key_slot
from keyval.messages import SlotMap
from wire.errors import WireError

VICTIM_DRONE = "drone-2"
WRITERS = 8  # concurrent writers making the steady load during the kill (as the e2e test)
# Concurrent fill transactions: a few keep the drones and the db busy; more made the cluster's
# heartbeats late on 2 shared cores (leases lapsed while filling).
FILL_TASKS = 4
# Keys one fill transaction writes (all on one drone, so it commits in one step and one group
# commit): 300k keys take 3000 transactions, not 300k puts. Larger ones (500) held a drone's
# event loop long enough, on the loaded 2-core machine, to make heartbeats late while filling.
FILL_TXN_KEYS = 100
# Tries of one fill transaction: a freshly started cluster on busy cores may still be moving
# slots (a lease lapsed in start-up), so a chunk can outlive its transaction's time bound.
FILL_ATTEMPTS = 5
FILL_RETRY_S = 0.5  # pause before trying a failed fill transaction again (the map settles)
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


def fill_keys(owners: dict[int, str], drones: list[str], per_drone: int) -> Iterator[list[str]]:
    """Keys `k:0`, `k:1`, ... assigned by `owners` (slot -> drone) until each of `drones` holds
    `per_drone`, in lists of at most FILL_TXN_KEYS keys of one drone (a key whose drone is
    full, or that no drone of `drones` owns, is skipped)."""
    counts = dict.fromkeys(drones, 0)
    chunks: dict[str, list[str]] = {drone: [] for drone in drones}
    index = 0
    while any(count < per_drone for count in counts.values()):
        key = f"k:{index}"
        index += 1
        owner = owners.get(key_slot(key))
        if owner not in counts or counts[owner] >= per_drone:
            continue
        counts[owner] += 1
        chunks[owner].append(key)
        if len(chunks[owner]) == FILL_TXN_KEYS or counts[owner] == per_drone:
            yield chunks[owner]
            chunks[owner] = []


async def _fill(kv: AsyncClient, per_drone: int) -> None:
    """Put `per_drone` keys on every drone (value: the key's number), a transaction per chunk."""
    owners = await _owners(kv)
    chunks = fill_keys(owners, sorted(set(owners.values())), per_drone)

    async def writer() -> None:
        for chunk in chunks:

            async def write(tx: AsyncTransaction, keys: list[str] = chunk) -> None:
                for key in keys:
                    await tx.put(key, int(key[2:]))

            for attempt in range(1, FILL_ATTEMPTS + 1):
                try:
                    await kv.transact(write)
                    break
                except WireError:
                    if attempt == FILL_ATTEMPTS:
                        raise
                    await trio.sleep(FILL_RETRY_S)

    async with trio.open_nursery() as nursery:
        for _ in range(FILL_TASKS):
            nursery.start_soon(writer)


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


async def _owners(kv: AsyncClient) -> dict[int, str]:
    """slot -> owning drone, from the current map."""
    table = await kv.router.current_table(kv.router.start())
    return {
        slot: route.drone for slot in range(NUM_SLOTS) if (route := table.route(slot)) is not None
    }


async def _slots_of(kv: AsyncClient, drone: str) -> set[int]:
    return {slot for slot, owner in (await _owners(kv)).items() if owner == drone}


def _kill(handle: ClusterHandle, name: str) -> None:
    for process in handle.processes():
        if process.name == name:
            os.kill(process.pid, signal.SIGKILL)
            return
    raise BenchError(f"no process {name} in {handle.root / 'nodes.json'}")


async def drone_failover(handle: ClusterHandle, keys: int) -> dict[str, Any]:
    """Drone loss with `keys` keys on each drone (see the module docstring)."""
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
            killed_at_unix_s = time.time()  # the cluster's logs are stamped in wall-clock time
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
    phases = read_phases(handle.root / "logs", VICTIM_DRONE, killed_at_unix_s)
    return {
        "event": "drone loss",
        "keys": keys,  # on the killed drone (each of the 3 drones holds as many)
        "seconds": recovery_s,
        "map_changed_s": detected_s,
        "probe_read_settled_s": probe_settled_s,
        **phases.as_row(),
        "dead_slots": len(dead_slots),
        "client_errors": len(load.errors),
        "writes": load.writes,
        "measured_as": (
            f"SIGKILL {VICTIM_DRONE} ({keys:,} keys on each drone) -> "
            f"{phases.summary() or 'no log timeline'} -> client map without it "
            f"{detected_s:.3f} -> a key of each of its {len(dead_slots)} slots read "
            f"(same reads settled: {probe_settled_s:.3f} s)"
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
