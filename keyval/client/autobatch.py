"""Auto-batching: concurrent single-key gets of one client share `kv.get_many` requests.

Many tasks calling `get` on one client (a web server's request handlers, a pipelined load)
would each send their own request. `GetBatcher` gathers them per drone instead: the gets that
arrive in the same scheduler pass, and those that arrive while the drone's previous batch is
in flight, leave together as one `GetMany` (one frame, one reply, one drone dispatch),
bounded by MAX_BATCH_KEYS keys and MAX_BATCH_KEY_BYTES bytes of keys.

There is no background task (like keyval.net's reader role): a get that finds no batch of its
drone in flight becomes the *sender*. It yields once so the other gets of this pass can queue,
sends what is queued, hands each waiting task its own entry, and passes the sender role to the
oldest get still queued, whose batch has been gathering meanwhile. The others park until
their entry arrives.

A batch is all or nothing at the drone (a MOVED slot, a loading slot, a refused key, values too
large for one reply fail the whole request). So when a batch fails, every get in it is told
`RETRY_ALONE` and its caller sends its own single `Get` with the full retry loop
(keyval.client.router): each caller gets exactly its own value or its own typed error, and a
redirect of one key does not disturb the others. A batch of one key goes as a plain `Get`.

Cancelling a get that waits is safe at any point: one still queued is removed; one whose batch
is in flight is forgotten (reads have no effects). A sender cancelled mid-request puts the
unanswered gets of its batch back at the head of the queue and passes the role on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import outcome
import trio

from keyval.client.policy import Attempts
from keyval.client.router import Router
from keyval.client.routing import Route
from keyval.client.txn import ABSENT, Entry
from keyval.messages import Get, GetMany, ValueReply, ValuesReply
from wire.errors import Internal, Moved, ServiceError
from wire.messages import Key

# Gets in one batch. Larger batches cost less per key but make every get of the batch wait
# for the whole reply; 256 keys of 32-byte values is a ~15 KiB reply. Below the drone's bound
# of keys per get_many (keyval.drone.reads.MAX_GET_MANY_KEYS, 1000; a test checks).
MAX_BATCH_KEYS = 256

# Canonical key bytes in one batch, so the request stays far below the 1 MiB frame limit
# (keys are up to 1 KiB each: 256 of them could nearly fill a frame on their own).
MAX_BATCH_KEY_BYTES = 64 * 1024

# Batches in flight to one drone from one client. One means a batch gathers every get that
# arrives while the previous one is out (the fewest requests per key, what a busy drone
# needs); a batch that fills up before then is sent anyway (see `_take`).
MAX_BATCHES_IN_FLIGHT = 1


class _RetryAlone:
    """The batch failed: the caller sends its own get (see the module docstring)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RETRY_ALONE"


RETRY_ALONE = _RetryAlone()

# Told to a queued get by the sender that leaves: it sends the next batch itself.
_BECOME_SENDER = object()


class _Waiter:
    """One get waiting for its batch."""

    __slots__ = ("cancelled", "deadline", "done", "key", "key_bytes", "taken", "task")

    def __init__(self, key: Key, key_bytes: int, deadline: float) -> None:
        self.key = key
        self.key_bytes = key_bytes
        self.deadline = deadline  # the caller's overall deadline (trio clock)
        self.task: trio.lowlevel.Task | None = None  # set while parked
        self.done: Any = None  # its Entry or RETRY_ALONE, once answered
        self.taken = False  # in a batch that is in flight (or answered)
        self.cancelled = False


class _DroneQueue:
    """The gets waiting for one drone, and how many batches to it are in flight."""

    __slots__ = ("address", "senders", "waiters")

    def __init__(self, address: str) -> None:
        self.address = address
        self.waiters: list[_Waiter] = []
        self.senders = 0


