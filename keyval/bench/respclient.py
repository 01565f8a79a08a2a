"""A pipelined RESP connection over a trio socket, built like keyval.net's connections.

Many tasks share one connection: each `request` queues its command and waits; one writer task
sends everything queued in one `send_all` (writes coalesce, as keyval.net's do) and one reader
task hands replies to waiters in order (RESP replies come back in command order).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator

import trio

from keyval.bench.errors import ConnectionLost, RespReplyError
from keyval.bench.resp import Argument, NeedData, Reply, RespError, RespParser, encode_command

# Commands in flight on one connection; a task asking for more waits (bounded, like
# keyval.net's MAX_INFLIGHT_PER_CONNECTION). The bench's deepest pipeline is a few hundred.
MAX_INFLIGHT = 4096
RECEIVE_BYTES = 256 * 1024  # one read from the socket


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | BaseException = None


class RespConnection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._parser = RespParser()
        self._outgoing: list[bytes] = []
        self._waiters: deque[_Waiter] = deque()
        self._wakeup = trio.Event()
        self._slots = trio.Semaphore(MAX_INFLIGHT)
        self._failure: BaseException | None = None

    async def request(self, *args: Argument) -> Reply:
        """Send one command, wait for its reply; an error reply raises RespReplyError."""
        reply = await self.request_raw(*args)
        if isinstance(reply, RespError):
            raise RespReplyError(reply.message)
        return reply

    async def request_raw(self, *args: Argument) -> Reply:
        """Like `request`, but an error reply is returned as a RespError."""
        return (await self.pipeline([args]))[0]

    async def pipeline(self, commands: list[tuple[Argument, ...]]) -> list[Reply]:
        """Queue several commands back to back (nothing else in between on this connection)
        and wait for all their replies; error replies are returned as RespError."""
        if not 1 <= len(commands) <= MAX_INFLIGHT:
            raise ValueError(f"a pipeline holds 1..{MAX_INFLIGHT} commands, not {len(commands)}")
        waiters = [_Waiter() for _ in commands]
        for _ in commands:
            await self._slots.acquire()
        try:
            if self._failure is not None:
                raise ConnectionLost(f"redis connection failed: {self._failure}")
            self._outgoing.extend(encode_command(*args) for args in commands)
            self._waiters.extend(waiters)
            self._wakeup.set()
            await waiters[-1].done.wait()  # replies arrive in order: the last one comes last
        finally:
            for _ in commands:
                self._slots.release()
        replies = []
        for waiter in waiters:
            if isinstance(waiter.reply, BaseException):
                raise ConnectionLost(f"redis connection failed: {waiter.reply}")
            replies.append(waiter.reply)
        return replies

    async def _write_loop(self) -> None:
        while True:
            if not self._outgoing:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            data = b"".join(self._outgoing)
            self._outgoing.clear()
            await self._stream.send_all(data)

    async def _read_loop(self) -> None:
        while True:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ConnectionLost("redis closed the connection")
            self._parser.receive_data(data)
            while not isinstance(reply := self._parser.next_reply(), NeedData):
                if not self._waiters:
                    raise ConnectionLost("redis sent a reply nobody asked for")
                waiter = self._waiters.popleft()
                waiter.reply = reply
                waiter.done.set()

    def _fail_all(self, error: BaseException) -> None:
        self._failure = error
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.reply = error
            waiter.done.set()

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._read_loop)
                task_status.started()
        except* (ConnectionLost, OSError, trio.BrokenResourceError) as group:
            self._fail_all(group.exceptions[0])
        finally:
            self._fail_all(self._failure or ConnectionLost("connection closed"))


@contextlib.asynccontextmanager
async def open_resp_connection(
    host: str, port: int, *, timeout_s: float
) -> AsyncIterator[RespConnection]:
    """`async with open_resp_connection(host, port, timeout_s=5) as redis:`."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        connection = RespConnection(stream)
        await nursery.start(connection._run)
        try:
            yield connection
        finally:
            nursery.cancel_scope.cancel()
