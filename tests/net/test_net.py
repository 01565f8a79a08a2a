"""keyval.net over memory streams (most tests) and real loopback TCP (a few)."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from keyval import net
from keyval.net import Connection, open_connection, parse_address, serve, serve_stream
from wire import codec
from wire.channel import (
    NEED_DATA,
    ClientChannel,
    Closed,
    HandshakeDone,
    PeerInfo,
    PskClientAuth,
    PskServerAuth,
)
from wire.errors import (
    AuthenticationError,
    BadRequest,
    Forbidden,
    Internal,
    LocalProtocolError,
    NotFound,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from wire.messages import Message, Ok, Ping, message

PSK = b"0123456789abcdef0123456789abcdef"


@message("test_net.echo")
class Echo(Message):
    value: Any
    delay_s: float = 0.0


@message("test_net.fail")
class Fail(Message):
    kind: str


@message("test_net.block")
class Block(Message):
    pass


def client_auth(psk: bytes = PSK) -> PskClientAuth:
    return PskClientAuth("alice", "client", psk)


def server_auth() -> PskServerAuth:
    return PskServerAuth({"alice": ("client", PSK)}, server_name="drone-1", server_role="drone")


class App:
    """A request handler that records what it saw."""

    def __init__(self) -> None:
        self.peers: list[PeerInfo] = []
        self.active = 0
        self.most_active = 0
        self.release = trio.Event()

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        self.peers.append(peer)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            return await self._answer(msg)
        finally:
            self.active -= 1

    async def _answer(self, msg: Message) -> Message:
        if isinstance(msg, Echo):
            await trio.sleep(msg.delay_s)
            return Echo(msg.value)
        if isinstance(msg, Fail) and msg.kind != "close":
            if msg.kind == "not_found":
                raise NotFound("no such key", detail={"key": "k"})
            if msg.kind == "crash":
                raise RuntimeError("bug in the handler")
            return "not a message"  # type: ignore[return-value]
        if isinstance(msg, Fail) and msg.kind == "close":
            raise net.CloseConnection(Forbidden("you are done here"))
        if isinstance(msg, Block):
            await self.release.wait()
            return Ok()
        return Ok()


async def block_until_unavailable(conn: Connection, failures: list[Unavailable]) -> None:
    """A request the server never answers; the Unavailable it ends with goes to `failures`."""
    try:
        await conn.request(Block())
    except Unavailable as error:
        failures.append(error)


@asynccontextmanager
async def memory_connection(
    app: App, **server_options: Any
) -> AsyncIterator[tuple[Connection, trio.Nursery]]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_stream(server_stream, server_auth(), app, **server_options)
        )
        conn = await Connection.from_stream(client_stream, client_auth())
        try:
            yield conn, nursery
        finally:
            await conn.aclose()


async def test_request_reply_over_memory_streams(autojump_clock: trio.abc.Clock) -> None:
    app = App()
    async with memory_connection(app) as (conn, _):
        assert conn.peer == PeerInfo("drone-1", "drone")
        assert await conn.request(Echo({"k": [1, 2, b"x"]})) == Echo({"k": [1, 2, b"x"]})
        assert await conn.request(Ping()) == Ok()
    assert app.peers[0] == PeerInfo("alice", "client")


async def test_a_thousand_pipelined_requests_from_many_tasks(
    autojump_clock: trio.abc.Clock,
) -> None:
    app = App()
    rng = random.Random(7)
    delays = [rng.random() for _ in range(1000)]
    results: dict[int, Message] = {}
    async with memory_connection(app) as (conn, _):

        async def one(index: int) -> None:
            results[index] = await conn.request(Echo(index, delays[index]))

        async with trio.open_nursery() as nursery:
            for index in range(1000):
                nursery.start_soon(one, index)
        stats = conn.statistics()
    assert results == {index: Echo(index) for index in range(1000)}
    assert app.most_active == net.MAX_INFLIGHT_PER_CONNECTION  # bounded, and used in full
    assert stats["writes"] < stats["frames_sent"] / 10  # requests were coalesced into writes


async def test_service_error_reaches_the_caller_typed(autojump_clock: trio.abc.Clock) -> None:
    async with memory_connection(App()) as (conn, _):
        with pytest.raises(NotFound) as caught:
            await conn.request(Fail("not_found"))
        assert caught.value.message == "no such key"
        assert caught.value.detail == {"key": "k"}
        assert await conn.request(Ping()) == Ok()  # the connection lives on


async def test_handler_crash_is_internal_and_logged(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with memory_connection(App()) as (conn, _):
        with caplog.at_level(logging.ERROR, logger="keyval.net"):
            with pytest.raises(Internal):
                await conn.request(Fail("crash"))
            with pytest.raises(Internal):
                await conn.request(Fail("bad_reply"))
        assert "bug in the handler" in caplog.text
        assert await conn.request(Ping()) == Ok()


async def test_connection_loss_fails_every_waiting_request(
    autojump_clock: trio.abc.Clock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    app = App()
    failures: list[Unavailable] = []
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def run_server() -> None:
            with server_scope:
                await serve_stream(server_stream, server_auth(), app)

        nursery.start_soon(run_server)
        conn = await Connection.from_stream(client_stream, client_auth())

        async with trio.open_nursery() as waiters:
            for _ in range(20):
                waiters.start_soon(block_until_unavailable, conn, failures)
            await trio.sleep(1)
            assert app.active == 20
            server_scope.cancel()  # the server goes away: its stream closes without a close
        assert len(failures) == 20
        with pytest.raises(Unavailable):
            await conn.request(Ping())
        await conn.aclose()


async def test_request_timeout_then_connection_still_works(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_connection(App()) as (conn, _):
        with pytest.raises(Timeout):
            await conn.request(Echo("slow", 5.0), timeout=1.0)
        assert await conn.request(Echo("fast")) == Echo("fast")
        await trio.sleep(10)  # the late reply arrives and is dropped
        assert await conn.request(Ping()) == Ok()


async def test_oversized_request_is_refused_locally(autojump_clock: trio.abc.Clock) -> None:
    async with memory_connection(App()) as (conn, _):
        with pytest.raises(TooLarge):
            await conn.request(Echo(b"x" * (1024 * 1024)))
        assert await conn.request(Ping()) == Ok()


async def test_oversized_reply_becomes_too_large(autojump_clock: trio.abc.Clock) -> None:
    class Doubler(App):
        async def _answer(self, msg: Message) -> Message:
            assert isinstance(msg, Echo)
            return Echo(msg.value * 2)

    async with memory_connection(Doubler()) as (conn, _):
        with pytest.raises(TooLarge):
            await conn.request(Echo(b"x" * (600 * 1024)))


async def test_revoked_principal_is_cut_off(autojump_clock: trio.abc.Clock) -> None:
    revoked: set[str] = set()
    async with memory_connection(App(), revoked=lambda peer: peer.name in revoked) as (conn, _):
        assert await conn.request(Ping()) == Ok()
        revoked.add("alice")
        with pytest.raises(Unauthorized, match="revoked"):
            await conn.request(Ping())
        with pytest.raises(Unavailable, match="UNAUTHORIZED"):
            await conn.request(Ping())


async def test_expired_credentials_are_cut_off(autojump_clock: trio.abc.Clock) -> None:
    class ExpiringAuth(PskServerAuth):
        def accept(self, hello: dict[str, Any], now: float) -> tuple[PeerInfo, bytes]:
            peer, secret = super().accept(hello, now)
            return PeerInfo(peer.name, peer.role, expires_at=now + 60), secret

    times = [1000.0]
    client_stream, server_stream = trio.testing.memory_stream_pair()
    auth = ExpiringAuth({"alice": ("client", PSK)})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server_stream, auth, App(), clock=lambda: times[0]))
        async with await Connection.from_stream(client_stream, client_auth()) as conn:
            assert await conn.request(Ping()) == Ok()
            times[0] += 61
            with pytest.raises(Unauthorized, match="expired"):
                await conn.request(Ping())


async def test_wrong_key_fails_the_handshake_on_both_sides(
    autojump_clock: trio.abc.Clock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    app = App()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, server_stream, server_auth(), app)
        with pytest.raises(AuthenticationError, match="could not prove"):
            await Connection.from_stream(client_stream, client_auth(b"x" * 32))
    assert app.peers == []


async def test_silent_client_is_dropped_after_the_handshake_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    started = trio.current_time()
    await serve_stream(server_stream, server_auth(), App())  # returns: it gave up
    assert trio.current_time() - started == pytest.approx(net.HANDSHAKE_TIMEOUT_S)
    await client_stream.aclose()


async def test_client_handshake_deadline(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()  # nobody serves
    with pytest.raises(Timeout):
        await Connection.from_stream(client_stream, client_auth(), timeout=2.0)
    await server_stream.aclose()


async def test_undecodable_request_gets_bad_request(autojump_clock: trio.abc.Clock) -> None:
    """A request of a type the server does not know is answered, not fatal."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, server_stream, server_auth(), App())
        channel = ClientChannel(client_auth())
        await client_stream.send_all(channel.data_to_send())
        events: list[object] = []
        while not any(isinstance(event, HandshakeDone) for event in events):
            event = channel.next_event()
            if event is NEED_DATA:
                await client_stream.send_all(channel.data_to_send())
                channel.receive_data(await client_stream.receive_some())
            else:
                events.append(event)
        await client_stream.send_all(channel.send(codec.encode(["no.such", 5, {}])))
        while (event := channel.next_event()) is NEED_DATA:
            channel.receive_data(await client_stream.receive_some())
        reply = codec.decode(event.data)  # type: ignore[union-attr]
        assert reply[:2] == ["error", 5]
        assert reply[2]["code"] == BadRequest.code
        assert "no.such" in reply[2]["message"]
        await client_stream.send_all(channel.close())
        await client_stream.aclose()


