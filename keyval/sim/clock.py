"""Simulated time: trio's MockClock, and worker-thread calls run inline.

The db runs SQLite in a thread of its own (keyval.db.worker), other blocking calls run in
`trio.to_thread.run_sync`. Under trio's `MockClock`
with `autojump_threshold=0`, virtual time jumps whenever every task is blocked, including a
task waiting for a thread: a group commit could then take "seconds" of virtual time, leases
lapse and deadlines fire while the disk works, which never happens on a real machine. A
positive threshold (tests/drone/harness.py uses 50 ms) avoids that but costs that much real
time at every idle moment, and a simulated cluster is idle between heartbeats thousands of
times per run; and a thread's finishing time is real time, which breaks replay.

So a simulation runs thread calls inline: `inline_thread_calls()` replaces
`trio.to_thread.run_sync` with a version that calls the function on the trio thread between
two checkpoints, and makes the db's backend thread do the same (keyval.db.worker.inline_calls),
as FoundationDB's simulator runs its disk in its one thread. A disk call then
takes no virtual time, the run stays deterministic, and the autojump clock can jump at once.
A simulated disk call blocks the loop for its real duration, which costs wall time only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import trio
import trio.lowlevel
import trio.testing
import trio.to_thread

from keyval.db.worker import inline_calls

# Virtual time starts here rather than at 0, so code that treats 0 as "never" is not fooled.
START_S = 1000.0


def sim_clock() -> trio.testing.MockClock:
    """The clock of a simulation: virtual, jumping to the next deadline whenever idle."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    clock.jump(START_S)
    return clock


@contextlib.contextmanager
def inline_thread_calls() -> Iterator[None]:
    """Run `trio.to_thread.run_sync(fn, *args)` as `fn(*args)` on the calling thread.

    Patches the attribute on the `trio.to_thread` module (callers look it up at call time, as
    `trio.to_thread.run_sync(...)` does); the original is restored on exit. One simulation at
    a time per process."""
    original: Callable[..., Any] = trio.to_thread.run_sync

    @functools.wraps(original)
    async def inline(sync_fn: Callable[..., Any], *args: Any, **_options: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        result = sync_fn(*args)
        await trio.lowlevel.cancel_shielded_checkpoint()  # the work is done: never lose it
        return result

    trio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        with inline_calls():  # the db's backend thread, likewise
            yield
    finally:
        trio.to_thread.run_sync = original  # type: ignore[assignment]
