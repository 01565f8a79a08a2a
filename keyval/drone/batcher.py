"""Drone-side group commit: client writes go to the db in batches, a few batches in flight.

`submit` queues one op (a flat `WireOp` array, keyval.messages.pack_op) with a completion
callback; it does not yield to the scheduler unless the queue is full (MAX_QUEUED_OPS, then
it waits for room). The batch loop waits until fewer than MAX_BATCHES_IN_FLIGHT batches are
at the db, then closes the next batch from the queue: at once if the queue holds a full
batch (BATCH_MAX_OPS, BATCH_MAX_BYTES) or if as many ops have arrived since the last batch
came back as that batch held (its writers, answered, send their next writes: waiting longer
would only delay them), else after at most BATCH_WINDOW_MS. It sends one DbWriteBatch with
the drone's current grant. Batches in flight never share a key: a batch that writes a key of a
batch still in flight waits until no batch is in flight, so the db sees the writes to any
one key in the order their versions were handed out. When a batch's result is known every
op's callback runs, exactly once even when the batch fails unexpectedly (so in-memory applies
happen, and deferred requests are answered, even if the client that asked has gone away);
then the batch's waiters, if any, wake together (one event per batch).

A db refusal of an op is that op's error; FENCED becomes UNAVAILABLE for the client, who
should refresh its slot map and retry. A lost db connection or timeout fails the whole batch
with UNAVAILABLE.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from keyval.grants import Grant
from keyval.messages import WIRE_WRITE_ITEMS, DbBatchResult, DbWriteBatch, WireOp
from wire.errors import ErrorCode, Internal, ServiceError, Unavailable, service_error
from wire.messages import Message

log = logging.getLogger("keyval.drone")

# Group commit window: long enough to gather the writes that arrive while the db is busy with
# the previous batch, short next to a durable commit (~1-10 ms), so a lone write barely waits.
BATCH_WINDOW_MS = 2

# Batches at the db at once (per drone). A second batch in flight lets the db commit one while
# the other travels, but halves the batches: measured on the 2 shared cores, where CPU and not
# the db decides (scripts/bench --workload put --connections 64, 3 drones, same minute, load
# average 3-4.4), two in flight did 2,056 / 1,738 puts/s at 413 / 437 us server CPU per put
# against one in flight's 2,284 / 2,099 at 333 / 361. Raise it on a host with idle cores.
MAX_BATCHES_IN_FLIGHT = 1

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
SlotKey = tuple[int, bytes]  # (slot, canonical key)


class _Queued:
    __slots__ = ("done", "error", "on_done", "op", "size_bytes", "versions")

    def __init__(self, op: WireOp, size_bytes: int, on_done: Completion, done: trio.Event) -> None:
        self.op = op
        self.size_bytes = size_bytes
        self.on_done = on_done
        self.done = done  # shared by the ops of one batch; set once every callback has run
        self.versions: list[int] | None = None
        self.error: ServiceError | None = None

    @property
    def resolved(self) -> bool:
        return self.versions is not None or self.error is not None


def client_error(error: ServiceError) -> ServiceError:
    """What the client hears for a db error: FENCED means 'refresh and retry elsewhere'."""
    if error.code in (ErrorCode.FENCED, ErrorCode.TIMEOUT):
        return Unavailable(
            f"the db refused the write: {error.message}",
            detail={"retry_after_ms": DB_RETRY_AFTER_MS, "db_code": str(error.code)},
        )
    return error


class WriteBatcher:
    """Queues ops and commits them to the db in batches, keeping each key's write order."""

    def __init__(
        self,
        link: DbLink,
        grant: Callable[[], Grant | None],
        *,
        max_in_flight: int = MAX_BATCHES_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._max_in_flight = max_in_flight
        self._link = link
        self._grant = grant
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queued_bytes = 0
        self._open_done = trio.Event()  # the `done` of ops queued from now on
        self._wake = trio.Event()  # set by submit when the batch loop may have work
        self._room = trio.Event()  # set by the batch loop when it took ops from a full queue
        # Submissions so far, and how many the batch loop expects before it closes a batch
        # without waiting out the window: those of the last batch that came back.
        self._arrivals = 0
        self._expected_arrivals = 0
        self.batches_sent = 0
        self.ops_sent = 0
        self._in_flight: list[list[_Queued]] = []  # the batches at the db
        self._batch_done = trio.Event()  # set and replaced whenever a batch in flight ends

    def set_link(self, link: DbLink) -> None:
        self._link = link

    async def submit(self, op: WireOp, size_bytes: int, on_done: Completion) -> _Queued:
        """Queue `op`; `on_done(versions, error)` runs in the batch loop when it resolves.

        Returns a handle whose `done` event is set after `on_done` has run. There is no
        checkpoint unless the queue is full, and then the wait is shielded: a cancelled
        caller still queues the op, because its writes hold versions and pending marks that
        only `on_done` releases (an op dropped here left its keys pending for good; issue 9).
        The wait is for queue space only, which the batch loop frees within one db timeout
        per batch."""
        if len(self._queue) >= MAX_QUEUED_OPS:
            with trio.CancelScope(shield=True):
                while len(self._queue) >= MAX_QUEUED_OPS:
                    self._room = trio.Event()
                    await self._room.wait()
        return self.submit_nowait(op, size_bytes, on_done)

    @property
    def has_room(self) -> bool:
        """Whether `submit_nowait` may queue an op now (the queue is under MAX_QUEUED_OPS)."""
        return len(self._queue) < MAX_QUEUED_OPS

    def submit_nowait(self, op: WireOp, size_bytes: int, on_done: Completion) -> _Queued:
        """`submit` for a caller that checked `has_room`: queues at once, never waits.

        A caller that nobody waits for (an inline write, keyval.drone.writes) learns the
        result only through `on_done`, which runs exactly once, whatever happens to the batch."""
        if len(self._queue) >= MAX_QUEUED_OPS:
            raise RuntimeError("submit_nowait on a full write queue (check has_room first)")
        queued = _Queued(op, size_bytes, on_done, self._open_done)
        self._queue.append(queued)
        self._queued_bytes += size_bytes
        self._arrivals += 1
        self._wake.set()
        return queued

    async def commit(self, op: WireOp, size_bytes: int, on_done: Completion) -> list[int]:
        """Submit and wait: the db's versions for `op`, or raise the client-facing error."""
        queued = await self.submit(op, size_bytes, on_done)
        while not queued.resolved:
            await queued.done.wait()
        if queued.error is not None:
            raise queued.error
        if queued.versions is None:
            raise Internal("batch finished without a result for an op")
        return queued.versions

    def statistics(self) -> dict[str, int]:
        return {
            "queued": len(self._queue),
            "batches_sent": self.batches_sent,
            "ops_sent": self.ops_sent,
            "in_flight": len(self._in_flight),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batch loop; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while len(self._in_flight) >= self._max_in_flight:
                    await self._batch_done.wait()
                batch = await self._gather()
                # Writes to one key reach the db in version order: a batch sharing a key with
                # one in flight goes only once nothing is in flight. The keys are looked at
                # only when a batch is in flight (never with one batch in flight at most).
                while self._in_flight and _share_a_key(batch, self._in_flight):
                    await self._batch_done.wait()
                self._in_flight.append(batch)
                nursery.start_soon(self._commit_batch, batch)

    def _ready(self) -> bool:
        """Close the batch now: a full one is queued, or the expected writers are back."""
        return (
            len(self._queue) >= BATCH_MAX_OPS
            or self._queued_bytes >= BATCH_MAX_BYTES
            or self._arrivals >= self._expected_arrivals
        )

    async def _wait_wake(self) -> None:
        self._wake = trio.Event()
        await self._wake.wait()

    async def _gather(self) -> list[_Queued]:
        while not self._queue:
            await self._wait_wake()
        if not self._ready():
            with trio.move_on_after(BATCH_WINDOW_MS / 1000):
                while not self._ready():
                    await self._wait_wake()
        return self._take()

    def _take(self) -> list[_Queued]:
        """The next batch from the head of the queue (at least one op, however large)."""
        queue = self._queue
        was_full = len(queue) >= MAX_QUEUED_OPS
        first = queue.popleft()
        batch, size_bytes = [first], first.size_bytes
        while queue and len(batch) < BATCH_MAX_OPS and size_bytes < BATCH_MAX_BYTES:
            queued = queue.popleft()
            batch.append(queued)
            size_bytes += queued.size_bytes
        self._queued_bytes -= size_bytes
        # Every queued op shares `_open_done`; the batch keeps it, the ops left behind (and
        # those queued from now on) share a new one.
        self._open_done = trio.Event()
        for queued in queue:
            queued.done = self._open_done
        if was_full:
            self._room.set()
        return batch

    async def _commit_batch(self, batch: list[_Queued]) -> None:
        try:
            outcomes = await self._send_batch([queued.op for queued in batch])
            for queued, (versions, error) in zip(batch, outcomes, strict=True):
                queued.versions, queued.error = versions, error
                _run_completion(queued, versions, error)
        finally:
            for queued in batch:  # only if the above failed: no op may be left unanswered
                if not queued.resolved:
                    queued.error = Internal("the write batch ended without a result")
                    _run_completion(queued, None, queued.error)
            batch[0].done.set()  # every op of a batch shares one event
            self._in_flight = [other for other in self._in_flight if other is not batch]
            # The writers answered now send their next writes: a batch closes once as many
            # have arrived (or after the window).
            self._expected_arrivals = self._arrivals + len(batch)
            self._batch_done.set()
            self._batch_done = trio.Event()

    async def _send_batch(self, ops: list[WireOp]) -> list[OpOutcome]:
        grant = self._grant()
        if grant is None:
            return [(None, Unavailable("this drone holds no grant", detail=_retry()))] * len(ops)
        self.batches_sent += 1
        self.ops_sent += len(ops)
        try:
            reply = await self._link.request(
                DbWriteBatch.of([grant], ops), timeout=DB_BATCH_TIMEOUT_MS / 1000
            )
        except ServiceError as error:
            log.warning("db write batch of %d ops failed: %s", len(ops), error.message)
            failure: OpOutcome = (None, client_error(error))
            return [failure] * len(ops)
        if not isinstance(reply, DbBatchResult) or len(reply.results) != len(ops):
            wrong = Internal(f"db answered a write batch with {type(reply).__name__}")
            return [(None, wrong)] * len(ops)
        return [_outcome(result) for result in reply.results]


def _run_completion(
    queued: _Queued, versions: list[int] | None, error: ServiceError | None
) -> None:
    """Run `queued`'s callback; a failing one is logged, never stops the batch's others."""
    try:
        queued.on_done(versions, error)
    except Exception:
        log.exception("a write completion failed")


def _share_a_key(batch: list[_Queued], in_flight: list[list[_Queued]]) -> bool:
    keys = {key for queued in batch for key in op_keys(queued.op)}
    return any(not keys.isdisjoint(op_keys(queued.op)) for other in in_flight for queued in other)


def op_keys(op: WireOp) -> list[SlotKey]:
    """The (slot, canonical key) of each write of `op`."""
    return [(op[base], op[base + 1]) for base in range(1, len(op), WIRE_WRITE_ITEMS)]


def _retry() -> dict[str, Any]:
    return {"retry_after_ms": DB_RETRY_AFTER_MS}


def _outcome(result: tuple[str, Any]) -> OpOutcome:
    status, payload = result
    if status == "ok":
        if type(payload) is not list or not all(type(v) is int for v in payload):
            return None, Internal("db reported success without a version list")
        return list(payload), None
    return None, client_error(service_error(status, str(payload)))