async def test_request_after_close_is_unavailable(autojump_clock: trio.abc.Clock) -> None:
    async with memory_connection(App()) as (conn, _):
        await conn.aclose()
        assert conn.is_closed
        with pytest.raises(Unavailable):
            await conn.request(Ping())


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:6230") == ("127.0.0.1", 6230)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("nohost", ":80", "host:", "host:99999", "host:-1"):
        with pytest.raises(LocalProtocolError):
            parse_address(bad)


# --- real loopback TCP -------------------------------------------------------------------


async def test_request_reply_over_tcp() -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve, "127.0.0.1:0", server_auth, App())
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        with trio.fail_after(10):
            async with await open_connection(address, client_auth(), timeout=5) as conn:
                replies: list[Message] = []

                async def one(index: int) -> None:
                    replies.append(await conn.request(Echo(index)))

                async with trio.open_nursery() as clients:
                    for index in range(50):
                        clients.start_soon(one, index)
                assert sorted(r.value for r in replies if isinstance(r, Echo)) == list(range(50))
                assert await conn.request(Echo(b"\x00" * 200_000)) == Echo(b"\x00" * 200_000)
        nursery.cancel_scope.cancel()


async def test_garbage_peer_does_not_disturb_another_connection() -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve, "127.0.0.1:0", server_auth, App())
        host, port = parse_address(address)
        with trio.fail_after(10):
            async with await open_connection(address, client_auth()) as good:
                assert await good.request(Ping()) == Ok()
                garbage = await trio.open_tcp_stream(host, port)
                await garbage.send_all(random.Random(1).randbytes(5000))
                with contextlib.suppress(trio.BrokenResourceError):  # a reset is fine too
                    assert await garbage.receive_some(65536) == b""  # the server hung up
                await garbage.aclose()
                huge = await trio.open_tcp_stream(host, port)
                await huge.send_all(b"\xff\xff\xff\xff")  # a 4 GiB frame announced
                assert await huge.receive_some(65536) == b""
                await huge.aclose()
                assert await good.request(Echo("still here")) == Echo("still here")
        nursery.cancel_scope.cancel()


