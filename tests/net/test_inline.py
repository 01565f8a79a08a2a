"""keyval.net's inline path: handlers with `handle_nowait` answer in the reading task."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from keyval.net import (
    CloseConnection,
    Connection,
    Handler,
    open_connection,
    serve,
    serve_stream,
)
from tests.net.test_net import Echo, Fail, client_auth, server_auth
from wire.channel import PeerInfo
from wire.errors import Forbidden, Internal, NotFound, Unavailable
from wire.messages import Message, Ok, Ping


class InlineApp:
    """Answers Ping and Echo(delay 0) inline; everything else on the concurrent path."""

    def __init__(self) -> None:
        self.inline = 0
        self.awaited = 0

    def handle_nowait(self, peer: PeerInfo, msg: Message) -> Message | None:
        if isinstance(msg, Ping):
            self.inline += 1
            return Ok()
        if isinstance(msg, Echo) and msg.delay_s == 0.0:
            self.inline += 1
            return Echo(msg.value)
        if isinstance(msg, Fail):
            return self._fail(msg.kind)
        return None

    def _fail(self, kind: str) -> Message | None:
        if kind == "not_found":
            raise NotFound("no such key", detail={"key": "k"})
        if kind == "crash":
            raise RuntimeError("bug in the inline handler")
        if kind == "close":
            raise CloseConnection(Forbidden("you are done here"))
        return "not a message"  # type: ignore[return-value]

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        self.awaited += 1
        if isinstance(msg, Echo):
            await trio.sleep(msg.delay_s)
            return Echo(msg.value)
        if isinstance(msg, Fail) and msg.kind == "close":
            raise CloseConnection(Forbidden("you are done here"))
        return Ok()


@asynccontextmanager
async def connected(app: Handler) -> AsyncIterator[Connection]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, server_stream, server_auth(), app)
        conn = await Connection.from_stream(client_stream, client_auth())
        try:
            yield conn
        finally:
            await conn.aclose()


async def test_cheap_requests_are_answered_inline(autojump_clock: trio.abc.Clock) -> None:
    app = InlineApp()
    async with connected(app) as conn:
        assert await conn.request(Ping()) == Ok()
        assert await conn.request(Echo([1, "x"])) == Echo([1, "x"])
        assert await conn.request(Echo("slow", 0.5)) == Echo("slow")  # None: the await path
    assert (app.inline, app.awaited) == (2, 1)


class CountingStream(trio.abc.Stream):
    """A stream that counts the writes made through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_burst_is_answered_in_few_writes(autojump_clock: trio.abc.Clock) -> None:
    """Replies produced from one received chunk leave together, not one write each."""
    app = InlineApp()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    counted = CountingStream(server_stream)
    results: dict[int, Message] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, counted, server_auth(), app)
        conn = await Connection.from_stream(client_stream, client_auth())

        async def one(index: int) -> None:
            results[index] = await conn.request(Echo(index))

        async with trio.open_nursery() as requests:
            for index in range(500):
                requests.start_soon(one, index)
        await conn.aclose()
    assert results == {index: Echo(index) for index in range(500)}
    assert app.inline == 500 and app.awaited == 0
    assert counted.writes < 500 / 10  # the handshake and close are a few writes more


async def test_inline_service_error_is_a_typed_reply(autojump_clock: trio.abc.Clock) -> None:
    async with connected(InlineApp()) as conn:
        with pytest.raises(NotFound) as caught:
            await conn.request(Fail("not_found"))
        assert caught.value.detail == {"key": "k"}
        assert await conn.request(Ping()) == Ok()


async def test_inline_crash_and_bad_reply_are_internal(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(InlineApp()) as conn:
        with caplog.at_level(logging.ERROR, logger="keyval.net"):
            with pytest.raises(Internal):
                await conn.request(Fail("crash"))
            with pytest.raises(Internal):
                await conn.request(Fail("bad_reply"))
        assert "bug in the inline handler" in caplog.text
        assert await conn.request(Ping()) == Ok()


async def test_inline_close_goes_through_the_concurrent_path(
    autojump_clock: trio.abc.Clock,
) -> None:
    app = InlineApp()
    async with connected(app) as conn:
        with pytest.raises(Forbidden):
            await conn.request(Fail("close"))
        with pytest.raises(Unavailable):
            await conn.request(Ping())
    assert app.awaited == 1


async def test_large_replies_over_tcp_survive_partial_writes() -> None:
    """Replies bigger than the socket buffer take the direct path's wait-then-write loop."""
    app = InlineApp()
    big = bytes(range(256)) * 2000  # 512 KB: several socket buffers' worth in flight
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve("127.0.0.1:0", server_auth, app, task_status=task_status)
        )
        conn = await open_connection(address, client_auth())
        results: list[Message] = []

        async def one() -> None:
            results.append(await conn.request(Echo(big), timeout=20))

        with trio.fail_after(30):
            async with trio.open_nursery() as requests:
                for _ in range(8):
                    requests.start_soon(one)
        await conn.aclose()
        nursery.cancel_scope.cancel()
    assert results == [Echo(big)] * 8
    assert app.inline == 8
