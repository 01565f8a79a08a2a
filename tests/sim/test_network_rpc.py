"""keyval.net's secure RPC runs unchanged over the simulated network, and sees its faults."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from keyval.net import Connection, serve_stream
from keyval.sim.network import Network, SimListener
from wire.channel import PeerInfo, PskClientAuth, PskServerAuth
from wire.errors import Timeout, Unavailable
from wire.messages import Message, Ok, Ping

PSK = b"sim-network-test-psk-32-bytes!!!"


async def answer(peer: PeerInfo, msg: Message) -> Message:
    return Ok()


async def serve_all(listener: SimListener) -> None:
    auth = PskServerAuth({"client-1": ("client", PSK)}, server_name="drone-1", server_role="drone")
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except trio.BrokenResourceError:
                return  # the node was killed
            nursery.start_soon(serve_stream, stream, auth, answer)


async def open_client(network: Network, address: str) -> Connection:
    stream = await network.connect("client", address)
    return await Connection.from_stream(stream, PskClientAuth("client-1", "client", PSK))


async def test_rpc_over_a_delayed_network_then_partition_and_kill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = Network(random.Random(11), delay_min_s=0.001, delay_max_s=0.02)
    network.add_node("client")
    network.add_node("drone-1")
    listener = network.listen("drone-1", "drone-1:6240")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_all, listener)
        conn = await open_client(network, listener.address)
        assert conn.peer.name == "drone-1"
        for _ in range(10):
            assert isinstance(await conn.request(Ping(), timeout=1.0), Ok)

        network.partition(["client"], ["drone-1"], one_way=True)
        with pytest.raises(Timeout):
            await conn.request(Ping(), timeout=1.0)
        network.heal()

        fresh = await open_client(network, listener.address)
        assert isinstance(await fresh.request(Ping(), timeout=1.0), Ok)
        network.kill("drone-1")
        with pytest.raises(Unavailable):
            await fresh.request(Ping(), timeout=1.0)
        with pytest.raises(ConnectionRefusedError):
            await open_client(network, listener.address)
        nursery.cancel_scope.cancel()
