"""End-to-end live slot move: one slot with 10k keys moved under write load.

Measures the write pause for that slot as clients see it (the longest put latency on the
moving slot around the move, client retries included), the longest put latency on another
slot (which must not pause), and checks that every acknowledged write is readable afterwards.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import keyval
from auth.client import Credentials
from keyval import net
from keyval.client.aio import AsyncClient
from keyval.client.config import load_settings
from keyval.keys import NUM_SLOTS, key_slot
from keyval.messages import GetMap, MapChange, MoveSlot, SlotMap
from tests.e2e.cluster import LocalCluster, running_cluster

pytestmark = pytest.mark.e2e

log = logging.getLogger("tests.e2e.moves")

SLOT_KEYS = 10_000  # keys in the moving slot (the figure)
LOAD_CONCURRENCY = 64
WRITERS = 4  # writer tasks on the moving slot, plus one on another slot
PAUSE_LIMIT_S = 1.0  # asserted in the suite (target 100 ms; shared CI cores are slower)
MOVE_WAIT_S = 30.0
CLI_TIMEOUT_S = 60.0


@pytest.fixture
def two_drones(tmp_path: Path) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path / "cluster", drones=2) as running:
        yield running


@dataclass
class Writer:
    prefix: str
    acked: dict[str, int] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    errors: list[str] = field(default_factory=list)


async def _write_loop(kv: AsyncClient, writer: Writer, stop: trio.Event) -> None:
    counter = 0
    while not stop.is_set():
        counter += 1
        key = f"{writer.prefix}{counter % 200}"
        started = trio.current_time()
        try:
            await kv.put(key, counter)
        except keyval.ServiceError as error:
            writer.errors.append(f"{key}: {error}")
            continue
        writer.latencies.append((started, trio.current_time() - started))
        writer.acked[key] = counter


async def _admin(cluster: LocalCluster) -> net.Connection:
    settings = load_settings(cluster.root / "admin.toml")
    assert settings.identity is not None
    identity = settings.identity
    credentials = Credentials("admin", identity.key, identity.authority, identity.authority_key)
    endpoint = settings.commanders[0]
    auth = await credentials.client_auth(endpoint.name)
    return await net.open_connection(endpoint.address, auth)


async def _owner(admin: net.Connection, slot: int) -> tuple[str, int]:
    reply = await admin.request(GetMap())
    assert isinstance(reply, SlotMap)
    for first, last, drone, epoch in reply.ranges:
        if first <= slot <= last:
            return drone, epoch
    return "", 0


async def test_live_move_of_a_10k_key_slot_under_write_load(two_drones: LocalCluster) -> None:
    slot = key_slot("{mv}")
    other_slot = key_slot("{other}")
    async with keyval.aconnect(two_drones.client_config) as kv:
        limiter = trio.CapacityLimiter(LOAD_CONCURRENCY)

        async def put(index: int) -> None:
            async with limiter:
                await kv.put(f"{{mv}}:{index}", index)

        async with trio.open_nursery() as nursery:
            for index in range(SLOT_KEYS):
                nursery.start_soon(put, index)
        admin = await _admin(two_drones)
        source, epoch = await _owner(admin, slot)
        target = "drone-1" if source == "drone-2" else "drone-2"
        moving = [Writer(f"{{mv}}:w{index}:") for index in range(WRITERS)]
        steady = Writer("{other}:")
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for writer in [*moving, steady]:
                nursery.start_soon(_write_loop, kv, writer, stop)
            await trio.sleep(0.5)
            move_started = trio.current_time()
            change = await admin.request(MoveSlot(slot, target))
            assert isinstance(change, MapChange)
            with trio.fail_after(MOVE_WAIT_S):
                while await _owner(admin, slot) != (target, epoch + 1):
                    await trio.sleep(0.02)
            moved_at = trio.current_time()
            await trio.sleep(0.5)
            stop.set()
        await admin.aclose()
        window = [
            seconds
            for writer in moving
            for started, seconds in writer.latencies
            if move_started - 1 <= started <= moved_at + 0.5
        ]
        pause_s = max(window)
        steady_max_s = max(s for started, s in steady.latencies if started >= move_started - 1)
        figures = {
            "slot_keys": SLOT_KEYS,
            "slot_write_pause_ms": round(pause_s * 1000, 1),
            "other_slot_max_put_ms": round(steady_max_s * 1000, 1),
            "move_to_saved_ms": round((moved_at - move_started) * 1000, 1),
            "writes_on_slot": sum(len(w.latencies) for w in moving),
        }
        log.warning("live move figures: %s", figures)
        print(f"\nlive move figures: {figures}")
        errors = [error for writer in [*moving, steady] for error in writer.errors]
        assert errors == []
        acked = {k: v for writer in [*moving, steady] for k, v in writer.acked.items()}
        got = {key: await kv.get(key) for key in acked}
        assert {k: v for k, v in acked.items() if got[k] != v} == {}
        loaded = await kv.get_many([f"{{mv}}:{index}" for index in range(0, SLOT_KEYS, 11)])
        assert loaded == {f"{{mv}}:{index}": index for index in range(0, SLOT_KEYS, 11)}
        assert slot != other_slot
        assert pause_s < PAUSE_LIMIT_S


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyval", *argv],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


async def test_add_drone_gets_a_fair_share_and_slots_cli(two_drones: LocalCluster) -> None:
    async with keyval.aconnect(two_drones.client_config) as kv:
        for index in range(200):
            await kv.put(f"join:{index}", index)
    added = await trio.to_thread.run_sync(
        _cli, "cluster", "add-drone", "--dir", str(two_drones.root)
    )
    assert added.returncode == 0, added.stderr
    assert "drone-3 serving on" in added.stdout
    assert any(node["name"] == "drone-3" for node in two_drones.nodes())
    with trio.fail_after(MOVE_WAIT_S):
        while True:
            shown = await trio.to_thread.run_sync(
                _cli, "slots", "--config", two_drones.client_config, "--json"
            )
            assert shown.returncode == 0, shown.stderr
            slot_map = json.loads(shown.stdout)
            counts: dict[str, int] = {}
            for row in slot_map["ranges"]:
                counts[row["drone"]] = counts.get(row["drone"], 0) + row["last"] - row["first"] + 1
            if counts.get("drone-3", 0) >= NUM_SLOTS // 3 - 1:
                break
            await trio.sleep(0.1)
    assert sum(counts.values()) == NUM_SLOTS
    assert max(counts.values()) - min(counts.values()) <= 1
    async with keyval.aconnect(two_drones.client_config) as kv:
        for index in range(200):
            assert await kv.get(f"join:{index}") == index
    text = await trio.to_thread.run_sync(_cli, "slots", "--config", two_drones.client_config)
    assert text.returncode == 0 and "drone-3" in text.stdout and "epoch" in text.stdout
    missing = await trio.to_thread.run_sync(_cli, "slots", "--config", "/nonexistent.toml")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
