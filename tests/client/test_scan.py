from __future__ import annotations

from typing import Any

import pytest

from keyval.client.aio import AsyncClient
from keyval.client.errors import NoOwner
from keyval.client.scanning import SCAN_PAGE_ITEMS, Item
from keyval.keys import canonical_key, key_slot
from keyval.messages import Scan
from tests.client.fakes import FakeCluster
from wire.errors import BadRequest


def scans(cluster: FakeCluster) -> dict[str, list[Scan]]:
    return {d.name: [m for m in d.requests if isinstance(m, Scan)] for d in cluster.drones.values()}


def seed(cluster: FakeCluster, keys: list[str]) -> None:
    """Put keys straight into their owners' data (fast, no requests)."""
    for index, key in enumerate(keys):
        owner = cluster.owner[key_slot(key)]
        assert owner is not None
        cluster.drone_named(owner).data[canonical_key(key)] = (key, index, index + 1)


async def collect(kv: AsyncClient, *args: Any, **kwargs: Any) -> list[Item]:
    return [item async for item in kv.scan(*args, **kwargs)]


async def test_scan_over_every_drone_is_merged_in_key_order(
    kv: AsyncClient, cluster: FakeCluster
) -> None:
    keys = [f"user:{i:03d}" for i in range(60)] + ["other"]
    seed(cluster, keys)
    items = await collect(kv, "user:")
    assert [item[0] for item in items] == sorted(k for k in keys if k.startswith("user:"))
    assert all(len(per) >= 1 for per in scans(cluster).values())  # every drone was asked
    assert all(m.slot is None for per in scans(cluster).values() for m in per)


async def test_scan_pages_through_large_results(kv: AsyncClient, cluster: FakeCluster) -> None:
    keys = [f"p{i:05d}" for i in range(SCAN_PAGE_ITEMS * 2 + 50)]
    seed(cluster, keys)
    items = await collect(kv, "p")
    assert [item[0] for item in items] == keys


async def test_scan_limit(kv: AsyncClient, cluster: FakeCluster) -> None:
    seed(cluster, [f"l{i:02d}" for i in range(30)])
    items = await collect(kv, "l", limit=7)
    assert [item[0] for item in items] == [f"l{i:02d}" for i in range(7)]


async def test_a_tag_prefix_asks_only_the_slot_owner(kv: AsyncClient, cluster: FakeCluster) -> None:
    keys = [f"{{acct}}:{i}" for i in range(5)]
    seed(cluster, [*keys, "elsewhere"])
    items = await collect(kv, "{acct}:")
    assert [item[0] for item in items] == sorted(keys)
    owner = cluster.owner[key_slot("{acct}:")]
    asked = {name for name, per in scans(cluster).items() if per}
    assert asked == {owner}
    assert scans(cluster)[owner or ""][0].slot == key_slot("{acct}:")


async def test_range_scan(kv: AsyncClient, cluster: FakeCluster) -> None:
    seed(cluster, ["a", "b", "c", "d"])
    items = await collect(kv, start="b", end="d")
    assert [item[0] for item in items] == ["b", "c"]


async def test_scan_refuses_when_slots_have_no_owner(kv: AsyncClient, cluster: FakeCluster) -> None:
    cluster.owner[5] = None
    cluster.map_version += 1
    await kv.router.refresh(kv.router.start(), seen=kv.router.refreshes)
    with pytest.raises(NoOwner):
        await collect(kv, "x")


@pytest.mark.parametrize(
    "arguments",
    [{"prefix": 5}, {"prefix": 1.5}, {"start": True}, {"limit": 0}, {"limit": "3"}],
)
async def test_bad_scan_arguments(kv: AsyncClient, arguments: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        await collect(kv, **arguments)
