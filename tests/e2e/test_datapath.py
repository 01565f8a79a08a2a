"""End-to-end: the data path on real daemons (`keyval cluster up`) over loopback TCP.

Runs once on SQLite and once on PostgreSQL (when KEYVAL_TEST_POSTGRES names a server).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest
import trio

import keyval
from keyval.keys import Key, key_slot
from tests.e2e.cluster import LocalCluster

pytestmark = pytest.mark.e2e


def test_put_get_delete_round_trip(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        version = kv.put("greeting", "hello")
        assert version > 0
        assert kv.get("greeting") == "hello"
        entry = kv.get_entry("greeting")
        assert entry.version == version
        kv.put(b"greeting", {"nested": [1, 2.5, None, True, b"\x00"]})
        kv.put(1, 42)
        assert kv.get(b"greeting") == {"nested": [1, 2.5, None, True, b"\x00"]}
        assert kv.get(1) == 42
        assert kv.get("greeting") == "hello"  # "greeting", b"greeting" are distinct keys
        assert kv.delete("greeting") is True
        assert kv.get("greeting") is None
        assert kv.get("greeting", "gone") == "gone"
        assert kv.delete("greeting") is False


def test_versions_rise_and_cas(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        first = kv.put("cas-key", 1)
        second = kv.put("cas-key", 2)
        assert second > first
        third = kv.cas("cas-key", second, 3)
        assert third > second
        with pytest.raises(keyval.Conflict):
            kv.cas("cas-key", second, 4)
        assert kv.get("cas-key") == 3
        created = kv.cas("cas-new", 0, "fresh")
        assert created > 0
        with pytest.raises(keyval.Conflict):
            kv.cas("cas-new", 0, "again")


def test_scan_by_hash_tag_and_across_drones(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        for index in range(50):
            kv.put(f"{{scan-user}}:{index:03d}", index)
        items = list(kv.scan("{scan-user}:"))
        assert [item[0] for item in items] == [f"{{scan-user}}:{i:03d}" for i in range(50)]
        assert [item[1] for item in items] == list(range(50))
        spread = {f"spread:{i}" for i in range(40)}
        for key in spread:
            kv.put(key, key)
        assert len({key_slot(key) for key in spread}) > 10
        found = {item[0] for item in kv.scan("spread:")}
        assert found == spread


def test_get_many(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        keys = [f"many:{i}" for i in range(30)]
        for key in keys:
            kv.put(key, key.upper())
        got = kv.get_many([*keys, "many:absent"])
        assert got == {key: key.upper() for key in keys}  # absent keys are left out


def test_transactions_read_modify_write_read_only_write_only(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        kv.put("{tx}:a", 10)
        kv.put("{tx}:b", 20)
        with kv.transaction() as tx:
            a = tx.get("{tx}:a")
            tx.put("{tx}:a", a - 5)
            tx.put("{tx}:b", tx.get("{tx}:b") + 5)
            assert tx.get("{tx}:a") == 5  # reads see the transaction's own writes
        assert kv.get_many(["{tx}:a", "{tx}:b"]) == {"{tx}:a": 5, "{tx}:b": 25}
        with kv.transaction() as tx:  # read-only
            assert tx.get("{tx}:a") + tx.get("{tx}:b") == 30
        with kv.transaction() as tx:  # write-only
            tx.put("{tx}:c", "c")
            tx.delete("{tx}:a")
        assert kv.get("{tx}:c") == "c"
        assert kv.get("{tx}:a") is None


def test_lost_update_and_write_skew_prevented(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        kv.put("{skew}:alice", True)
        kv.put("{skew}:bob", True)
        # Two doctors on call; each may leave only if the other stays. Interleave by hand.
        first = kv.transaction()
        second = kv.transaction()
        tx1 = first.__enter__()
        tx2 = second.__enter__()
        assert tx1.get("{skew}:alice") and tx1.get("{skew}:bob")
        assert tx2.get("{skew}:alice") and tx2.get("{skew}:bob")
        tx1.put("{skew}:alice", False)
        tx2.put("{skew}:bob", False)
        first.__exit__(None, None, None)
        with pytest.raises(keyval.Conflict):
            second.__exit__(None, None, None)
        assert kv.get_many(["{skew}:alice", "{skew}:bob"]) == {
            "{skew}:alice": False,
            "{skew}:bob": True,
        }


def test_bank_transfers_on_one_drone_keep_the_total(cluster: LocalCluster) -> None:
    accounts = [f"{{bank}}:acct:{i}" for i in range(10)]
    with keyval.connect(cluster.client_config) as kv:
        for account in accounts:
            kv.put(account, 100)
    errors: list[BaseException] = []
    totals: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with keyval.connect(cluster.client_config) as kv:
                for _ in range(25):
                    source, target = rng.sample(accounts, 2)
                    amount = rng.randint(1, 30)

                    def transfer(
                        tx: keyval.client.Transaction,
                        source: str = source,
                        target: str = target,
                        amount: int = amount,
                    ) -> None:
                        balance = tx.get(source)
                        if balance >= amount:
                            tx.put(source, balance - amount)
                            tx.put(target, tx.get(target) + amount)

                    kv.transact(transfer, max_attempts=50)

                    def audit(tx: keyval.client.Transaction) -> int:
                        return sum(tx.get(account) for account in accounts)

                    totals.append(kv.transact(audit, max_attempts=50))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert totals and set(totals) == {1000}
    with keyval.connect(cluster.client_config) as kv:
        balances = kv.get_many(accounts)
    assert sum(balances.values()) == 1000
    assert min(balances.values()) >= 0


def test_bad_input_gets_typed_errors(cluster: LocalCluster) -> None:
    with keyval.connect(cluster.client_config) as kv:
        with pytest.raises(keyval.BadRequest):
            kv.put(1.5, "float keys are not keys")  # type: ignore[arg-type]
        with pytest.raises(keyval.TooLarge):
            kv.put("k" * 2000, 1)
        with pytest.raises(keyval.TooLarge):
            kv.put("big", b"x" * (600 * 1024))
        assert kv.get("big") is None


def test_concurrent_gets_are_auto_batched_per_drone(cluster: LocalCluster) -> None:
    """Many tasks on one trio client: their gets share get_many requests to the real drones
    (str, bytes and int keys, present and absent), each task gets its own value."""
    keys: list[Key] = [f"batched-{i}" for i in range(150)]
    keys += [b"raw-%d" % i for i in range(50)]
    keys += list(range(10_000, 10_050))
    with keyval.connect(cluster.client_config) as kv:
        for key in keys[::2]:
            kv.put(key, ["value", key])
    expected = {key: ["value", key] if index % 2 == 0 else None for index, key in enumerate(keys)}

    async def read_all(autobatch: bool) -> tuple[dict[object, object], dict[str, int]]:
        got: dict[object, object] = {}
        async with keyval.aconnect(cluster.client_config, autobatch=autobatch) as kv:

            async def read(key: Key) -> None:
                got[key] = await kv.get(key)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for key in keys:
                        nursery.start_soon(read, key)
            return got, kv.statistics()

    batched, stats = trio.run(read_all, True)
    assert batched == expected
    assert stats["keys_sent"] >= len(keys) - 1  # all but the first, which found none in flight
    assert stats["batches_sent"] < stats["keys_sent"] / 4
    alone, plain_stats = trio.run(read_all, False)
    assert alone == expected and "batches_sent" not in plain_stats


def test_cli_one_shots(cluster: LocalCluster) -> None:
    env = {**os.environ, "KEYVAL_CONFIG": cluster.client_config}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keyval", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run("put", "cli-key", '{"a": [1, 2]}').returncode == 0
    got = run("get", "cli-key")
    assert got.returncode == 0, got.stderr
    assert '"a"' in got.stdout and "[1, 2]" in got.stdout.replace("\n", "").replace("  ", "")
    assert run("del", "cli-key").returncode == 0
    missing = run("get", "cli-key")
    assert missing.returncode != 0
    assert missing.stderr.strip() and len(missing.stderr.strip().splitlines()) == 1
    no_config = subprocess.run(
        [sys.executable, "-m", "keyval", "get", "x"],
        env={k: v for k, v in os.environ.items() if k != "KEYVAL_CONFIG"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_config.returncode != 0 and "config" in no_config.stderr
