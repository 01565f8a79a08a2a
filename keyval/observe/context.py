"""Who is acting, for logs: the node (set once per daemon) and the request or stimulus.

Both are context variables. trio copies the context into every task it starts, so a value
set in a daemon's main task reaches all of that daemon's tasks, and several daemons can run
in one process (tests, simulation) without mixing their names. A request id set in a
request's own task stays with that request.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

# Before any daemon names itself (tools, tests of single modules), records say this.
UNNAMED_NODE = "-"

NODE: contextvars.ContextVar[str] = contextvars.ContextVar("keyval_node", default=UNNAMED_NODE)
ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("keyval_role", default="")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("keyval_request_id", default="")

_connection_numbers = itertools.count(1)
_stimulus_numbers = itertools.count(1)


def bind_node(name: str, role: str) -> None:
    """Name the node that the current task (and every task it starts from now on) serves."""
    NODE.set(name)
    ROLE.set(role)


def next_connection_id() -> int:
    """A process-unique number for an accepted connection (part of each request id)."""
    return next(_connection_numbers)


def request_id(connection_id: int, rid: int) -> str:
    """`c<connection>.r<request id>`: unique in this process, and the wire's request id
    stays visible so a client's log line can be matched with the server's."""
    return f"c{connection_id}.r{rid}"


def set_request(value: str) -> None:
    """Mark the current task as serving request `value` (call it in the request's own task)."""
    REQUEST_ID.set(value)


@contextmanager
def stimulus(kind: str) -> Iterator[str]:
    """Log lines inside carry `kind-N`, for work started by a timer or a peer's reply rather
    than by a request (a heartbeat, a group commit, a reseed)."""
    token = REQUEST_ID.set(f"{kind}-{next(_stimulus_numbers)}")
    try:
        yield REQUEST_ID.get()
    finally:
        REQUEST_ID.reset(token)
