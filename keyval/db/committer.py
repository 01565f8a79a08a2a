"""Group commit: many submitters' items go to storage in few transactions.

Each submission is a list of items (the ops of one DbWriteBatch). The committer takes the
first waiting submission, then keeps taking more until the batch holds `max_items` items or
`max_delay_ms` has passed since the first was taken, and hands the whole batch to `commit`
(one transaction). Each submitter is woken with its own results only after `commit`
returned, i.e. after the transaction committed. While one batch commits, new submissions queue
(bounded: submitters wait when `max_pending` are queued), so under load batches grow by
themselves even with no delay.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from keyval.observe import current_metrics, stimulus
from wire.errors import Internal

logger = logging.getLogger("keyval.db")

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Submission(Generic[Item, Result]):
    items: Sequence[Item]
    done: trio.Event = field(default_factory=trio.Event)
    results: list[Result] | None = None
    failure: str = ""


@dataclass(frozen=True)
class CommitterStatistics:
    batches: int
    items: int
    submissions: int
    largest_batch_items: int
    queued_submissions: int
    batch_sizes: dict[int, int]  # items per batch -> how many batches had that many


class GroupCommitter(Generic[Item, Result]):
    def __init__(
        self,
        commit: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_items: int,
        max_delay_ms: float,
        max_pending: int,
    ) -> None:
        if max_items < 1 or max_delay_ms < 0 or max_pending < 1:
            raise ValueError("max_items and max_pending must be >= 1, max_delay_ms >= 0")
        self._commit = commit
        self.max_items = max_items
        self.max_delay_ms = max_delay_ms
        self._send, self._receive = trio.open_memory_channel[_Submission[Item, Result]](max_pending)
        self._batches = 0
        self._items = 0
        self._submissions = 0
        self._largest = 0
        self._sizes: collections.Counter[int] = collections.Counter()

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Queue `items` for the next batch; return their results once it committed."""
        submission: _Submission[Item, Result] = _Submission(items)
        await self._send.send(submission)
        await submission.done.wait()
        if submission.results is None:
            raise Internal(f"group commit failed: {submission.failure}")
        return submission.results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until cancelled."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = await self._collect(first)
                with stimulus("commit"):  # the batch's log lines share an id
                    await self._commit_batch(batch)

    async def _collect(self, first: _Submission[Item, Result]) -> list[_Submission[Item, Result]]:
        batch, count = [first], len(first.items)
        deadline = trio.current_time() + self.max_delay_ms / 1000
        while count < self.max_items:
            submission = self._take_nowait()
            if submission is None and trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    submission = await self._receive.receive()
            if submission is None:
                break
            batch.append(submission)
            count += len(submission.items)
        return batch

    def _take_nowait(self) -> _Submission[Item, Result] | None:
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            return None

    async def _commit_batch(self, batch: list[_Submission[Item, Result]]) -> None:
        items = [item for submission in batch for item in submission.items]
        metrics, started = current_metrics(), trio.current_time()
        try:
            results = await self._commit(items)
            if len(results) != len(items):
                raise RuntimeError(f"commit returned {len(results)} results for {len(items)}")
        except Exception as error:  # a bug: fail this batch's submitters, keep serving others
            metrics.commit_failures.inc()
            logger.exception("group commit of %d items failed", len(items))
            for submission in batch:
                submission.failure = repr(error)
                submission.done.set()
            return
        metrics.commit_seconds.observe(trio.current_time() - started)
        metrics.commit_batch_ops.observe(len(items))
        self._count(len(batch), len(items))
        position = 0
        for submission in batch:
            submission.results = results[position : position + len(submission.items)]
            position += len(submission.items)
            submission.done.set()

    def _count(self, submissions: int, items: int) -> None:
        self._batches += 1
        self._submissions += submissions
        self._items += items
        self._largest = max(self._largest, items)
        self._sizes[items] += 1

    def statistics(self) -> CommitterStatistics:
        return CommitterStatistics(
            batches=self._batches,
            items=self._items,
            submissions=self._submissions,
            largest_batch_items=self._largest,
            queued_submissions=self._send.statistics().current_buffer_used,
            batch_sizes=dict(self._sizes),
        )
