"""End-to-end durability: a db crash, a whole-cluster restart, retried operation ids,
per-principal key prefixes. Each test runs its own cluster because it breaks it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import keyval
from keyval.messages import Put, Written
from tests.e2e.cluster import LocalCluster, running_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path / "cluster") as running:
        yield running


def _restart_db(cluster: LocalCluster) -> subprocess.Popen[bytes]:
    """SIGKILL the db, then start it again at the same address with the same data."""
    db = cluster.node("db")
    os.kill(db["pid"], signal.SIGKILL)
    argv = [*db["argv"], "--listen", db["address"]]
    log = (cluster.root / "logs" / "db-restarted.log").open("ab")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def test_db_crash_and_cluster_restart_lose_no_acknowledged_write(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.start()
    restarted: subprocess.Popen[bytes] | None = None
    acknowledged: dict[str, int] = {}
    try:
        with keyval.connect(cluster.client_config) as kv:
            for index in range(300):
                kv.put(f"durable:{index}", index)
                acknowledged[f"durable:{index}"] = index
            restarted = _restart_db(cluster)
            # Writes during and after the db's restart are retried by the client until the
            # drones reach the new db process; each one acknowledged must survive.
            for index in range(300, 400):
                kv.put(f"durable:{index}", index)
                acknowledged[f"durable:{index}"] = index
        assert cluster.stop() == 0
    finally:
        cluster.stop()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(30)
    # Same folder again: the cluster resumes from the db with every acknowledged write.
    resumed = LocalCluster(cluster.root)
    resumed.start()
    try:
        with keyval.connect(resumed.client_config) as kv:
            found = kv.get_many(list(acknowledged))
        missing = {key for key in acknowledged if found.get(key) != acknowledged[key]}
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {sorted(missing)[:5]}"
    finally:
        resumed.stop()


async def test_retransmitted_operation_id_applies_once(own_cluster: LocalCluster) -> None:
    from keyval.keys import key_slot

    async with keyval.aconnect(own_cluster.client_config) as kv:
        router = kv.router
        slot = key_slot("retry-me")
        first = Put(key="retry-me", value="first", op_id=b"A" * 16)
        second = Put(key="retry-me", value="second", op_id=b"B" * 16)
        reply_first = await router.call(slot, first)
        reply_second = await router.call(slot, second)
        assert isinstance(reply_first, Written) and isinstance(reply_second, Written)
        assert reply_second.version > reply_first.version
        replayed = await router.call(slot, first)  # a retransmission of the first put
        assert isinstance(replayed, Written)
        assert replayed.version == reply_first.version  # the first answer, again
        entry = await kv.get_entry("retry-me")
        assert entry.value == "second" and entry.version == reply_second.version


def test_principal_key_prefixes_are_enforced(own_cluster: LocalCluster, tmp_path: Path) -> None:
    root = own_cluster.root
    key_file = tmp_path / "limited.key"
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyval",
            "--config",
            str(root / "admin.toml"),
            "principal",
            "add",
            "limited",
            "--role",
            "client",
            "--prefix",
            "app:",
            "--out",
            str(key_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    config = (root / "client.toml").read_text()
    config = config.replace('name = "client"', 'name = "limited"')
    config = config.replace(str(root / "keys" / "client.key"), str(key_file))
    limited_toml = tmp_path / "limited.toml"
    limited_toml.write_text(config)
    with keyval.connect(str(limited_toml)) as kv:
        kv.put("app:allowed", 1)
        assert kv.get("app:allowed") == 1
        with pytest.raises(keyval.Unauthorized) as refused:
            kv.put("other:denied", 1)
        assert "app:" in str(refused.value)
    with keyval.connect(own_cluster.client_config) as kv:
        assert kv.get("other:denied") is None
