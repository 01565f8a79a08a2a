"""The blocking facade over real loopback TCP: a fake cluster served by keyval.net in its own
trio thread, the client in another (its own loop thread), PSK-authenticated."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import trio

import keyval
from keyval import net
from keyval.client.blocking import Client, Transaction, connect
from keyval.client.errors import ClientClosed
from keyval.client.links import PskDialer
from tests.client.conftest import settings_for
from tests.client.fakes import PSK, FakeCluster
from tests.client.test_client import keys_on_each_drone
from wire.channel import PskServerAuth
from wire.errors import BadRequest, Conflict


def server_auth() -> PskServerAuth:
    return PskServerAuth({"client": ("client", PSK)})


@pytest.fixture
def served() -> Iterator[FakeCluster]:
    cluster = FakeCluster(drones=2, commanders=1)
    ready = threading.Event()
    stop: list[trio.Event] = []
    token: list[trio.lowlevel.TrioToken] = []

    async def main() -> None:
        stop.append(trio.Event())
        token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            for address in [*cluster.commanders, *cluster.drones]:
                auth = PskServerAuth({"client": ("client", PSK)})
                bound = await nursery.start(
                    net.serve, "127.0.0.1:0", lambda a=auth: a, cluster.handler_for(address)
                )
                cluster.rebind(address, bound)
                cluster.handlers_rebound = True  # type: ignore[attr-defined]
            ready.set()
            await stop[0].wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    ready.wait(10)
    yield cluster
    trio.from_thread.run_sync(stop[0].set, trio_token=token[0])
    thread.join(10)


@pytest.fixture
def kv(served: FakeCluster) -> Iterator[Client]:
    with connect(settings_for(served), dialer=PskDialer("client", "client", PSK)) as client:
        yield client


def test_blocking_round_trip(kv: Client) -> None:
    version = kv.put("a", b"\x00bytes")
    assert kv.get_entry("a") == (b"\x00bytes", version)
    assert kv.get_many(["a", "missing"]) == {"a": b"\x00bytes"}
    assert kv.delete("a") is True
    assert kv.get("a") is None
    with pytest.raises(Conflict):
        kv.cas("a", 99, 1)


def test_blocking_scan_and_transactions(kv: Client, served: FakeCluster) -> None:
    for index in range(5):
        kv.put(f"{{s}}:{index}", index)
    assert [key for key, _, _ in kv.scan("{s}:")] == [f"{{s}}:{i}" for i in range(5)]
    with kv.transaction() as tx:
        tx.put("{s}:0", tx.get("{s}:0") + 10)
    assert kv.get("{s}:0") == 10

    def bump(tx: Transaction) -> int:
        value: int = tx.get("{s}:1")
        tx.put("{s}:1", value + 1)
        return value + 1

    assert kv.transact(bump) == 2

    @keyval.transactional
    def double(tx: Transaction, key: str) -> None:
        tx.put(key, tx.get(key) * 2)

    double(kv, "{s}:2")
    assert kv.get("{s}:2") == 4
    one, two = keys_on_each_drone(served)
    with pytest.raises(BadRequest), kv.transaction() as tx:  # the fakes refuse 2PC
        tx.get(one)
        tx.get(two)


def test_one_client_per_thread(served: FakeCluster) -> None:
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            dialer = PskDialer("client", "client", PSK)
            with connect(settings_for(served), dialer=dialer) as kv:
                for index in range(10):
                    kv.put(f"t{number}:{index}", index)
                assert kv.get(f"t{number}:9") == 9
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_closed_client_refuses_calls(served: FakeCluster) -> None:
    kv = connect(settings_for(served), dialer=PskDialer("client", "client", PSK))
    kv.close()
    with pytest.raises(ClientClosed):
        kv.get("a")
    kv.close()  # closing twice is harmless
