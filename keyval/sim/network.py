"""An in-memory network for trio, with the faults a real one has.

Nodes are names. A node listens on addresses (`host:port` strings); `await network.connect(
node, address)` returns a `trio.abc.HalfCloseableStream` whose peer the listener's `accept()`
returns. Without faults the streams behave like TCP sockets and pass trio's generic stream
tests. Faults, all driven by one seeded `random.Random` passed in, and trio's clock:

- delay: each `send_all` is delivered after a random delay in [delay_min_s, delay_max_s],
  in order (a later chunk never overtakes an earlier one, as with TCP);
- drop: each `send_all` resets the connection with probability `reset_probability`, and
  `reset_connections` resets chosen ones: both ends get `trio.BrokenResourceError`;
- partition: `partition(a, b, one_way=...)` holds every byte from a node in `a` to a node in `b`
  (and back, unless one way) until `heal`; new connections across it wait, as a SYN would;
- pause: a paused node sends and receives nothing (its calls block) until `resume`;
- kill: every stream of a killed node breaks, its listeners go, connections to it are refused;
  `restart` lets it listen and connect again, with nothing of its old connections left.

Each direction buffers at most `buffer_bytes_max` before `send_all` waits, like a socket buffer,
so a held or slow link pushes back on its sender instead of growing without bound.

The simulation harness owns the nodes' tasks: killing a node here breaks its streams but does
not cancel its tasks, and a paused node's timers still run. Replaying a seed exactly also needs
trio's own scheduling to be deterministic: trio shuffles the order of ready tasks with its own
random generator, which the harness must seed too, since the order of draws from `rng` follows
the order tasks run in.
"""

from __future__ import annotations

import math
import operator
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio
import trio.lowlevel

# A Linux socket's default buffers are a few hundred KiB; 64 KiB per direction keeps simulated
# memory small while holding several 1 MiB-limited frames' worth of small messages.
DEFAULT_BUFFER_BYTES_MAX = 64 * 1024

# Connections queued on a listener before connects are refused (Linux's default somaxconn is
# 4096; a simulated node needs far fewer and a bound keeps a connect storm finite).
LISTEN_BACKLOG = 128

# What `receive_some()` returns at most when the caller gives no size (trio's own default).
DEFAULT_RECEIVE_BYTES = 64 * 1024

# Ports handed out for `host:0`, above the range keyval's daemons use by default.
FIRST_EPHEMERAL_PORT = 40000
LAST_PORT = 65535


class NetworkUsageError(ValueError):
    """The caller misused the network: an unknown node, a bad or taken address."""


class NodeDownError(ConnectionError):
    """A killed node tried to use the network."""


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    connections_open: int
    connections_made: int
    connections_refused: int
    resets: int
    bytes_sent: int
    bytes_delivered: int


@dataclass(slots=True)
class _Chunk:
    deliver_at_s: float
    data: bytes


@dataclass(eq=False, slots=True)
class _Pipe:
    """One direction of a connection: bytes from `source` node to `destination` node."""

    source: str
    destination: str
    chunks: deque[_Chunk] = field(default_factory=deque)
    buffered_bytes: int = 0
    last_deliver_at_s: float = -math.inf
    eof: bool = False  # the sender closed its side: after the data, the reader sees b""
    reader_closed: bool = False  # nobody will read: sends fail
    reset: bool = False  # the connection was reset: both ends fail
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def changed(self) -> None:
        self.lot.unpark_all()


@dataclass(eq=False, slots=True)
class _Connection:
    client: str
    server: str
    outbound: _Pipe  # client -> server
    inbound: _Pipe  # server -> client
    ends_open: int = 2

    def touches(self, node: str) -> bool:
        return node in (self.client, self.server)