async def test_connect_to_closed_port_is_unavailable() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(Unavailable, match="cannot connect"):
        await open_connection(f"127.0.0.1:{port}", client_auth(), timeout=5)


async def test_unreadable_envelope_closes_with_a_protocol_reason(
    autojump_clock: trio.abc.Clock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, server_stream, server_auth(), App())
        channel = ClientChannel(client_auth())
        done = False
        while not done:
            event = channel.next_event()
            await client_stream.send_all(channel.data_to_send())
            if event is NEED_DATA:
                channel.receive_data(await client_stream.receive_some())
            done = isinstance(event, HandshakeDone)
        await client_stream.send_all(channel.send(b"\xff not cbor"))
        while (event := channel.next_event()) is NEED_DATA:
            channel.receive_data(await client_stream.receive_some())
        assert isinstance(event, Closed)
        assert event.code == "BAD_REQUEST" and "malformed CBOR" in event.reason
        await client_stream.aclose()


class FlakyStream(trio.abc.Stream):
    """A real stream whose writes can be made to fail, as a dead socket's do."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.fail_writes = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.fail_writes:
            raise trio.BrokenResourceError("connection reset")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_reader_that_times_out_hands_reading_to_a_waiting_request(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The first request reads for everyone; when it gives up, a request still waiting takes
    over the reading, so its own reply (arriving later) still reaches it."""
    async with memory_connection(App()) as (conn, _):
        finished: dict[str, float] = {}

        async def reader() -> None:
            with pytest.raises(Timeout):
                await conn.request(Block(), timeout=1.0)
            finished["reader"] = trio.current_time()

        async def waiter() -> None:
            assert await conn.request(Echo("late", delay_s=2.0), timeout=10.0) == Echo("late")
            finished["waiter"] = trio.current_time()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.1)  # the first request holds the reader role
            nursery.start_soon(waiter)
        assert finished["reader"] - start == pytest.approx(1.0, abs=0.01)
        assert finished["waiter"] - start == pytest.approx(2.1, abs=0.01)  # not at its deadline


