"""The trio transport: secure connections and the request/reply multiplexer.

This is the only module that touches sockets. It feeds `wire.channel` (sans-I/O) from a
`trio.abc.Stream`, so the same code runs over TCP and over `trio.testing.memory_stream_pair`.

Client: `await open_connection("host:port", auth)` or `await Connection.from_stream(stream,
auth)`, then `await conn.request(msg)` from any number of tasks. Requests carry request ids and
pipeline on one connection. There is no hidden background task: whichever waiting request
holds the reader role reads frames and dispatches every reply by request id, then hands the
role to another waiter when its own reply has come (so exactly one task reads at a time).

Server: `await serve("host:port", auth_factory, handler, task_status=...)` or
`await serve_stream(stream, auth, handler)`. Each request runs `await handler(peer, msg)`
concurrently, up to `MAX_INFLIGHT_PER_CONNECTION`; past that the server stops reading (the
peer's TCP window fills: back-pressure). A handler that also has
`handle_nowait(peer, msg) -> Message | None` (see `InlineHandler`) answers what it can
without waiting right in the reading task, with no task spawned; None sends the request down
the concurrent path. A handler with `handle_deferred(peer, msg, respond)` (see
`DeferringHandler`) may admit a request there too, holding one inflight slot, and answer it
later by calling `respond` from any task (a drone's durable write, when its db batch
resolves); the replies given while one task runs leave with one write per connection.

Writes are coalesced: the reading task decodes every complete frame of what it received,
answers the inline ones, and sends all of their replies in one `send_all` before it reads
again; frames sealed while a write is under way (or in the same scheduling pass) leave
together too.

Transport: `open_connection` and `serve` reach the network through the `Transport` in the
context variable `TRANSPORT` (TCP by default). A simulation sets it, per simulated node, to an
in-memory network (keyval.sim), so daemons run unchanged; trio tasks inherit it from the task
that started them.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar

import trio

from keyval.observe import context as observe_context
from keyval.observe.metrics import current_metrics
from wire import codec
from wire.channel import (
    NEED_DATA,
    ClientAuth,
    ClientChannel,
    Closed,
    HandshakeDone,
    Payload,
    PeerInfo,
    ServerAuth,
    ServerChannel,
)
from wire.errors import (
    DecodeError,
    ErrorCode,
    Internal,
    LocalProtocolError,
    RemoteProtocolError,
    ServiceError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    WireError,
    service_error,
)
from wire.limits import MAX_FRAME_BYTES
from wire.messages import MAX_REQUEST_ID, Error, Message, decode_message, encode_message

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A handshake is two round trips and a few signatures; a peer slower than this is stuck or
# hostile, and an unauthenticated connection must not hold a slot for long.
HANDSHAKE_TIMEOUT_S = 10.0

# Connecting includes DNS and the TCP handshake as well as ours.
CONNECT_TIMEOUT_S = 10.0

# A request's default deadline; callers pass their own for long operations.
DEFAULT_REQUEST_TIMEOUT_S = 30.0

# A single write that takes longer means the peer stopped reading; the connection is dropped.
WRITE_TIMEOUT_S = 30.0

# Saying goodbye (a close record or a refusal) must not hold up closing.
FAREWELL_TIMEOUT_S = 1.0

# Requests of one connection handled at once; further requests wait in the peer's socket
# buffer. Bounds the memory and tasks one client can claim (h2 caps concurrent streams to 100
# by default for the same reason).
MAX_INFLIGHT_PER_CONNECTION = 128

# Open connections per listener: each costs a file descriptor and a task.
MAX_CONNECTIONS = 1024

# Bytes asked of the stream per read: many small frames or one chunk of a large one.
RECEIVE_CHUNK_BYTES = 64 * 1024

# Reads served straight from a ready TCP socket (no scheduler turn) before one full
# checkpoint, so a peer that keeps its socket full cannot starve the other tasks.
DIRECT_READS_PER_CHECKPOINT = 16

Handler = Callable[[PeerInfo, Message], Awaitable[Message]]


class InlineHandler(Protocol):
    """A handler with a synchronous fast path, tried first for every request."""

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message: ...

    def handle_nowait(self, peer: PeerInfo, msg: Message) -> Message | None:
        """The reply if it can be given without waiting, else None (then `__call__` runs).
        Raises like `__call__` (a `ServiceError` becomes the `Error` reply)."""
        ...


class Deferred:
    """What `handle_deferred` returns when it will answer later, through `respond`."""

    __slots__ = ()


DEFERRED = Deferred()

# Given exactly once, from any task, a deferred request's reply or the error to answer with.
Respond = Callable[[Message | ServiceError], None]


class DeferringHandler(Protocol):
    """A handler that may also admit a request without a task and answer it later."""

    def handle_deferred(
        self, peer: PeerInfo, msg: Message, respond: Respond
    ) -> Message | Deferred | None:
        """The reply now; DEFERRED when `respond` will be called once with the outcome; or
        None: the request must wait, `__call__` runs in a task. Raises like `__call__`.
        The request holds one of its connection's MAX_INFLIGHT_PER_CONNECTION slots until
        it is answered."""
        ...


Revoked = Callable[[PeerInfo], bool]
Clock = Callable[[], float]


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise LocalProtocolError(f"address must be host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Transport(Protocol):
    """How `open_connection` dials and `serve` listens."""

    async def connect(self, address: str) -> trio.abc.Stream:
        """A stream to `host:port`; raises OSError when the peer cannot be reached."""
        ...

    async def listen(self, address: str) -> tuple[Sequence[trio.abc.Listener[Any]], str]:
        """Listeners on `host:port` (port 0 picks one) and the bound `host:port`."""
        ...


class TcpTransport:
    """The real network."""

    async def connect(self, address: str) -> trio.abc.Stream:
        host, port = parse_address(address)
        return await trio.open_tcp_stream(host, port)

    async def listen(self, address: str) -> tuple[Sequence[trio.abc.Listener[Any]], str]:
        host, port = parse_address(address)
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        return listeners, format_address(bound_host, bound_port)


_TCP = TcpTransport()

# None means TCP. Set it (`TRANSPORT.set(...)`) in the task that starts a node.
TRANSPORT: contextvars.ContextVar[Transport | None] = contextvars.ContextVar(
    "keyval_transport", default=None
)


def current_transport() -> Transport:
    transport = TRANSPORT.get()
    return _TCP if transport is None else transport


class _DirectSocket:
    """The non-blocking TCP socket under a `trio.SocketStream`, used without trio's wrappers.

    trio's `send` and `recv` each take a full scheduler turn even when the kernel could
    answer at once; on a server answering thousands of small requests a second, those turns
    (and the epoll polls each loop pass makes) were most of a drone's CPU. Here a read or a
    write the kernel can do now is one system call; only one that would block waits through
    trio (`wait_readable` / `wait_writable`). `keyval.net` keeps one reader and one writer
    per link, which is what trio's own conflict detection would enforce."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.direct_reads = 0
        # Whether the last read found data without waiting (or filled the buffer). If not (a
        # peer that sends only after our reply), the next read waits for readiness first
        # instead of spending a system call on a read that would fail.
        self.data_was_waiting = True

    def fileno(self) -> int:
        fd = self.sock.fileno()  # -1 once closed: never touch a number reused by another
        if fd < 0:
            raise trio.ClosedResourceError("socket closed")
        return fd

    async def receive_some(self, max_bytes: int) -> bytes:
        waited = not self.data_was_waiting
        if waited:
            await trio.lowlevel.wait_readable(self.sock)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(self.fileno(), max_bytes)
                break
            except BlockingIOError:
                waited = True
                await trio.lowlevel.wait_readable(self.sock)
        self.data_was_waiting = not waited or len(data) == max_bytes
        if not waited:  # no scheduler turn yet: take one now and then
            self.direct_reads += 1
            if self.direct_reads % DIRECT_READS_PER_CHECKPOINT == 0:
                await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def send_nowait(self, data: memoryview) -> int:
        """Bytes of `data` the kernel took now (0 when the socket buffer is full)."""
        try:
            return os.write(self.fileno(), data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: memoryview) -> None:
        while data:
            await trio.lowlevel.wait_writable(self.sock)
            data = data[self.send_nowait(data) :]