class SimStream(trio.abc.HalfCloseableStream):
    """One end of a simulated connection, owned by `node`."""

    def __init__(
        self,
        network: Network,
        node: str,
        peer: str,
        connection: _Connection,
        sending: _Pipe,
        receiving: _Pipe,
    ) -> None:
        self.network = network
        self.node = node
        self.peer = peer
        self._connection = connection
        self._sending = sending
        self._receiving = receiving
        self._closed = False
        self._send_busy = False
        self._receive_busy = False

    def __repr__(self) -> str:
        return f"<SimStream {self.node} -> {self.peer}>"

    # -- sending ----------------------------------------------------------------------------

    def _claim_send(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True

    def _send_ready(self) -> bool:
        """True when a send may go ahead; raises when it never will."""
        pipe = self._sending
        if self._closed or pipe.eof:
            raise trio.ClosedResourceError("this stream was closed")
        if pipe.reset:
            raise trio.BrokenResourceError("connection reset")
        if pipe.reader_closed:
            raise trio.BrokenResourceError("the peer closed the connection")
        if self.node in self.network._paused:
            return False
        return pipe.buffered_bytes < self.network.buffer_bytes_max

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._claim_send()
        try:
            await trio.lowlevel.checkpoint()
            payload = bytes(data)
            while not self._send_ready():
                await self._sending.lot.park()
            if payload:
                self.network._transmit(self._connection, self._sending, payload)
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        self._claim_send()
        try:
            await trio.lowlevel.checkpoint()
            while True:
                try:
                    if self._send_ready():
                        return
                except trio.BrokenResourceError:
                    return  # a send would fail at once, which is not blocking
                await self._sending.lot.park()
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        self._claim_send()
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            self._sending.eof = True
            self._sending.changed()
        finally:
            self._send_busy = False

    # -- receiving --------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receive_busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receive_busy = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                pipe = self._receiving
                if pipe.reset:
                    raise trio.BrokenResourceError("connection reset")
                wake_at_s = math.inf
                if not self.network._held(pipe):
                    data = self.network._deliver(pipe, max_bytes)
                    if data:
                        return data
                    if not pipe.chunks and pipe.eof:
                        return b""
                    if pipe.chunks:
                        wake_at_s = pipe.chunks[0].deliver_at_s
                with trio.move_on_at(wake_at_s):
                    await pipe.lot.park()
        finally:
            self._receive_busy = False

    # -- closing ----------------------------------------------------------------------------

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sending.eof = True
        self._receiving.reader_closed = True
        self._receiving.chunks.clear()
        self._receiving.buffered_bytes = 0
        self._sending.changed()
        self._receiving.changed()
        self.network._end_closed(self._connection)

    async def aclose(self) -> None:
        self._close_now()  # before the checkpoint, so a cancelled aclose still closes
        await trio.lowlevel.checkpoint()


class SimListener(trio.abc.Listener[SimStream]):
    """Accepts the connections made to `address` on `node`."""

    def __init__(self, network: Network, node: str, address: str) -> None:
        self.network = network
        self.node = node
        self.address = address
        self._incoming_send, self._incoming = trio.open_memory_channel[SimStream](LISTEN_BACKLOG)
        self._closed = False
        self._killed = False

    def __repr__(self) -> str:
        return f"<SimListener {self.node} {self.address}>"

    def _offer(self, stream: SimStream) -> bool:
        try:
            self._incoming_send.send_nowait(stream)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _shut(self, *, killed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._killed = killed
        self._incoming_send.close()
        while True:
            try:
                pending = self._incoming.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self.network._reset(pending._connection)
        self._incoming.close()
        if self.network._listeners.get(self.address) is self:
            del self.network._listeners[self.address]

    async def accept(self) -> SimStream:
        """The next connection. Raises `trio.ClosedResourceError` once this listener is closed,
        `trio.BrokenResourceError` once its node was killed."""
        if not self._closed:
            try:
                return await self._incoming.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                pass
        if self._killed:
            raise trio.BrokenResourceError(f"node {self.node!r} was killed")
        raise trio.ClosedResourceError("this listener was closed")

    async def aclose(self) -> None:
        self._shut()
        await trio.lowlevel.checkpoint()


def _split_address(address: str) -> tuple[str, int]:
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise NetworkUsageError(f"an address is host:port, not {address!r}")
    port = int(port_text)
    if port > LAST_PORT:
        raise NetworkUsageError(f"port out of range in {address!r}")
    return host, port


class Network:
    """The simulated network. Call from inside `trio.run` (it reads trio's clock)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        delay_min_s: float = 0.0,
        delay_max_s: float = 0.0,
        reset_probability: float = 0.0,
        buffer_bytes_max: int = DEFAULT_BUFFER_BYTES_MAX,
    ) -> None:
        if not 0.0 <= delay_min_s <= delay_max_s or not math.isfinite(delay_max_s):
            raise NetworkUsageError("delays need 0 <= delay_min_s <= delay_max_s < inf")
        if not 0.0 <= reset_probability <= 1.0:
            raise NetworkUsageError("reset_probability is a probability, in [0, 1]")
        if buffer_bytes_max < 1:
            raise NetworkUsageError("buffer_bytes_max must be at least 1")
        self.rng = rng
        self.delay_min_s = delay_min_s
        self.delay_max_s = delay_max_s
        self.reset_probability = reset_probability
        self.buffer_bytes_max = buffer_bytes_max
        self._nodes: set[str] = set()
        self._killed: set[str] = set()
        self._paused: set[str] = set()
        self._blocked: set[tuple[str, str]] = set()
        self._listeners: dict[str, SimListener] = {}
        self._connections: set[_Connection] = set()
        self._next_port = FIRST_EPHEMERAL_PORT
        self._faults_changed = trio.lowlevel.ParkingLot()
        self._connections_made = 0
        self._connections_refused = 0
        self._resets = 0
        self._bytes_sent = 0
        self._bytes_delivered = 0

    # -- nodes and addresses ----------------------------------------------------------------

    def add_node(self, node: str) -> None:
        if not node or node in self._nodes:
            raise NetworkUsageError(f"node name {node!r} is empty or taken")
        self._nodes.add(node)

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def _check_node(self, node: str) -> None:
        if node not in self._nodes:
            raise NetworkUsageError(f"unknown node {node!r}")

    def _check_alive(self, node: str) -> None:
        self._check_node(node)
        if node in self._killed:
            raise NodeDownError(f"node {node!r} is down")

    def listen(self, node: str, address: str) -> SimListener:
        """Listen on `address` (`host:port`; port 0 picks a free one: see `listener.address`)."""
        self._check_alive(node)
        host, port = _split_address(address)
        if port == 0:
            port = self._free_port(host)
            address = f"{host}:{port}"
        if address in self._listeners:
            raise NetworkUsageError(f"address {address!r} is in use")
        listener = SimListener(self, node, address)
        self._listeners[address] = listener
        return listener

    def _free_port(self, host: str) -> int:
        for _ in range(LAST_PORT - FIRST_EPHEMERAL_PORT + 1):
            port = self._next_port
            self._next_port = port + 1 if port < LAST_PORT else FIRST_EPHEMERAL_PORT
            if f"{host}:{port}" not in self._listeners:
                return port
        raise NetworkUsageError(f"no free port left on {host!r}")

    async def connect(self, node: str, address: str) -> SimStream:
        """Open a connection from `node` to whoever listens on `address`.

        Raises `ConnectionRefusedError` when nobody does (or its backlog is full), and waits
        while a partition or pause stands between the two, as a real connect would until the
        caller's deadline.
        """
        self._check_alive(node)
        _split_address(address)
        await trio.sleep(self._draw_delay_s())
        while True:
            self._check_alive(node)
            listener = self._listeners.get(address)
            if listener is None:
                self._connections_refused += 1
                raise ConnectionRefusedError(f"nothing listens on {address!r}")
            if not self._link_down(node, listener.node):
                break
            await self._faults_changed.park()
        connection = _Connection(
            node, listener.node, _Pipe(node, listener.node), _Pipe(listener.node, node)
        )
        client = SimStream(
            self, node, listener.node, connection, connection.outbound, connection.inbound
        )
        server = SimStream(
            self, listener.node, node, connection, connection.inbound, connection.outbound
        )
        if not listener._offer(server):
            self._connections_refused += 1
            raise ConnectionRefusedError(f"the backlog of {address!r} is full")
        self._connections.add(connection)
        self._connections_made += 1
        return client

    # -- faults -----------------------------------------------------------------------------

    def partition(
        self, side_a: Iterable[str], side_b: Iterable[str], *, one_way: bool = False
    ) -> None:
        """Hold bytes from every node in `side_a` to every node in `side_b`, and back unless
        `one_way`."""
        sources, destinations = set(side_a), set(side_b)
        for node in sources | destinations:
            self._check_node(node)
        for source in sources:
            for destination in destinations:
                if source != destination:
                    self._blocked.add((source, destination))
                    if not one_way:
                        self._blocked.add((destination, source))
        self._notify()

    def isolate(self, node: str) -> None:
        """Cut `node` off from every other node, both ways."""
        self.partition([node], self._nodes - {node})

    def heal(self) -> None:
        """Remove every partition; held bytes flow again."""
        self._blocked.clear()
        self._notify()

    def is_blocked(self, source: str, destination: str) -> bool:
        return (source, destination) in self._blocked

    def pause(self, node: str) -> None:
        self._check_node(node)
        self._paused.add(node)
        self._notify()

    def resume(self, node: str) -> None:
        self._check_node(node)
        self._paused.discard(node)
        self._notify()

    def kill(self, node: str) -> None:
        """Break every stream of `node` and close its listeners, as a crash would."""
        self._check_node(node)
        self._killed.add(node)
        self._paused.discard(node)
        for listener in [item for item in self._listeners.values() if item.node == node]:
            listener._shut(killed=True)
        for connection in [item for item in self._connections if item.touches(node)]:
            self._reset(connection)
        self._notify()

    def restart(self, node: str) -> None:
        """Let a killed node use the network again (it must listen anew)."""
        self._check_node(node)
        self._killed.discard(node)
        self._notify()

    def reset_connections(self, node_a: str, node_b: str | None = None) -> int:
        """Reset every connection between `node_a` and `node_b` (any peer when None)."""
        self._check_node(node_a)
        if node_b is not None:
            self._check_node(node_b)
        chosen = [
            item
            for item in self._connections
            if item.touches(node_a) and (node_b is None or item.touches(node_b))
        ]
        for connection in chosen:
            self._reset(connection)
        return len(chosen)

    def statistics(self) -> NetworkStatistics:
        return NetworkStatistics(
            connections_open=len(self._connections),
            connections_made=self._connections_made,
            connections_refused=self._connections_refused,
            resets=self._resets,
            bytes_sent=self._bytes_sent,
            bytes_delivered=self._bytes_delivered,
        )

    # -- internals used by the streams ------------------------------------------------------

    def _draw_delay_s(self) -> float:
        if self.delay_max_s == 0.0:
            return 0.0
        return self.rng.uniform(self.delay_min_s, self.delay_max_s)

    def _link_down(self, node_a: str, node_b: str) -> bool:
        return (
            (node_a, node_b) in self._blocked
            or (node_b, node_a) in self._blocked
            or node_a in self._paused
            or node_b in self._paused
            or node_b in self._killed
        )

    def _held(self, pipe: _Pipe) -> bool:
        return (
            (pipe.source, pipe.destination) in self._blocked
            or pipe.source in self._paused
            or pipe.destination in self._paused
        )

    def _transmit(self, connection: _Connection, pipe: _Pipe, data: bytes) -> None:
        if self.reset_probability and self.rng.random() < self.reset_probability:
            self._reset(connection)
            raise trio.BrokenResourceError("connection reset")
        deliver_at_s = max(pipe.last_deliver_at_s, trio.current_time() + self._draw_delay_s())
        pipe.last_deliver_at_s = deliver_at_s
        pipe.chunks.append(_Chunk(deliver_at_s, data))
        pipe.buffered_bytes += len(data)
        self._bytes_sent += len(data)
        pipe.changed()

    def _deliver(self, pipe: _Pipe, max_bytes: int) -> bytes:
        """Take up to `max_bytes` of what is due on `pipe` now."""
        now_s = trio.current_time()
        parts: list[bytes] = []
        wanted = max_bytes
        while wanted and pipe.chunks and pipe.chunks[0].deliver_at_s <= now_s:
            chunk = pipe.chunks[0]
            if len(chunk.data) <= wanted:
                pipe.chunks.popleft()
                parts.append(chunk.data)
            else:
                parts.append(chunk.data[:wanted])
                chunk.data = chunk.data[wanted:]
            wanted -= len(parts[-1])
        data = b"".join(parts)
        if data:
            pipe.buffered_bytes -= len(data)
            self._bytes_delivered += len(data)
            pipe.changed()  # room for the sender
        return data

    def _reset(self, connection: _Connection) -> None:
        if connection.outbound.reset:
            return
        self._resets += 1
        for pipe in (connection.outbound, connection.inbound):
            pipe.reset = True
            pipe.chunks.clear()
            pipe.buffered_bytes = 0
            pipe.changed()
        self._connections.discard(connection)

    def _end_closed(self, connection: _Connection) -> None:
        connection.ends_open -= 1
        if connection.ends_open == 0:
            self._connections.discard(connection)

    def _notify(self) -> None:
        self._faults_changed.unpark_all()
        for connection in self._connections:
            connection.outbound.changed()
            connection.inbound.changed()
