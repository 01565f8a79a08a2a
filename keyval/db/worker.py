"""One long-lived thread per backend: every backend call runs there, one at a time, in order.

The service used to hop to a trio worker thread per call (`trio.to_thread.run_sync` with a
capacity limiter of 1): a thread-cache hand-off, a limiter acquire and release and a context
copy each time. A thread of our own fed by a FIFO queue, answering through the trio token,
does the same job for ~35-45 us less CPU per call (scripts/bench_db measures it). The
backend's connection is used from this one thread only.

A caller's wait cannot be cancelled once its call is queued (as with `trio.to_thread`'s
default): a commit's outcome must be known before anyone is answered. A thread that is not
running (never started, stopped, or gone after a crash) fails calls at once with
StorageError, and the calls it still held when it ended fail the same way.

Under simulation (keyval.sim) calls run inline on the trio thread, so a disk call takes no
virtual time and a run stays deterministic: see `inline_calls`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import outcome
import trio
import trio.lowlevel

from keyval.db.backend import StorageError

logger = logging.getLogger("keyval.db")

T = TypeVar("T")

# A queued call: the function, the task waiting for it and its run's token.
_Job = tuple[Callable[[], Any], trio.lowlevel.Task, trio.lowlevel.TrioToken]

_inline = False  # set by `inline_calls` (simulation only)


@contextlib.contextmanager
def inline_calls() -> Iterator[None]:
    """Run backend calls on the calling (trio) thread while inside: for simulations."""
    global _inline
    before, _inline = _inline, True
    try:
        yield
    finally:
        _inline = before


def _no_abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED  # the call runs to its end; its outcome must be known


class BackendThread:
    """Runs calls of one backend in one thread of its own, in the order they were made."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed = False  # the thread ended on an error

    def start(self) -> None:
        """Start the thread (again, after `stop`); a no-op while it runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._jobs = queue.SimpleQueue()
        self._failed = False
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the calls queued so far finish, then end the thread (blocks until it has)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._failed

    async def call(self, function: Callable[[], T]) -> T:
        """`function()` in the backend thread; its result or exception. StorageError when
        the thread is not running."""
        if _inline:
            await trio.lowlevel.checkpoint_if_cancelled()
            done = function()
            await trio.lowlevel.cancel_shielded_checkpoint()  # the work is done: never lose it
            return done
        if not self.running:
            raise StorageError(f"{self.name}: the backend thread is not running")
        await trio.lowlevel.checkpoint_if_cancelled()
        task, token = trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()
        self._jobs.put((function, task, token))
        result: T = await trio.lowlevel.wait_task_rescheduled(_no_abort)
        return result

    def _serve(self) -> None:
        jobs = self._jobs
        try:
            while (job := jobs.get()) is not None:
                function, task, token = job
                token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(function))
        except BaseException:  # a bug or the trio run gone: waiters must not hang
            self._failed = True
            logger.exception("%s: the backend thread failed", self.name)
            self._fail_queued(jobs)

    def _fail_queued(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        failure = outcome.Error(StorageError(f"{self.name}: the backend thread ended"))
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    job[2].run_sync_soon(trio.lowlevel.reschedule, job[1], failure)
