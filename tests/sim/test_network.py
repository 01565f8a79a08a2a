"""The simulated network: trio's generic stream tests, then each fault on the autojump clock."""

from __future__ import annotations

import random
from functools import partial

import pytest
import trio
import trio.testing

from keyval.sim.network import (
    LISTEN_BACKLOG,
    Network,
    NetworkUsageError,
    NodeDownError,
    SimStream,
)


def make_network(seed: int = 1, **options: float) -> Network:
    network = Network(random.Random(seed), **options)  # type: ignore[arg-type]
    for node in ("a", "b", "c"):
        network.add_node(node)
    return network


async def connected(
    network: Network, src: str = "a", dst: str = "b"
) -> tuple[SimStream, SimStream]:
    listener = network.listen(dst, f"{dst}:0")
    client = await network.connect(src, listener.address)
    server = await listener.accept()
    return client, server


async def clogged(network: Network) -> tuple[SimStream, SimStream]:
    client, server = await connected(network)
    await client.send_all(b"x" * network.buffer_bytes_max)  # the buffer is now full
    await server.send_all(b"x" * network.buffer_bytes_max)
    return client, server


async def test_streams_pass_trios_generic_tests() -> None:
    network = make_network()
    small = Network(random.Random(2), buffer_bytes_max=16)
    small.add_node("a")
    small.add_node("b")
    await trio.testing.check_half_closeable_stream(
        partial(connected, network), partial(clogged, small)
    )


async def test_streams_with_delays_pass_trios_generic_tests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = make_network(delay_min_s=0.001, delay_max_s=0.05)
    await trio.testing.check_half_closeable_stream(partial(connected, network), None)


async def test_delays_are_bounded_ordered_and_seeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def delays(seed: int) -> list[float]:
        network = make_network(seed, delay_min_s=1.0, delay_max_s=2.0)
        client, server = await connected(network)
        sent_s: list[float] = []
        delays_s: list[float] = []
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for index in range(20):
                    sent_s.append(trio.current_time())
                    await client.send_all(bytes([index]))
                    await trio.sleep(0.1)

            nursery.start_soon(send)
            while len(delays_s) < 20:
                for byte in await server.receive_some(1):
                    assert byte == len(delays_s)  # in order
                    delays_s.append(round(trio.current_time() - sent_s[byte], 6))
        return delays_s

    first = await delays(5)
    assert all(1.0 <= delay_s <= 2.0 for delay_s in first)
    assert len(set(first)) > 10  # drawn, not constant
    assert await delays(5) == first
    assert await delays(6) != first


async def test_random_reset_breaks_both_ends() -> None:
    network = make_network(reset_probability=1.0)
    client, server = await connected(network)
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"hello")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    assert network.statistics().resets == 1
    assert network.statistics().connections_open == 0


async def test_reset_connections_between_two_nodes_only() -> None:
    network = make_network()
    ab_client, ab_server = await connected(network, "a", "b")
    ac_client, ac_server = await connected(network, "a", "c")
    assert network.reset_connections("a", "b") == 1
    with pytest.raises(trio.BrokenResourceError):
        await ab_server.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await ab_client.send_all(b"x")
    await ac_client.send_all(b"still up")
    assert await ac_server.receive_some() == b"still up"
    assert network.reset_connections("c") == 1


async def test_one_way_partition_holds_bytes_until_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = make_network()
    client, server = await connected(network)
    network.partition(["a"], ["b"], one_way=True)
    assert network.is_blocked("a", "b") and not network.is_blocked("b", "a")
    await client.send_all(b"held")
    with trio.move_on_after(60):
        await server.receive_some()
        pytest.fail("bytes crossed a partition")
    await server.send_all(b"back")  # the other way still flows
    assert await client.receive_some() == b"back"
    network.heal()
    assert await server.receive_some() == b"held"


async def test_held_link_pushes_back_on_the_sender(autojump_clock: trio.testing.MockClock) -> None:
    network = Network(random.Random(3), buffer_bytes_max=10)
    network.add_node("a")
    network.add_node("b")
    client, server = await connected(network)
    network.partition(["a"], ["b"])
    await client.send_all(b"0123456789")
    with trio.move_on_after(30) as scope:
        await client.send_all(b"more")
    assert scope.cancelled_caught
    with trio.move_on_after(30) as scope:
        await client.wait_send_all_might_not_block()
    assert scope.cancelled_caught
    network.heal()
    assert await server.receive_some() == b"0123456789"
    await client.send_all(b"more")
    assert await server.receive_some() == b"more"


async def test_connect_across_a_partition_waits_until_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = make_network()
    listener = network.listen("b", "b:7000")
    network.isolate("b")
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(10):
            await network.connect("a", "b:7000")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(network.connect, "a", "b:7000")
        await trio.sleep(5)
        network.heal()
        server = await listener.accept()
    assert server.peer == "a"


async def test_paused_node_sends_and_receives_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = make_network()
    client, server = await connected(network)
    await client.send_all(b"in")
    network.pause("b")
    with trio.move_on_after(30) as scope:
        await server.receive_some()
    assert scope.cancelled_caught
    with trio.move_on_after(30) as scope:
        await server.send_all(b"out")
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"out")
        await trio.sleep(5)
        network.resume("b")
    assert await server.receive_some() == b"in"
    assert await client.receive_some() == b"out"


