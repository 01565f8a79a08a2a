"""keyval.net's deferred path: a handler admits a request without a task and answers it later.

Over memory streams (the flush goes through a task there) and over TCP (a direct socket: the
replies given in one task turn leave in one write per connection, with no task).
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from keyval.net import (
    DEFERRED,
    MAX_INFLIGHT_PER_CONNECTION,
    Deferred,
    Respond,
    open_connection,
    serve,
)
from tests.net.test_inline import connected
from tests.net.test_net import Echo, Fail, client_auth, server_auth
from wire.channel import PeerInfo
from wire.errors import Conflict, Internal, NotFound
from wire.messages import Message, Ok


class DeferringApp:
    """Defers every Echo (the test answers through `held`), fails Fail as asked, and leaves
    everything else to the task path."""

    def __init__(self) -> None:
        self.held: list[tuple[Echo, Respond]] = []
        self.awaited = 0
        self.admitted = trio.Event()  # set and replaced at each deferred admission

    def handle_deferred(
        self, peer: PeerInfo, msg: Message, respond: Respond
    ) -> Message | Deferred | None:
        if isinstance(msg, Echo):
            self.held.append((msg, respond))
            self.admitted.set()
            self.admitted = trio.Event()
            return DEFERRED
        if isinstance(msg, Fail):
            if msg.kind == "not_found":
                raise NotFound("no such key")
            if msg.kind == "crash":
                raise RuntimeError("bug in the deferring handler")
            return Ok()  # answered at once
        return None

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        self.awaited += 1
        return Ok()

    def answer_all(self) -> None:
        held, self.held = self.held, []
        for msg, respond in held:
            respond(Echo(msg.value))


async def test_deferred_requests_are_answered_when_the_handler_responds(
    autojump_clock: trio.abc.Clock,
) -> None:
    app = DeferringApp()
    results: dict[int, Message] = {}
    async with connected(app) as conn:

        async def one(index: int) -> None:
            results[index] = await conn.request(Echo(index))

        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(one, index)
            while len(app.held) < 5:
                await app.admitted.wait()
            assert results == {}  # nothing answered before the handler responds
            app.answer_all()
        assert results == {index: Echo(index) for index in range(5)}
        assert await conn.request(Fail("ok")) == Ok()  # answered at once, on the same path
        assert app.awaited == 0


async def test_errors_of_a_deferred_request_are_typed(autojump_clock: trio.abc.Clock) -> None:
    app = DeferringApp()
    async with connected(app) as conn:
        with pytest.raises(NotFound):
            await conn.request(Fail("not_found"))  # raised at admission
        with pytest.raises(Internal):
            await conn.request(Fail("crash"))  # a bug: INTERNAL, the connection lives on
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException] = []

            async def conflicted() -> None:
                try:
                    await conn.request(Echo("x"))
                except Conflict as error:
                    outcome.append(error)

            nursery.start_soon(conflicted)
            await app.admitted.wait()
            _msg, respond = app.held.pop()
            respond(Conflict("lost the race", detail={"version": 3}))  # answered later
        assert isinstance(outcome[0], Conflict) and outcome[0].detail == {"version": 3}
        assert await conn.request(Fail("ok")) == Ok()


async def test_back_pressure_at_the_inflight_bound(autojump_clock: trio.abc.Clock) -> None:
    """Unanswered deferred requests hold their slots: the server stops reading at the bound
    and reads on as they are answered."""
    app = DeferringApp()
    total = MAX_INFLIGHT_PER_CONNECTION + 20
    results: dict[int, Message] = {}
    async with connected(app) as conn:

        async def one(index: int) -> None:
            results[index] = await conn.request(Echo(index))

        async with trio.open_nursery() as nursery:
            for index in range(total):
                nursery.start_soon(one, index)
            await trio.sleep(1)  # everything the server would read has been read
            assert len(app.held) == MAX_INFLIGHT_PER_CONNECTION
            first = app.held[:10]
            del app.held[:10]
            for msg, respond in first:
                respond(Echo(msg.value))
            await trio.sleep(1)
            assert len(app.held) == MAX_INFLIGHT_PER_CONNECTION  # 10 freed, 10 more admitted
            assert len(results) == 10
            while len(results) < total:
                app.answer_all()
                await trio.sleep(0.1)
        assert results == {index: Echo(index) for index in range(total)}


async def test_a_reply_after_the_connection_closed_is_dropped(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    app = DeferringApp()
    async with connected(app) as conn:
        async with trio.open_nursery() as nursery:

            async def orphan() -> None:
                with pytest.raises(Exception):  # noqa: B017 - the connection goes away
                    await conn.request(Echo("late"))

            nursery.start_soon(orphan)
            await app.admitted.wait()
            await conn.aclose()
    await trio.sleep(0.5)  # the server has seen the close
    caplog.set_level(logging.ERROR, logger="keyval.net")
    _msg, respond = app.held.pop()
    respond(Echo("late"))  # no crash, nothing sent
    respond(Echo("twice"))  # a second answer is a bug: logged, ignored
    assert "answered twice" in caplog.text


async def test_over_tcp_the_replies_of_one_turn_are_flushed_after_it() -> None:
    app = DeferringApp()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve, "127.0.0.1:0", server_auth, app)
        conn = await open_connection(bound, client_auth())
        results: dict[int, Message] = {}

        async def one(index: int) -> None:
            results[index] = await conn.request(Echo(index))

        with trio.fail_after(10):
            async with trio.open_nursery() as requests:
                for index in range(32):
                    requests.start_soon(one, index)
                while len(app.held) < 32:
                    await app.admitted.wait()
                app.answer_all()  # one turn: 32 replies, flushed together after it
        assert results == {index: Echo(index) for index in range(32)}
        await conn.aclose()
        nursery.cancel_scope.cancel()
