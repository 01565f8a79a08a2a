"""The drone's request handler: checks the caller's role, then dispatches by message type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from auth.roles import require_role
from keyval.drone.reads import (
    get_many_nowait,
    get_nowait,
    handle_get,
    handle_get_many,
    handle_scan,
)
from keyval.drone.state import DroneState
from keyval.drone.twopc import handle_txn_abort, handle_txn_prepare
from keyval.drone.writes import (
    Deferral,
    cas_deferred,
    delete_deferred,
    handle_cas,
    handle_delete,
    handle_put,
    handle_txn_commit,
    put_deferred,
    txn_commit_deferred,
)
from keyval.messages import (
    CompareAndSet,
    Delete,
    Get,
    GetMany,
    Put,
    Scan,
    TxnAbort,
    TxnCommit,
    TxnPrepare,
)
from keyval.net import Respond
from wire.channel import PeerInfo
from wire.errors import BadRequest
from wire.messages import Message, Ok, Ping

# Roles that may use the kv.* requests.
KV_ROLES = ("client", "admin")

_Handler = Callable[[DroneState, PeerInfo, Any], Awaitable[Message]]

_DeferredHandler = Callable[[DroneState, PeerInfo, Any, Respond], Deferral]

# Mutations that may be admitted and queued synchronously, answered when their batch resolves.
_DEFERRED_HANDLERS: dict[type[Message], _DeferredHandler] = {
    Put: put_deferred,
    Delete: delete_deferred,
    CompareAndSet: cas_deferred,
    TxnCommit: txn_commit_deferred,
}

_KV_HANDLERS: dict[type[Message], _Handler] = {
    Get: handle_get,
    GetMany: handle_get_many,
    Scan: handle_scan,
    Put: handle_put,
    Delete: handle_delete,
    CompareAndSet: handle_cas,
    TxnCommit: handle_txn_commit,
    TxnPrepare: handle_txn_prepare,
    TxnAbort: handle_txn_abort,
}


class DroneHandler:
    """`await handler(peer, msg)`: the shape keyval.net.serve calls."""

    def __init__(self, state: DroneState) -> None:
        self.state = state

    def handle_nowait(self, peer: PeerInfo, msg: Message) -> Message | None:
        """The reply when it needs no waiting (keyval.net answers it inline), else None."""
        if isinstance(msg, Get):
            require_role(peer, *KV_ROLES, action=msg.TYPE)
            reply: Message | None = get_nowait(self.state, peer, msg)
        elif isinstance(msg, GetMany):
            require_role(peer, *KV_ROLES, action=msg.TYPE)
            reply = get_many_nowait(self.state, peer, msg)
        elif isinstance(msg, Ping):
            return Ok()
        else:
            return None
        if reply is not None:
            self.state.requests_served += 1
        return reply

    def handle_deferred(self, peer: PeerInfo, msg: Message, respond: Respond) -> Deferral:
        """A mutation admitted without a task (keyval.net): its reply now, DEFERRED when
        `respond` will get it once its batch resolves, or None: it must wait, `__call__` runs."""
        handler = _DEFERRED_HANDLERS.get(type(msg))
        if handler is None:
            return None
        require_role(peer, *KV_ROLES, action=msg.TYPE)
        outcome = handler(self.state, peer, msg, respond)
        if outcome is not None:
            self.state.requests_served += 1
        return outcome

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        if isinstance(msg, Ping):
            return Ok()
        handler = _KV_HANDLERS.get(type(msg))
        if handler is None:
            raise BadRequest(f"a drone does not answer {msg.TYPE!r}")
        require_role(peer, *KV_ROLES, action=msg.TYPE)
        reply = await handler(self.state, peer, msg)
        self.state.requests_served += 1
        return reply