def _direct_socket(stream: trio.abc.Stream) -> _DirectSocket | None:
    if type(stream) is trio.SocketStream:
        return _DirectSocket(stream.socket)
    return None


class _Link:
    """A stream and its channel: reading into the channel, coalesced writing."""

    def __init__(self, stream: trio.abc.Stream, channel: ClientChannel | ServerChannel) -> None:
        self.stream = stream
        self.channel = channel
        self.direct = _direct_socket(stream)
        self.broken: str | None = None
        self._outbox: list[bytes] = []
        self._flushing = False
        self.writes = 0  # send_all calls, for statistics
        self.frames_sent = 0

    def queue(self, frame: bytes) -> None:
        if frame:
            self._outbox.append(frame)
            self.frames_sent += 1

    @property
    def has_queued(self) -> bool:
        return bool(self._outbox)

    @property
    def flushing(self) -> bool:
        """A `flush` is under way: it writes whatever is queued before it returns."""
        return self._flushing

    async def flush(self, *, join: bool = True) -> None:
        """Write everything queued. Returns at once if another task is writing: that task
        keeps writing until the queue is empty, our frames included. `join` first lets the
        frames other tasks seal in this scheduling pass join the write; a caller that has
        just queued a whole turn's worth itself passes False."""
        if self._flushing:
            return
        self._flushing = True
        try:
            if join:
                await trio.lowlevel.cancel_shielded_checkpoint()
            while self._outbox:
                if self.broken is not None:
                    raise Unavailable(self.broken)
                data = b"".join(self._outbox)
                self._outbox.clear()
                await self._write(data)
        finally:
            self._flushing = False

    def write_nowait(self) -> bool:
        """Write what is queued now, without waiting; False when some remains (written by a
        `flush`, which must follow) or the stream offers no direct socket. Never call it
        while a `flush` runs (`_flushing`)."""
        if self.direct is None or self._flushing:
            return False
        data = b"".join(self._outbox)
        self._outbox.clear()
        try:
            sent = self.direct.send_nowait(memoryview(data))
        except (trio.ClosedResourceError, OSError) as error:
            self.fail(f"connection lost while writing: {error or type(error)}")
            return True  # nothing more can be written; the reader sees the failure
        if sent == len(data):
            self.writes += 1
            return True
        self._outbox.append(data[sent:])
        return False

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        if self.direct is not None:  # most writes fit the socket buffer: no scope, no await
            try:
                view = view[self.direct.send_nowait(view) :]
            except (trio.ClosedResourceError, OSError) as error:
                raise self.fail(f"connection lost while writing: {error or type(error)}") from None
            if not view:
                self.writes += 1
                return
        # A write cut short would leave half a frame on the wire: never cancel one midway. One
        # scope does both: the shield keeps outer cancels out, its own deadline still applies.
        deadline = trio.current_time() + WRITE_TIMEOUT_S
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                if self.direct is not None:
                    await self.direct.send_all(view)
                else:
                    await self.stream.send_all(view)
                self.writes += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise self.fail(f"connection lost while writing: {error or type(error)}") from None
        if scope.cancelled_caught:
            raise self.fail("peer stopped reading (write timed out)")

    async def receive(self) -> None:
        """Read one chunk into the channel (`b""` at EOF)."""
        if self.broken is not None:
            raise Unavailable(self.broken)
        try:
            data: bytes | bytearray
            if self.direct is not None:
                data = await self.direct.receive_some(RECEIVE_CHUNK_BYTES)
            else:
                data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise self.fail(f"connection lost while reading: {error or type(error)}") from None
        self.channel.receive_data(data)

    def fail(self, reason: str) -> Unavailable:
        if self.broken is None:
            self.broken = reason
        return Unavailable(self.broken)

    async def farewell(self) -> None:
        """Best effort: send what the channel still has (a refusal, a close record)."""
        self.queue(self.channel.data_to_send())
        if self.broken is None and not self._flushing:
            with trio.CancelScope(shield=True), trio.move_on_after(FAREWELL_TIMEOUT_S):
                try:
                    await self.flush()
                except Unavailable:
                    pass

    async def handshake(self) -> HandshakeDone:
        try:
            while True:
                event = self.channel.next_event()
                self.queue(self.channel.data_to_send())
                await self.flush()
                if isinstance(event, HandshakeDone):
                    return event
                if event is not NEED_DATA:
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} in handshake")
                await self.receive()
        except WireError:
            await self.farewell()
            raise

    async def aclose(self, reason: str = "") -> None:
        if self.broken is None:
            try:
                self.queue(self.channel.close(reason))
            except WireError:
                pass
            await self.farewell()
            self.broken = reason or "connection closed"
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class _Pending:
    __slots__ = ("error", "reply", "wake")

    def __init__(self) -> None:
        self.reply: Message | None = None
        self.error: WireError | None = None
        # Set while the request's task waits for the reader to answer it or hand it the
        # reader role; a request that reads its own reply (the usual case) never needs one.
        self.wake: trio.Event | None = None

    def wake_up(self) -> None:
        if self.wake is not None:
            self.wake.set()

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