async def test_killed_node_loses_streams_and_listeners_until_restart() -> None:
    network = make_network()
    client, server = await connected(network)
    listener = network.listen("b", "b:6240")
    network.kill("b")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError, match="killed"):
        await listener.accept()
    with pytest.raises(ConnectionRefusedError):
        await network.connect("a", "b:6240")
    with pytest.raises(NodeDownError):
        await network.connect("b", "a:1")
    with pytest.raises(NodeDownError):
        network.listen("b", "b:6240")
    network.restart("b")
    again = network.listen("b", "b:6240")
    fresh = await network.connect("a", "b:6240")
    await fresh.send_all(b"back")
    assert await (await again.accept()).receive_some() == b"back"


async def test_kill_resets_connections_waiting_in_the_backlog() -> None:
    network = make_network()
    listener = network.listen("b", "b:1")
    client = await network.connect("a", "b:1")
    await listener.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_refused_without_listener_or_with_a_full_backlog() -> None:
    network = make_network()
    with pytest.raises(ConnectionRefusedError):
        await network.connect("a", "b:1")
    network.listen("b", "b:1")
    for _ in range(LISTEN_BACKLOG):
        await network.connect("a", "b:1")
    with pytest.raises(ConnectionRefusedError, match="backlog"):
        await network.connect("a", "b:1")
    assert network.statistics().connections_refused == 2
    assert network.statistics().connections_made == LISTEN_BACKLOG


async def test_works_with_trio_serve_listeners() -> None:
    network = make_network()

    async def echo(stream: SimStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data.upper())

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(trio.serve_listeners, echo, [network.listen("b", "b:0")])
        client = await network.connect("a", listener.address)
        await client.send_all(b"ping")
        assert await client.receive_some() == b"PING"
        await client.send_eof()
        assert await client.receive_some() == b""
        nursery.cancel_scope.cancel()
    stats = network.statistics()
    assert (stats.bytes_sent, stats.bytes_delivered) == (8, 8)


async def test_misuse_raises_typed_errors() -> None:
    network = make_network()
    with pytest.raises(NetworkUsageError, match="taken"):
        network.add_node("a")
    with pytest.raises(NetworkUsageError, match="unknown node"):
        network.listen("z", "z:1")
    with pytest.raises(NetworkUsageError, match="unknown node"):
        network.partition(["a"], ["z"])
    for address in ("nohost", ":80", "h:port", "h:99999", "h:-1"):
        with pytest.raises(NetworkUsageError, match=r"address|port"):
            network.listen("a", address)
    with pytest.raises(NetworkUsageError, match="address"):
        await network.connect("a", "b")
    network.listen("a", "a:5")
    with pytest.raises(NetworkUsageError, match="in use"):
        network.listen("b", "a:5")
    with pytest.raises(NetworkUsageError, match="delay"):
        Network(random.Random(0), delay_min_s=2.0, delay_max_s=1.0)
    with pytest.raises(NetworkUsageError, match="delay"):
        Network(random.Random(0), delay_max_s=float("inf"))
    with pytest.raises(NetworkUsageError, match="probability"):
        Network(random.Random(0), reset_probability=1.5)
    with pytest.raises(NetworkUsageError, match="buffer"):
        Network(random.Random(0), buffer_bytes_max=0)


async def chaos(network: Network, rng: random.Random, duration_s: float) -> None:
    """Random partitions, pauses and resets for `duration_s`, then everything healed."""
    nodes = sorted(network.nodes)
    end_s = trio.current_time() + duration_s
    while trio.current_time() < end_s:
        await trio.sleep(rng.uniform(0.05, 0.5))
        action = rng.choice(("partition", "heal", "pause", "resume", "reset"))
        source, destination = rng.sample(nodes, 2)
        if action == "partition":
            network.partition([source], [destination], one_way=rng.random() < 0.5)
        elif action == "heal":
            network.heal()
        elif action == "pause":
            network.pause(source)
        elif action == "resume":
            network.resume(source)
        else:
            network.reset_connections(source, destination)
    network.heal()
    for node in nodes:
        network.resume(node)


@pytest.mark.parametrize("seed", range(6))
async def test_under_random_faults_every_stream_delivers_a_prefix_in_order(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    rng = random.Random(seed)
    network = Network(rng, delay_max_s=0.05, reset_probability=0.002, buffer_bytes_max=512)
    for node in ("a", "b", "c"):
        network.add_node(node)
    payload = bytes(range(256)) * 40
    received: dict[tuple[str, str], bytearray] = {}
    broken: set[tuple[str, str]] = set()

    async def send(stream: SimStream) -> None:
        view = memoryview(payload)
        try:
            while view:
                size = rng.randint(1, 300)
                await stream.send_all(view[:size])
                view = view[size:]
                await trio.sleep(rng.uniform(0.0, 0.2))  # spread over the chaos
            await stream.send_eof()
        except trio.BrokenResourceError:
            broken.add((stream.node, stream.peer))

    async def receive(stream: SimStream) -> None:
        got = received.setdefault((stream.peer, stream.node), bytearray())
        try:
            while data := await stream.receive_some(rng.randint(1, 400)):
                got += data
        except trio.BrokenResourceError:
            broken.add((stream.peer, stream.node))

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chaos, network, random.Random(seed + 100), 20.0)
            for source, destination in (("a", "b"), ("b", "c"), ("c", "a")):
                client, server = await connected(network, source, destination)
                for stream in (client, server):
                    nursery.start_soon(send, stream)
                    nursery.start_soon(receive, stream)
    assert len(received) == 6
    for link, got in received.items():
        assert bytes(got) == payload[: len(got)], link  # never reordered, duplicated or corrupt
        if link not in broken:
            assert len(got) == len(payload), link  # and complete unless the link was reset