class GetBatcher:
    """Per drone (by address) queues of single-key gets, sent as GetMany batches."""

    def __init__(self, router: Router, *, max_batch_keys: int = MAX_BATCH_KEYS) -> None:
        if not 1 <= max_batch_keys <= MAX_BATCH_KEYS:
            raise ValueError(f"max_batch_keys must be 1..{MAX_BATCH_KEYS}")
        self._router = router
        self._max_batch_keys = max_batch_keys
        self._queues: dict[str, _DroneQueue] = {}  # by drone address, while in use
        self.batches_sent = 0
        self.keys_sent = 0

    async def get(self, route: Route, key: Key, key_bytes: int, deadline: float) -> Any:
        """`key`'s Entry from its owner `route`, read in a batch with the other gets queued
        for that drone; RETRY_ALONE if the batch failed (the caller then gets it alone).
        `key_bytes` is its canonical size, `deadline` the caller's (trio clock)."""
        queue = self._queues.get(route.address)
        if queue is None:
            queue = self._queues[route.address] = _DroneQueue(route.address)
        waiter = _Waiter(key, key_bytes, deadline)
        queue.waiters.append(waiter)
        sender = queue.senders < MAX_BATCHES_IN_FLIGHT
        if sender:
            queue.senders += 1
        while True:
            if sender:
                await self._send_until_taken(queue, route, waiter)
                if waiter.done is not None:
                    return waiter.done
            answer = await self._park(queue, waiter)  # its batch (or the sender role) comes
            if answer is not _BECOME_SENDER:
                return answer
            sender = True

    async def _park(self, queue: _DroneQueue, waiter: _Waiter) -> Any:
        waiter.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            waiter.task, waiter.cancelled = None, True
            if not waiter.taken:  # still queued; else its batch is in flight: forget it
                queue.waiters.remove(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def _send_until_taken(self, queue: _DroneQueue, route: Route, me: _Waiter) -> None:
        """As a sender: send batches from the head of the queue until `me` is in one (mine
        or, with several batches in flight, another sender's), then pass the role on to the
        oldest get still parked in the queue (or give it up)."""
        try:
            # Let the gets of this scheduler pass join first: new ones, and those of the tasks
            # the previous batch just answered (they run in the same pass as this sender).
            await trio.lowlevel.cancel_shielded_checkpoint()
            while not me.taken:
                await self._send(queue, route, self._take(queue), me)
        finally:
            self._pass_on(queue)

    def _take(self, queue: _DroneQueue) -> list[_Waiter]:
        """The next batch from the head of the queue, within both bounds."""
        waiters = queue.waiters
        count, key_bytes = 0, 0
        limit = min(len(waiters), self._max_batch_keys)
        while count < limit:
            key_bytes += waiters[count].key_bytes
            if count and key_bytes > MAX_BATCH_KEY_BYTES:
                break
            count += 1
        batch = waiters[:count]
        del waiters[:count]
        for waiter in batch:
            waiter.taken = True
        return batch

    def _pass_on(self, queue: _DroneQueue) -> None:
        for waiter in queue.waiters:
            task = waiter.task
            if task is not None and not waiter.cancelled:
                waiter.task = None
                trio.lowlevel.reschedule(task, outcome.Value(_BECOME_SENDER))
                return  # the sender count passes to it
        queue.senders -= 1
        if queue.senders == 0 and not queue.waiters:
            del self._queues[queue.address]  # idle: a drone that left leaves nothing behind

    async def _send(
        self, queue: _DroneQueue, route: Route, batch: list[_Waiter], me: _Waiter
    ) -> None:
        attempts = Attempts(self._router.policy, deadline=min(w.deadline for w in batch))
        try:
            answers: Sequence[Entry | _RetryAlone]
            if len(batch) == 1:
                reply = await self._router.send(route, Get(key=batch[0].key), attempts)
                answers = [_single_entry(reply)]
            else:
                keys = [waiter.key for waiter in batch]
                reply = await self._router.send(route, GetMany(keys=keys), attempts)
                answers = _many_entries(reply, len(batch))
        except ServiceError as error:
            self._note_redirect(error)
            answers = [RETRY_ALONE] * len(batch)
        except BaseException:
            # Cancelled (or a bug) with the batch unanswered: back to the head of the queue.
            unanswered = [w for w in batch if not w.cancelled and w is not me]
            for waiter in unanswered:
                waiter.taken = False
            queue.waiters[:0] = unanswered
            raise
        self.batches_sent += 1
        self.keys_sent += len(batch)
        for waiter, answer in zip(batch, answers, strict=True):
            waiter.done = answer
            task = waiter.task
            if task is not None and not waiter.cancelled:
                waiter.task = None
                trio.lowlevel.reschedule(task, outcome.Value(answer))

    def _note_redirect(self, error: ServiceError) -> None:
        """A MOVED batch: patch the slot's owner now, so the retry of the moved key goes
        straight to its new owner (the router would take the same patch from its own MOVED)."""
        table = self._router.table
        if isinstance(error, Moved) and table is not None:
            table.apply_moved(error.detail)

    def statistics(self) -> dict[str, int]:
        """Batches and keys sent; gets queued now and drones with gets under way."""
        return {
            "batches_sent": self.batches_sent,
            "keys_sent": self.keys_sent,
            "queued": sum(len(queue.waiters) for queue in self._queues.values()),
            "drones": len(self._queues),
        }


def _single_entry(reply: Any) -> Entry:
    if not isinstance(reply, ValueReply):
        raise Internal(f"unexpected reply {reply.TYPE} to a get")
    return Entry(reply.value, reply.version) if reply.found else ABSENT


def _many_entries(reply: Any, count: int) -> list[Entry]:
    if not isinstance(reply, ValuesReply):
        raise Internal(f"unexpected reply {reply.TYPE} to a get_many")
    if len(reply.items) != count:
        raise Internal(f"asked {count} keys, the drone answered {len(reply.items)}")
    return [Entry(value, version) if found else ABSENT for found, value, version in reply.items]
