"""End-to-end continuity across commander terms: SIGKILL the leader of 3 commanders; the new
leader resumes the map with every slot at its old epoch (each owner still holds its slots), so
no drone reseeds anything and every key written before stays readable."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

import keyval
from keyval.client.aio import AsyncClient
from keyval.messages import SlotMap
from tests.e2e.cluster import LocalCluster

pytestmark = pytest.mark.e2e

KEYS = 200
LIMIT_S = 20.0  # shared CI cores are slow; the election itself takes about a second
SETTLE_S = 1.5  # after the new map: any reseed the new term caused would have started by then
POLL_S = 0.02


async def _map(kv: AsyncClient) -> SlotMap:
    router = kv.router
    return await router._fetch_map_once(router.start())


def _reseed_lines(root: Path) -> dict[str, int]:
    return {
        log.stem: log.read_text(errors="replace").count("reseeded ")
        for log in sorted((root / "logs").glob("drone-*.log"))
    }


async def _kill_the_leader(cluster: LocalCluster) -> tuple[SlotMap, SlotMap, dict[str, int]]:
    async with keyval.aconnect(cluster.client_config) as kv:
        with trio.fail_after(LIMIT_S):
            while not (before := await _map(kv)).ranges:
                await trio.sleep(POLL_S)
        for index in range(KEYS):
            await kv.put(f"continuity:{index}", index)
        reseeds_before = _reseed_lines(cluster.root)
        cluster.kill(before.leader, signal.SIGKILL)
    async with keyval.aconnect(cluster.client_config) as kv:
        with trio.fail_after(LIMIT_S):
            while True:
                try:
                    after = await _map(kv)
                except keyval.ServiceError:
                    after = before
                if after.term > before.term and after.ranges:
                    break
                await trio.sleep(POLL_S)
        await trio.sleep(SETTLE_S)
        with trio.fail_after(LIMIT_S):
            for index in range(KEYS):
                assert await kv.get(f"continuity:{index}") == index
    return before, after, reseeds_before


def test_a_new_leader_keeps_every_slot_without_a_reseed(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", drones=3, commanders=3)
    cluster.start()
    try:
        before, after, reseeds_before = trio.run(_kill_the_leader, cluster)
        reseeds_after = _reseed_lines(cluster.root)
    finally:
        cluster.stop()
    assert after.leader != before.leader
    assert len(reseeds_before) == 3 and all(reseeds_before.values()), "the first load is logged"
    assert [(f, last, d, e) for f, last, d, e in after.ranges] == [
        (f, last, d, e) for f, last, d, e in before.ranges
    ], "every slot keeps its owner and epoch"
    assert reseeds_after == reseeds_before, "no drone reloaded a slot from the db"