class Connection:
    """A client connection: many concurrent, pipelined requests."""

    def __init__(self, link: _Link, peer: PeerInfo) -> None:
        self._link = link
        self._peer = peer
        self._pending: dict[int, _Pending] = {}
        self._next_rid = 1
        self._reader_active = False
        self._read_scope: trio.CancelScope | None = None
        self._reading = False  # the reader waits on a direct socket (no scope: see _read_once)
        self._closed = False

    @classmethod
    async def from_stream(
        cls,
        stream: trio.abc.Stream,
        auth: ClientAuth,
        *,
        timeout: float = HANDSHAKE_TIMEOUT_S,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> Connection:
        """Run the client handshake on `stream`. On failure the stream is closed."""
        link = _Link(stream, ClientChannel(auth, max_frame_bytes=max_frame_bytes))
        try:
            with trio.move_on_after(timeout):
                done = await link.handshake()
                return cls(link, done.peer)
            raise Timeout(f"handshake not done within {timeout} s")
        except BaseException:
            link.fail("handshake failed")
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    @property
    def peer(self) -> PeerInfo:
        return self._peer

    @property
    def is_closed(self) -> bool:
        return self._closed or self._link.broken is not None

    def statistics(self) -> dict[str, Any]:
        return {
            "pending_requests": len(self._pending),
            "frames_sent": self._link.frames_sent,
            "writes": self._link.writes,
            "broken": self._link.broken,
        }

    async def request(self, msg: Message, *, timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> Message:
        """Send `msg` and wait for its reply. An `Error` reply raises its `ServiceError`; a lost
        connection raises `Unavailable`; the deadline raises `Timeout`."""
        if self._link.broken is not None:
            raise Unavailable(self._link.broken)
        if not self._link.channel.can_send:  # closed by the peer or by us: nothing can go out
            raise Unavailable("connection closed")
        if self._next_rid > MAX_REQUEST_ID:
            raise Unavailable("request ids exhausted; open a new connection")
        rid = self._next_rid
        payload = encode_message(rid, msg)
        channel = self._link.channel
        if len(payload) > channel.max_payload_bytes:
            raise TooLarge(
                f"request of {len(payload)} bytes is over the frame limit",
                detail={"bytes": len(payload), "max": channel.max_payload_bytes},
            )
        self._next_rid += 1
        slot = _Pending()
        pending = self._pending
        pending[rid] = slot
        try:
            # A bare scope with an absolute deadline: trio.move_on_after is a generator-based
            # context manager, a few microseconds more per request for the same scope.
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                self._link.queue(channel.send(payload))
                try:  # a lone request has nothing to wait for; others may join in this pass
                    await self._link.flush(join=len(pending) > 1)
                except Unavailable as error:
                    self._fail_all(error)
                    raise
                await self._wait_reply(slot)
        finally:
            del pending[rid]
        if slot.error is not None:
            raise slot.error
        if slot.reply is None:
            if scope.cancelled_caught:
                raise Timeout(f"no reply to {msg.TYPE} within {timeout} s")
            raise Unavailable(self._link.broken or "connection closed")
        if isinstance(slot.reply, Error):
            raise service_error(slot.reply.code, slot.reply.message, slot.reply.detail)
        return slot.reply

    async def _wait_reply(self, slot: _Pending) -> None:
        while slot.reply is None and slot.error is None:
            if self._reader_active:
                slot.wake = trio.Event()
                try:
                    await slot.wake.wait()
                finally:
                    slot.wake = None
                continue
            self._reader_active = True
            try:
                while slot.reply is None and slot.error is None:
                    await self._read_once(slot)
            finally:
                self._reader_active = False
                if len(self._pending) > 1:  # nobody else to hand the reader role to
                    self._hand_over_reading(slot)

    def _hand_over_reading(self, leaving: _Pending) -> None:
        for other in self._pending.values():  # one that waits; the others check on their own
            if other is not leaving and not other.done and other.wake is not None:
                other.wake.set()
                return

    async def _read_once(self, slot: _Pending) -> None:
        """Dispatch every event the channel has; read one chunk if `slot` is still unanswered
        (and then dispatch what it brought, saving a pass through the caller's loop)."""
        try:
            if self._dispatch_events() and slot.reply is None and slot.error is None:
                await self._receive()
                self._dispatch_events()
        except WireError as error:
            if not isinstance(error, Unavailable):
                self._link.queue(self._link.channel.close(error.message, error.code.value))
                await self._link.farewell()
            self._fail_all(self._link.fail(f"connection failed: {error.message}"))

    def _dispatch_events(self) -> bool:
        """Dispatch every reply the channel holds; False once the connection is closed."""
        channel = self._link.channel
        while True:
            event = channel.next_event()
            if event is NEED_DATA:
                return True
            if type(event) is Payload:
                self._dispatch(event.data)
            elif isinstance(event, Closed):
                code = f" ({event.code})" if event.code else ""
                self._fail_all(
                    self._link.fail(f"server closed the connection{code}: {event.reason}")
                )
                return False
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__}")

    async def _receive(self) -> None:
        """Read one chunk; `_fail_all` may cut the wait short. On a direct socket it wakes the
        reader with `notify_closing` (a cancel scope per read was a tenth of a request's
        client CPU); other streams get a scope."""
        if self._link.direct is not None:
            self._reading = True
            try:
                await self._link.receive()
            finally:
                self._reading = False
            return
        with trio.CancelScope() as self._read_scope:
            await self._link.receive()
        self._read_scope = None

    def _dispatch(self, data: bytes) -> None:
        rid, reply = decode_message(data)
        slot = self._pending.get(rid)
        if slot is not None:
            slot.reply = reply
            slot.wake_up()
        elif rid >= self._next_rid or rid == 0:
            raise RemoteProtocolError(f"reply to request id {rid}, which was never sent")
        # else: the reply to a request that timed out; nobody waits for it.

    def _fail_all(self, error: Unavailable) -> None:
        if self._read_scope is not None:
            self._read_scope.cancel()  # the reader waits on a connection that is gone
        if self._reading and self._link.direct is not None:
            trio.lowlevel.notify_closing(self._link.direct.sock)  # the same, scope-free
        for slot in self._pending.values():
            if not slot.done:
                slot.error = Unavailable(error.message)
                slot.wake_up()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._link.aclose("client closed the connection")
        self._fail_all(Unavailable("connection closed"))

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def open_connection(
    address: str,
    auth: ClientAuth,
    *,
    timeout: float = CONNECT_TIMEOUT_S,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> Connection:
    """Connect to `host:port` (over `TRANSPORT`, TCP by default) and run the handshake, all
    within `timeout`."""
    parse_address(address)
    deadline = trio.current_time() + timeout
    with trio.move_on_at(deadline):
        try:
            stream = await current_transport().connect(address)
        except OSError as error:
            raise Unavailable(f"cannot connect to {address}: {error}") from None
        remaining = max(deadline - trio.current_time(), 0.0)
        return await Connection.from_stream(
            stream, auth, timeout=remaining, max_frame_bytes=max_frame_bytes
        )
    raise Timeout(f"could not connect to {address} within {timeout} s")


# --- server ----------------------------------------------------------------------------------


class CloseConnection(Exception):
    """Raised by a handler to answer the request with `error` and then end the connection,
    e.g. when it finds the peer's principal revoked."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class _ServerConnection:
    def __init__(
        self,
        link: _Link,
        peer: PeerInfo,
        handler: Handler,
        revoked: Revoked | None,
        clock: Clock,
    ) -> None:
        self.link = link
        self.peer = peer
        self.handler = handler
        self.revoked = revoked
        self.clock = clock
        self.inflight = trio.Semaphore(MAX_INFLIGHT_PER_CONNECTION)
        self.connection_id = observe_context.next_connection_id()
        self.metrics = current_metrics()  # the serving daemon's
        self.handle_nowait: Callable[[PeerInfo, Message], Message | None] | None = getattr(
            handler, "handle_nowait", None
        )
        self.handle_deferred: (
            Callable[[PeerInfo, Message, Respond], Message | Deferred | None] | None
        ) = getattr(handler, "handle_deferred", None)
        self.nursery: trio.Nursery | None = None  # while serving: flushes deferred replies
        self.flush_scheduled = False  # listed to flush its deferred replies (_schedule_flush)

    async def run(self) -> str:
        """Serve requests until the peer leaves or fails; returns why the connection ended."""
        logger.debug(
            "connection c%d: %s (%s) authenticated",
            self.connection_id,
            self.peer.name,
            self.peer.role,
        )
        self.metrics.connections_open.inc()
        try:
            return await self._serve()
        finally:
            self.metrics.connections_open.dec()

    async def _serve(self) -> str:
        reason = "closed by a handler"  # if a handler cancels the reader
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                reason = await self._read_requests(nursery)
            except WireError as error:
                if self.link.broken is None:  # tell the peer why, in a sealed close
                    self.link.queue(self.link.channel.close(error.message, error.code.value))
                await self.link.farewell()
                reason = f"{type(error).__name__}: {error.message}"
            finally:
                self.nursery = None  # deferred replies from now on are dropped
                nursery.cancel_scope.cancel()
        return reason

    async def _read_requests(self, nursery: trio.Nursery) -> str:
        """Decode every complete frame received; answer what can be answered inline, spawn a
        task for the rest; send the inline replies in one write before reading again."""
        link = self.link
        channel = link.channel
        handle_nowait = self.handle_nowait
        handle_deferred = self.handle_deferred
        while True:
            event = channel.next_event()
            if event is NEED_DATA:
                if link.has_queued:
                    await link.flush(join=False)
                await link.receive()
                continue
            if type(event) is not Payload:
                if isinstance(event, Closed):
                    return f"peer closed: {event.reason}"
                raise RemoteProtocolError(f"unexpected {type(event).__name__}")
            request = self._decode(event.data)
            if request is None:
                continue  # answered with BAD_REQUEST; the reply leaves with this turn's
            rid, msg = request
            refusal = self._refusal()
            if refusal is not None:
                self.metrics.request_done(msg.TYPE, ErrorCode.UNAUTHORIZED.value, 0.0)
                await self._end_with(rid, Unauthorized(refusal))
                return refusal
            if handle_nowait is not None and self._answer_inline(handle_nowait, rid, msg):
                continue
            try:  # no checkpoint when a slot is free, so a burst of requests starts together
                self.inflight.acquire_nowait()
            except trio.WouldBlock:
                await link.flush(join=False)  # what we answered inline goes out meanwhile
                await self.inflight.acquire()  # back-pressure: read no more until a slot frees
            if handle_deferred is not None and self._answer_deferred(handle_deferred, rid, msg):
                continue
            nursery.start_soon(self._handle, rid, msg, nursery)

    def _answer_deferred(
        self,
        handle_deferred: Callable[[PeerInfo, Message, Respond], Message | Deferred | None],
        rid: int,
        msg: Message,
    ) -> bool:
        """Offer `msg`, holding an inflight slot, to the handler's deferring path; True when
        it was answered (queued) or will be (the handler calls the responder)."""
        if self.handle_nowait is None:  # else `_answer_inline` has named the request already
            observe_context.set_request(observe_context.request_id(self.connection_id, rid))
        responder = _DeferredReply(self, rid, msg.TYPE, trio.current_time())
        outcome = self._call_now(msg, handle_deferred, self.peer, msg, responder)
        if outcome is None:
            return False
        if outcome is not DEFERRED:
            responder.answer(_reply_for(msg, outcome))  # this turn's write sends it
        return True

    def _answer_inline(
        self, handle_nowait: Callable[[PeerInfo, Message], Message | None], rid: int, msg: Message
    ) -> bool:
        """Try the handler's synchronous path; True when `msg` has been answered (queued)."""
        observe_context.set_request(observe_context.request_id(self.connection_id, rid))
        started = trio.current_time()
        outcome = self._call_now(msg, handle_nowait, self.peer, msg)
        if outcome is None:
            return False
        reply = _reply_for(msg, outcome)
        self._queue_reply(rid, reply)
        code = reply.code if type(reply) is Error else None
        self.metrics.request_done(msg.TYPE, code, trio.current_time() - started)
        return True

    def _call_now(
        self, msg: Message, handler: Callable[..., T], *args: Any
    ) -> T | ServiceError | None:
        """A synchronous handler path's outcome: what it returned, the ServiceError it raised,
        INTERNAL for a bug (logged), or None when it raised CloseConnection (the task path
        then answers and closes, as for any handler)."""
        try:
            return handler(*args)
        except CloseConnection:
            return None
        except ServiceError as error:
            return error
        except Exception:
            logger.exception("handler failed on %s from %s", msg.TYPE, self.peer.name)
            return Internal("internal error")

    def _decode(self, data: bytes) -> tuple[int, Message] | None:
        """The request, or None when it was answered with BAD_REQUEST at once."""
        try:
            return decode_message(data)
        except DecodeError as error:
            rid = _request_id_of(data)
            self.metrics.request_done("undecodable", ErrorCode.BAD_REQUEST.value, 0.0)
            if rid is None:
                raise
            self.link.queue(
                self.link.channel.send(
                    encode_message(rid, Error(ErrorCode.BAD_REQUEST.value, error.message, {}))
                )
            )
            return None

    def _refusal(self) -> str | None:
        if self.revoked is not None and self.revoked(self.peer):
            return f"principal {self.peer.name!r} has been revoked"
        if self.peer.expires_at is not None and self.clock() >= self.peer.expires_at:
            return f"the credentials of {self.peer.name!r} have expired"
        return None

    async def _end_with(self, rid: int, error: ServiceError) -> None:
        """Answer `rid` with `error`, then close the connection with the same code."""
        await self._send_reply(rid, _error_reply(error))
        self.link.queue(self.link.channel.close(error.message, error.code.value))
        await self.link.flush()

    async def _handle(self, rid: int, msg: Message, nursery: trio.Nursery) -> None:
        observe_context.set_request(observe_context.request_id(self.connection_id, rid))
        started = trio.current_time()
        code: str | None = None  # None: answered without an error
        try:
            try:
                reply = await self._call_handler(msg)
            except CloseConnection as close:
                code = close.error.code.value
                await self._end_with(rid, close.error)
                nursery.cancel_scope.cancel()
                return
            if isinstance(reply, Error):
                code = reply.code
            await self._send_reply(rid, reply)
        except Unavailable:
            nursery.cancel_scope.cancel()  # the connection is gone; stop the others too
        finally:
            self.inflight.release()
            self.finished(msg.TYPE, code, started)

    async def _call_handler(self, msg: Message) -> Message:
        outcome: Message | ServiceError
        try:
            outcome = await self.handler(self.peer, msg)
        except CloseConnection:
            raise
        except ServiceError as error:
            outcome = error
        except Exception:
            logger.exception("handler failed on %s from %s", msg.TYPE, self.peer.name)
            outcome = Internal("internal error")
        return _reply_for(msg, outcome)

    def finished(self, msg_type: str, code: str | None, started: float) -> None:
        """Count a request answered (error `code`, None: ok) and log it at debug level."""
        elapsed_s = trio.current_time() - started
        self.metrics.request_done(msg_type, code, elapsed_s)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s from %s: %s in %.3f ms", msg_type, self.peer.name, code or "ok", elapsed_s * 1e3
            )

    async def _send_reply(self, rid: int, reply: Message) -> None:
        self._queue_reply(rid, reply)
        # Other handlers of this connection may finish in this scheduling pass: let their
        # replies join the write. A lone one (a client with one request at a time) goes now.
        others_running = self.inflight.value < MAX_INFLIGHT_PER_CONNECTION - 1
        await self.link.flush(join=others_running)

    def flush_deferred(self) -> None:
        """Send the deferred replies queued since the last write: at once when the socket
        takes them all, else in a task; nothing when a write is under way (it sends them)."""
        link = self.link
        if self.nursery is None or link.broken is not None or link.flushing or not link.has_queued:
            return
        if not link.write_nowait():
            self.nursery.start_soon(self._finish_flush)

    async def _finish_flush(self) -> None:
        try:
            await self.link.flush(join=False)
        except Unavailable:
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()  # the connection is gone

    def _queue_reply(self, rid: int, reply: Message) -> None:
        channel = self.link.channel
        try:
            payload = encode_message(rid, reply)
        except LocalProtocolError as error:
            logger.error("cannot encode reply %s: %s", reply.TYPE, error.message)
            payload = encode_message(rid, Error(ErrorCode.INTERNAL.value, "internal error", {}))
        if len(payload) > channel.max_payload_bytes:
            too_large = TooLarge(f"reply of {len(payload)} bytes is over the frame limit")
            payload = encode_message(rid, Error(too_large.code.value, too_large.message, {}))
        if not channel.can_send:
            return  # the connection is closing; nobody will read this
        self.link.queue(channel.send(payload))


def _error_reply(error: ServiceError) -> Error:
    return Error(error.code.value, error.message, error.detail)


def _reply_for(msg: Message, outcome: object) -> Message:
    """What to send for a handler's outcome: a Message as it is, a ServiceError as its Error,
    anything else (a handler bug, logged) as INTERNAL."""
    if isinstance(outcome, Message):
        return outcome
    if isinstance(outcome, ServiceError):
        return _error_reply(outcome)
    logger.error("handler returned %r for %s, not a Message", type(outcome), msg.TYPE)
    return Error(ErrorCode.INTERNAL.value, "internal error", {})


class _DeferredReply:
    """The responder of one deferred request (`Respond`): queues the reply on its link, frees
    the inflight slot, counts the request, and has the link flushed once the current task
    yields, so the replies one batch completes leave with one write per connection."""

    __slots__ = ("answered", "connection", "rid", "started", "type")

    def __init__(self, connection: _ServerConnection, rid: int, type_: str, started: float):
        self.connection = connection
        self.rid = rid
        self.type = type_
        self.started = started
        self.answered = False

    def __call__(self, outcome: Message | ServiceError) -> None:
        if self.answer(outcome):
            _schedule_flush(self.connection)

    def answer(self, outcome: Message | ServiceError) -> bool:
        """Queue the reply; False when it was answered before (a bug: logged, ignored)."""
        if self.answered:
            logger.error("%s request %d answered twice; the second is dropped", self.type, self.rid)
            return False
        self.answered = True
        connection = self.connection
        connection.inflight.release()
        reply = _error_reply(outcome) if isinstance(outcome, ServiceError) else outcome
        connection._queue_reply(self.rid, reply)
        if logger.isEnabledFor(logging.DEBUG):  # in the answering task: name the request
            observe_context.set_request(
                observe_context.request_id(connection.connection_id, self.rid)
            )
        connection.finished(self.type, reply.code if type(reply) is Error else None, self.started)
        return True


class _Flusher:
    """One system task per trio run that flushes the links given deferred replies: woken
    (no system call, unlike `run_sync_soon`) after the task that answered them yields, it
    writes each such link once, however many replies it got."""

    def __init__(self) -> None:
        self.waiting: list[_ServerConnection] = []
        self.wake = trio.Event()

    def schedule(self, connection: _ServerConnection) -> None:
        if not connection.flush_scheduled:
            connection.flush_scheduled = True
            self.waiting.append(connection)
            self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            connections, self.waiting = self.waiting, []
            for connection in connections:
                connection.flush_scheduled = False
                try:
                    connection.flush_deferred()
                except Exception:  # a system task must never raise: it would end the run
                    logger.exception("flushing deferred replies failed")


_FLUSHER: trio.lowlevel.RunVar[_Flusher] = trio.lowlevel.RunVar("keyval_net_flusher")


def _schedule_flush(connection: _ServerConnection) -> None:
    """Flush `connection`'s link once the running task yields."""
    try:
        flusher = _FLUSHER.get()
    except LookupError:
        flusher = _Flusher()
        _FLUSHER.set(flusher)
        trio.lowlevel.spawn_system_task(flusher.run, name="keyval.net flusher")
    flusher.schedule(connection)


def _request_id_of(data: bytes) -> int | None:
    """The request id of an envelope whose message could not be decoded, if it has one."""
    try:
        envelope = codec.decode(data)
    except DecodeError:
        return None
    if type(envelope) is not list or len(envelope) != 3:
        return None
    rid = envelope[1]
    if type(rid) is not int or not 0 < rid <= MAX_REQUEST_ID:
        return None
    return rid


async def serve_stream(
    stream: trio.abc.Stream,
    auth: ServerAuth,
    handler: Handler,
    *,
    revoked: Revoked | None = None,
    clock: Clock = time.time,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> None:
    """Serve one connection until it ends; always closes `stream`. Never raises for anything
    the peer does: a bad peer only loses its own connection."""
    link = _Link(stream, ServerChannel(auth, now=clock(), max_frame_bytes=max_frame_bytes))
    reason = "server stopped"
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
            done = await link.handshake()
        if scope.cancelled_caught:
            reason = f"handshake not done within {HANDSHAKE_TIMEOUT_S} s"
            return
        reason = await _ServerConnection(link, done.peer, handler, revoked, clock).run()
    except WireError as error:
        reason = f"{type(error).__name__}: {error.message}"
    finally:
        logger.debug("connection ended: %s", reason)
        await link.aclose("server closing")


async def serve(
    listen: str,
    auth_factory: Callable[[], ServerAuth],
    handler: Handler,
    *,
    revoked: Revoked | None = None,
    clock: Clock = time.time,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `host:port` (port 0 picks one) and serve every connection until cancelled.
    `task_status.started` receives the bound `host:port`."""
    parse_address(listen)
    listeners, bound = await current_transport().listen(listen)
    connections = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def on_stream(stream: trio.abc.Stream) -> None:
        try:
            connections.acquire_nowait()
        except trio.WouldBlock:
            logger.warning("refusing a connection: %d already open", MAX_CONNECTIONS)
            await stream.aclose()
            return
        try:
            await serve_stream(
                stream,
                auth_factory(),
                handler,
                revoked=revoked,
                clock=clock,
                max_frame_bytes=max_frame_bytes,
            )
        except Exception:  # a bug in one connection must not stop the server
            logger.exception("connection task failed")
        finally:
            connections.release()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_stream, listeners)
        task_status.started(bound)


__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "DEFERRED",
    "HANDSHAKE_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "MAX_INFLIGHT_PER_CONNECTION",
    "TRANSPORT",
    "CloseConnection",
    "Connection",
    "Deferred",
    "DeferringHandler",
    "InlineHandler",
    "Respond",
    "TcpTransport",
    "Transport",
    "current_transport",
    "open_connection",
    "parse_address",
    "serve",
    "serve_stream",
]
