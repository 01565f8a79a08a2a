"""Drone-side group commit: client writes go to the db in batches, one batch in flight.

`submit` queues one `DbOp` with a completion callback. The batch loop takes the first queued
op, gathers more for up to BATCH_WINDOW_MS or until the batch is full (BATCH_MAX_OPS,
BATCH_MAX_BYTES), sends one DbWriteBatch with the drone's current grant, waits for its
DbBatchResult, and only then sends the next: the db therefore sees this drone's writes in the
order versions were handed out. Each op's callback runs in the loop as soon as its result is
known (so in-memory applies happen even if the client that asked has gone away), then its
waiter wakes.

A db refusal of an op is that op's error; FENCED becomes UNAVAILABLE for the client, who
should refresh its slot map and retry. A lost db connection or timeout fails the whole batch
with UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from keyval.grants import Grant
from keyval.messages import DbBatchResult, DbOp, DbWriteBatch
from wire.errors import ErrorCode, Internal, ServiceError, Unavailable, service_error
from wire.messages import Message

log = logging.getLogger("keyval.drone")

# Group commit window: long enough to gather the writes that arrive while the db is busy with
# the previous batch, short next to a durable commit (~1-10 ms), so a lone write barely waits.
BATCH_WINDOW_MS = 2

# Ops per batch: bounds one db transaction and the result message (MAX_BATCH_ITEMS is 4096).
BATCH_MAX_OPS = 512

# Estimated encoded bytes per batch: stays under the 1 MiB frame with room for the grant and the
# envelope. One op larger than this (a big value) still goes, alone.
BATCH_MAX_BYTES = 640 * 1024

# Ops waiting for a batch: past this, writers wait (backpressure) instead of growing memory.
MAX_QUEUED_OPS = 8192

# How long the drone waits for the db to answer one batch before failing it.
DB_BATCH_TIMEOUT_MS = 10_000

# Retry hint when the db is unreachable or fenced this drone.
DB_RETRY_AFTER_MS = 200


class DbLink(Protocol):
    """One request/reply channel to the db (keyval.net.Connection has this shape)."""

    async def request(self, msg: Message, *, timeout: float) -> Message: ...


OpOutcome = tuple[list[int], None] | tuple[None, ServiceError]
Completion = Callable[[list[int] | None, ServiceError | None], None]


class _Queued:
    __slots__ = ("done", "error", "on_done", "op", "size_bytes", "versions")

    def __init__(self, op: DbOp, size_bytes: int, on_done: Completion) -> None:
        self.op = op
        self.size_bytes = size_bytes
        self.on_done = on_done
        self.done = trio.Event()
        self.versions: list[int] | None = None
        self.error: ServiceError | None = None


def client_error(error: ServiceError) -> ServiceError:
    """What the client hears for a db error: FENCED means 'refresh and retry elsewhere'."""
    if error.code in (ErrorCode.FENCED, ErrorCode.TIMEOUT):
        return Unavailable(
            f"the db refused the write: {error.message}",
            detail={"retry_after_ms": DB_RETRY_AFTER_MS, "db_code": str(error.code)},
        )
    return error


class WriteBatcher:
    """Queues DbOps and commits them to the db in order, one batch at a time."""

    def __init__(self, link: DbLink, grant: Callable[[], Grant | None]) -> None:
        self._link = link
        self._grant = grant
        self._send, self._receive = trio.open_memory_channel[_Queued](MAX_QUEUED_OPS)
        self.batches_sent = 0
        self.ops_sent = 0

    def set_link(self, link: DbLink) -> None:
        self._link = link

    async def submit(self, op: DbOp, size_bytes: int, on_done: Completion) -> _Queued:
        """Queue `op`; `on_done(versions, error)` runs in the batch loop when it resolves.

        Returns a handle whose `done` event is set after `on_done` has run. A cancelled caller
        still queues the op: its writes hold versions and pending marks that only `on_done`
        releases (an op dropped here left its keys pending for good; issue 9). The wait is for
        queue space only, which the batch loop frees within one db timeout per batch."""
        queued = _Queued(op, size_bytes, on_done)
        with trio.CancelScope(shield=True):
            await self._send.send(queued)
        return queued

    async def commit(self, op: DbOp, size_bytes: int, on_done: Completion) -> list[int]:
        """Submit and wait: the db's versions for `op`, or raise the client-facing error."""
        queued = await self.submit(op, size_bytes, on_done)
        await queued.done.wait()
        if queued.error is not None:
            raise queued.error
        if queued.versions is None:
            raise Internal("batch finished without a result for an op")
        return queued.versions

    def statistics(self) -> dict[str, int]:
        stats = self._send.statistics()
        return {
            "queued": stats.current_buffer_used,
            "batches_sent": self.batches_sent,
            "ops_sent": self.ops_sent,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batch loop; runs until cancelled."""
        task_status.started()
        while True:
            batch = [await self._receive.receive()]
            size_bytes = batch[0].size_bytes
            with trio.move_on_after(BATCH_WINDOW_MS / 1000):
                while len(batch) < BATCH_MAX_OPS:
                    queued = await self._receive.receive()
                    batch.append(queued)
                    size_bytes += queued.size_bytes
                    if size_bytes >= BATCH_MAX_BYTES:
                        break
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Queued]) -> None:
        outcomes = await self._send_batch([queued.op for queued in batch])
        for queued, (versions, error) in zip(batch, outcomes, strict=True):
            queued.versions, queued.error = versions, error
            try:
                queued.on_done(versions, error)
            finally:
                queued.done.set()

    async def _send_batch(self, ops: list[DbOp]) -> list[OpOutcome]:
        grant = self._grant()
        if grant is None:
            return [(None, Unavailable("this drone holds no grant", detail=_retry()))] * len(ops)
        self.batches_sent += 1
        self.ops_sent += len(ops)
        try:
            reply = await self._link.request(
                DbWriteBatch(grants=[grant], ops=ops), timeout=DB_BATCH_TIMEOUT_MS / 1000
            )
        except ServiceError as error:
            log.warning("db write batch of %d ops failed: %s", len(ops), error.message)
            failure: OpOutcome = (None, client_error(error))
            return [failure] * len(ops)
        if not isinstance(reply, DbBatchResult) or len(reply.results) != len(ops):
            wrong = Internal(f"db answered a write batch with {type(reply).__name__}")
            return [(None, wrong)] * len(ops)
        return [_outcome(result) for result in reply.results]


def _retry() -> dict[str, Any]:
    return {"retry_after_ms": DB_RETRY_AFTER_MS}


def _outcome(result: tuple[str, Any]) -> OpOutcome:
    status, payload = result
    if status == "ok":
        if type(payload) is not list or not all(type(v) is int for v in payload):
            return None, Internal("db reported success without a version list")
        return list(payload), None
    return None, client_error(service_error(status, str(payload)))