async def test_failed_write_fails_the_reader_and_every_waiter_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    flaky = FlakyStream(client_stream)
    app = App()
    failures: list[Unavailable] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, server_stream, server_auth(), app)
        conn = await Connection.from_stream(flaky, client_auth())

        with trio.fail_after(5):  # well before the 30 s request deadline
            async with trio.open_nursery() as waiters:
                for _ in range(5):
                    waiters.start_soon(block_until_unavailable, conn, failures)
                await trio.sleep(1)
                flaky.fail_writes = True
                with pytest.raises(Unavailable, match="connection reset"):
                    await conn.request(Ping())
        assert len(failures) == 5
        await conn.aclose()


async def test_failed_write_over_tcp_wakes_the_reader_waiting_on_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over TCP the reader waits on the socket with no cancel scope of its own; a write that
    fails in another task must still wake it (and every waiter) at once."""
    failures: list[Unavailable] = []
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve, "127.0.0.1:0", server_auth, App())
        with trio.fail_after(10):  # well before the 30 s request deadline
            conn = await open_connection(address, client_auth(), timeout=5)
            direct = conn._link.direct
            assert direct is not None  # the TCP path, not a wrapped stream

            async with trio.open_nursery() as waiters:
                for _ in range(5):
                    waiters.start_soon(block_until_unavailable, conn, failures)
                while conn.statistics()["frames_sent"] < 5 or not conn._reading:
                    await trio.sleep(0.01)

                def reset(data: memoryview) -> int:
                    raise ConnectionResetError("connection reset by peer")

                monkeypatch.setattr(direct, "send_nowait", reset)
                with pytest.raises(Unavailable, match="connection reset"):
                    await conn.request(Ping())
            assert len(failures) == 5
            await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_handler_can_close_the_connection(autojump_clock: trio.abc.Clock) -> None:
    app = App()
    async with memory_connection(app) as (conn, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.request, Ping())  # answered before the close
            blocked: list[BaseException] = []

            async def blocked_request() -> None:
                try:
                    await conn.request(Block())
                except Unavailable as error:
                    blocked.append(error)

            nursery.start_soon(blocked_request)
            await trio.sleep(1)
            with pytest.raises(Forbidden, match="done here"):
                await conn.request(Fail("close"))
        assert len(blocked) == 1 and "FORBIDDEN" in str(blocked[0])
        with pytest.raises(Unavailable):
            await conn.request(Ping())
