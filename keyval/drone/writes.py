"""Mutations: put, delete, compare-and-set, transaction commit.

Every mutation follows the same steps: admit the request (key, value size, permission, op id),
claim its op id (a retry gets the first reply), wait until its slots are served, and for
cas/txn wait until its keys have no pending write. Then, with no await in between: re-check
the slots, validate (cas/txn), hand out versions and mark the keys pending. The writes go to
the db in the drone's next batch.

Two ways through those steps, one set of checks (the `_plan_*` functions, run with no await):

- deferred (`*_deferred`, the common case): keyval.net's reader admits the request itself
  (DroneHandler.handle_deferred), queues the op with a completion (`_Answer`) and returns
  DEFERRED; when the batch resolves the completion installs the writes, remembers the reply
  by op id and hands it to the connection's responder. No task, no event per write.
- awaited (`handle_*`, in a task): whenever something has to wait first: the op id is in
  flight (a retry waits for the first attempt's reply), a slot is loading, a cas/txn key has
  a pending write, or the write queue is full.

Ack modes:

- "durable" (default): the writes are applied in memory, and the client answered, only once
  the db has committed them. A crash of the drone loses nothing acknowledged.
- "memory": the writes are applied in memory and the client answered at once; the db write
  follows in the next batch. A crash of the drone (or a db refusal, e.g. because the slot
  moved) loses every memory-acked write of the last few milliseconds that had not reached the
  db yet, even though the client heard "ok"; after a reseed those keys show their last durable
  state. Other clients may have read the lost values meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from keyval.drone.batcher import SlotKey
from keyval.drone.opcache import check_op_id
from keyval.drone.slots import SlotStatus
from keyval.drone.state import DroneState, check_permission
from keyval.keys import Key, check_key, key_from_canonical, key_slot
from keyval.messages import (
    ACK_MEMORY,
    ACK_MODES,
    Committed,
    CompareAndSet,
    Delete,
    Put,
    TxnCommit,
    WireOp,
    Written,
    pack_op,
)
from keyval.net import DEFERRED, Deferred, Respond
from wire import codec
from wire.channel import PeerInfo
from wire.errors import BadRequest, Conflict, Internal, ServiceError, TooLarge
from wire.messages import Message

# Test-only: when True, a transaction commit skips validating its read versions (lost updates).
# Only tests/sim flip it, to show the simulation catches the bug; never set it elsewhere.
_INJECT_BUG_SKIP_TXN_VALIDATION = False

log = logging.getLogger("keyval.drone")

# Keys one transaction may read plus write: bounds the validation work and, with the value
# limit, what one db op carries.
MAX_TXN_KEYS = 1024

# Encoded bytes of all values one op writes: an op must fit one 1 MiB frame with its batch.
MAX_OP_VALUE_BYTES = 768 * 1024

TXN_PUT = "put"
TXN_DELETE = "del"

# A write about to be made: (slot, canonical key, value, deleted).
Planned = tuple[int, bytes, Any, bool]
# Per planned write, its value's CBOR (None for a deletion): encoded once, at admission, for
# the size check and the db alike.
Encoded = bytes | None


def _admit_key(state: DroneState, peer: PeerInfo, key: Key) -> tuple[int, bytes]:
    data = check_key(key, state.limits.max_key_bytes)
    check_permission(peer, key)
    return key_slot(key), data


def _encode_value(state: DroneState, value: Any) -> bytes:
    """`value`'s CBOR, as the db stores it; TooLarge over the value limit."""
    encoded = codec.encode(value)
    if len(encoded) > state.limits.max_value_bytes:
        raise TooLarge(
            f"value is {len(encoded)} bytes encoded, limit {state.limits.max_value_bytes}",
            detail={"size": len(encoded), "limit": state.limits.max_value_bytes},
        )
    return encoded


def _check_ack(ack: str) -> None:
    if ack not in ACK_MODES:
        raise BadRequest(f"ack must be one of {', '.join(ACK_MODES)}, not {ack!r}")


class _Plan:
    """A mutation checked and ready to write: its writes, their value CBOR, and its reply's
    shape (`existed` for a `Written`; None for a transaction's `Committed`)."""

    __slots__ = ("encoded", "existed", "writes")

    def __init__(self, writes: list[Planned], encoded: list[Encoded], existed: bool | None):
        self.writes = writes
        self.encoded = encoded
        self.existed = existed

    def reply(self, versions: list[int]) -> Message:
        if self.existed is None:
            return Committed(versions=versions)
        return Written(version=versions[0], existed=self.existed)


# What a mutation's checks decided: a reply at once (nothing to write), or a plan to write.
Decision = Message | _Plan

# What the deferred path returns: a reply now, DEFERRED (`respond` will get it), or None
# (the request must wait for something: the caller runs the async handler instead).
Deferral = Message | Deferred | None


async def handle_put(state: DroneState, peer: PeerInfo, msg: Put) -> Message:
    _check_ack(msg.ack)
    slot, data = _admit_key(state, peer, msg.key)
    encoded = _encode_value(state, msg.value)
    return await _once(state, msg.op_id, lambda: _put(state, msg, slot, data, encoded))


def put_deferred(state: DroneState, peer: PeerInfo, msg: Put, respond: Respond) -> Deferral:
    _check_ack(msg.ack)
    slot, data = _admit_key(state, peer, msg.key)
    encoded = _encode_value(state, msg.value)
    return _once_deferred(
        state,
        msg,
        respond,
        lambda: _serving_now(state, slot) and _plan_put(state, msg, slot, data, encoded),
    )


async def _put(state: DroneState, msg: Put, slot: int, data: bytes, encoded: bytes) -> Message:
    epoch = await state.wait_serving(slot)
    state.check_slot_servable(slot, epoch)
    return await _execute(state, msg.op_id, msg.ack, _plan_put(state, msg, slot, data, encoded))


def _plan_put(state: DroneState, msg: Put, slot: int, data: bytes, encoded: bytes) -> _Plan:
    existed = state.store.contains(slot, data) or state.pending.is_pending(slot, data)
    return _Plan([(slot, data, msg.value, False)], [encoded], existed)


async def handle_delete(state: DroneState, peer: PeerInfo, msg: Delete) -> Message:
    _check_ack(msg.ack)
    slot, data = _admit_key(state, peer, msg.key)
    return await _once(state, msg.op_id, lambda: _delete(state, msg, slot, data))


def delete_deferred(state: DroneState, peer: PeerInfo, msg: Delete, respond: Respond) -> Deferral:
    _check_ack(msg.ack)
    slot, data = _admit_key(state, peer, msg.key)
    return _once_deferred(
        state,
        msg,
        respond,
        lambda: _serving_now(state, slot) and _plan_delete(state, slot, data),
    )


async def _delete(state: DroneState, msg: Delete, slot: int, data: bytes) -> Message:
    epoch = await state.wait_serving(slot)
    state.check_slot_servable(slot, epoch)
    return await _execute(state, msg.op_id, msg.ack, _plan_delete(state, slot, data))


def _plan_delete(state: DroneState, slot: int, data: bytes) -> Decision:
    if not state.store.contains(slot, data) and not state.pending.is_pending(slot, data):
        return Written(version=0, existed=False)
    return _Plan([(slot, data, None, True)], [None], True)


async def handle_cas(state: DroneState, peer: PeerInfo, msg: CompareAndSet) -> Message:
    slot, data, encoded = _admit_cas(state, peer, msg)
    return await _once(state, msg.op_id, lambda: _cas(state, msg, slot, data, encoded))


def cas_deferred(
    state: DroneState, peer: PeerInfo, msg: CompareAndSet, respond: Respond
) -> Deferral:
    slot, data, encoded = _admit_cas(state, peer, msg)
    return _once_deferred(
        state,
        msg,
        respond,
        lambda: _settled_now(state, [(slot, data)]) and _plan_cas(state, msg, slot, data, encoded),
    )


def _admit_cas(state: DroneState, peer: PeerInfo, msg: CompareAndSet) -> tuple[int, bytes, Encoded]:
    _check_ack(msg.ack)
    if msg.expected_version < 0:
        raise BadRequest("expected_version is a version (>= 1) or 0 for 'absent'")
    slot, data = _admit_key(state, peer, msg.key)
    return slot, data, None if msg.delete else _encode_value(state, msg.value)


async def _cas(
    state: DroneState, msg: CompareAndSet, slot: int, data: bytes, encoded: Encoded
) -> Message:
    epoch = await state.wait_serving(slot)
    await state.pending.wait_clear([(slot, data)])
    state.check_slot_servable(slot, epoch)  # no await from here to _write's marking
    return await _execute(state, msg.op_id, msg.ack, _plan_cas(state, msg, slot, data, encoded))


def _plan_cas(
    state: DroneState, msg: CompareAndSet, slot: int, data: bytes, encoded: Encoded
) -> Decision:
    """Validate against the current version (no write to the key may be pending)."""
    current = state.store.version_of(slot, data)
    if current != msg.expected_version:
        raise Conflict(
            f"key version is {current}, expected {msg.expected_version}",
            detail={"version": current},
        )
    if msg.delete and current == 0:
        return Written(version=0, existed=False)
    value = None if msg.delete else msg.value
    return _Plan([(slot, data, value, msg.delete)], [encoded], current != 0)


# A transaction's admitted reads: (slot, canonical key, version read).
Reads = list[tuple[int, bytes, int]]


async def handle_txn_commit(state: DroneState, peer: PeerInfo, msg: TxnCommit) -> Message:
    reads, writes, encoded = _admit_txn(state, peer, msg)
    return await _once(state, msg.op_id, lambda: _txn(state, msg, reads, writes, encoded))


def txn_commit_deferred(
    state: DroneState, peer: PeerInfo, msg: TxnCommit, respond: Respond
) -> Deferral:
    reads, writes, encoded = _admit_txn(state, peer, msg)
    keys = _txn_keys(reads, writes)
    return _once_deferred(
        state,
        msg,
        respond,
        lambda: _settled_now(state, keys) and _plan_txn(state, reads, writes, encoded),
    )


def _admit_txn(
    state: DroneState, peer: PeerInfo, msg: TxnCommit
) -> tuple[Reads, list[Planned], list[Encoded]]:
    _check_ack(msg.ack)
    if len(msg.reads) + len(msg.writes) > MAX_TXN_KEYS:
        raise TooLarge(f"a transaction touches at most {MAX_TXN_KEYS} keys")
    reads = [(*_admit_key(state, peer, key), version) for key, version in msg.reads]
    writes, encoded = _admit_txn_writes(state, peer, msg.writes)
    return reads, writes, encoded


def _admit_txn_writes(
    state: DroneState, peer: PeerInfo, writes: Sequence[tuple[Key, str, Any]]
) -> tuple[list[Planned], list[Encoded]]:
    planned: list[Planned] = []
    encodings: list[Encoded] = []
    seen: set[bytes] = set()
    total_bytes = 0
    for key, kind, value in writes:
        if kind not in (TXN_PUT, TXN_DELETE):
            raise BadRequest(f"a transaction write is {TXN_PUT!r} or {TXN_DELETE!r}, not {kind!r}")
        slot, data = _admit_key(state, peer, key)
        if data in seen:
            raise BadRequest(f"key {key!r} is written twice in one transaction")
        seen.add(data)
        deleted = kind == TXN_DELETE
        encoded = None if deleted else _encode_value(state, value)
        total_bytes += 0 if encoded is None else len(encoded)
        planned.append((slot, data, None if deleted else value, deleted))
        encodings.append(encoded)
    if total_bytes > MAX_OP_VALUE_BYTES:
        raise TooLarge(
            f"transaction writes {total_bytes} bytes of values, limit {MAX_OP_VALUE_BYTES}"
        )
    return planned, encodings


def _txn_keys(reads: Reads, writes: list[Planned]) -> list[tuple[int, bytes]]:
    return sorted({(slot, data) for slot, data, _ in reads} | {(s, d) for s, d, _, _ in writes})


async def _txn(
    state: DroneState,
    msg: TxnCommit,
    reads: Reads,
    writes: list[Planned],
    encoded: list[Encoded],
) -> Message:
    keys = _txn_keys(reads, writes)
    epochs = {slot: await state.wait_serving(slot) for slot in sorted({s for s, _ in keys})}
    await state.pending.wait_clear(keys)
    for slot, epoch in epochs.items():  # no await from here to _write's marking
        state.check_slot_servable(slot, epoch)
    return await _execute(state, msg.op_id, msg.ack, _plan_txn(state, reads, writes, encoded))


def _plan_txn(
    state: DroneState, reads: Reads, writes: list[Planned], encoded: list[Encoded]
) -> Decision:
    """Validate the read versions (no write to the keys may be pending)."""
    stale = [] if _INJECT_BUG_SKIP_TXN_VALIDATION else state.store.conflicts(reads)
    if stale:
        raise Conflict(
            f"{len(stale)} read key(s) changed since they were read",
            detail={"keys": [key_from_canonical(data) for data in stale]},
        )
    if not writes:
        return Committed(versions=[])
    return _Plan(writes, encoded, None)


def _serving_now(state: DroneState, slot: int) -> bool:
    """Whether `slot` may be written without waiting: False while it loads (the async path
    waits for it); raises like `wait_serving` when it is not served here."""
    if state.table.status_of(slot) is SlotStatus.LOADING:
        return False
    state.table.check_serving(slot, state.now())
    return True


def _settled_now(state: DroneState, keys: Sequence[tuple[int, bytes]]) -> bool:
    """Whether a validated write (cas, txn) of `keys` may be planned without waiting: every
    slot served now and no write to these keys pending (else the async path waits)."""
    return all(_serving_now(state, slot) for slot in {slot for slot, _ in keys}) and not any(
        state.pending.is_pending(slot, data) for slot, data in keys
    )


async def _once(
    state: DroneState, op_id: bytes, attempt: Callable[[], Awaitable[Message]]
) -> Message:
    """Run `attempt` unless `op_id` already has a reply; remember a successful reply.

    A failed attempt (CONFLICT, UNAVAILABLE, ...) applied nothing, so a retry runs again."""
    check_op_id(op_id)
    earlier = await state.ops.begin(op_id)
    if earlier is not None:
        return earlier
    reply: Message | None = None
    try:
        reply = await attempt()
        return reply
    finally:
        state.ops.finish(op_id, reply)


def _once_deferred(
    state: DroneState,
    msg: Put | Delete | CompareAndSet | TxnCommit,
    respond: Respond,
    plan: Callable[[], Decision | bool],
) -> Deferral:
    """`_once` without waiting: the reply now, DEFERRED, or None when the request has to wait
    (its op id is in flight, a slot loads, a key is pending, the write queue is full).

    `plan` checks (False: it would wait) and plans with no await; a durable write is queued
    and answered through `respond`, exactly once, when its batch resolves."""
    op_id, ack = msg.op_id, msg.ack
    check_op_id(op_id)
    ops = state.ops
    earlier = ops.lookup(op_id)
    if earlier is not None:
        return earlier
    if not state.batcher.has_room or not ops.claim_nowait(op_id):
        return None
    reply: Message | None = None
    handed_over = False  # to the batch: its completion finishes the op id and answers
    try:
        decision = plan()
        if isinstance(decision, bool):
            return None  # it would wait (True never comes: a check chain ends in a plan)
        if not isinstance(decision, _Plan):
            reply = decision
            return reply
        memory = ack == ACK_MEMORY
        versions, keys, op, size_bytes = _stage(state, op_id, decision, memory)
        if memory:
            state.batcher.submit_nowait(op, size_bytes, _Completion(state, decision, keys, True))
            reply = decision.reply(versions)
            return reply
        answer = _Answer(state, decision, keys, False, op_id, respond)
        state.batcher.submit_nowait(op, size_bytes, answer)
        handed_over = True
        return DEFERRED
    finally:
        if not handed_over:
            ops.finish(op_id, reply)


async def _execute(state: DroneState, op_id: bytes, ack: str, decision: Decision) -> Message:
    """Write what `decision` plans and return its reply (or the reply it already is).

    Must be entered with no await since the caller's last check of slots and versions."""
    if not isinstance(decision, _Plan):
        return decision
    memory = ack == ACK_MEMORY
    versions, keys, op, size_bytes = _stage(state, op_id, decision, memory)
    on_done = _Completion(state, decision, keys, memory)
    if memory:
        await state.batcher.submit(op, size_bytes, on_done)
    else:
        versions = await state.batcher.commit(op, size_bytes, on_done)
    return decision.reply(versions)


def _stage(
    state: DroneState, op_id: bytes, plan: _Plan, memory: bool
) -> tuple[list[int], list[SlotKey], WireOp, int]:
    """Hand out versions, mark the keys pending (memory ack: apply now); the versions, the
    keys, the db op and its value bytes."""
    versions = []
    keys = []
    for slot, data, _value, _deleted in plan.writes:
        epoch = state.table.epoch_of(slot)
        if epoch is None:
            raise RuntimeError(f"slot {slot} vanished between check and write")
        versions.append(state.store.next_version(slot, epoch))
        keys.append((slot, data))
    state.pending.add(keys)
    if memory:
        _apply(state, plan.writes, versions)
    op = pack_op(
        op_id,
        [
            (slot, data, version, value)
            for (slot, data), version, value in zip(keys, versions, plan.encoded, strict=True)
        ],
    )
    return versions, keys, op, sum(len(value) for value in plan.encoded if value is not None)


def _apply(state: DroneState, writes: list[Planned], versions: Sequence[int]) -> None:
    """Install `writes` in memory with `versions`."""
    store = state.store
    for (slot, data, value, deleted), version in zip(writes, versions, strict=True):
        if store.has_slot(slot):
            store.apply(slot, data, value, version, deleted=deleted)


class _Completion:
    """Runs when the db has decided an op: installs a durable write in memory (a memory-acked
    one is there already) and releases the keys' pending marks."""

    __slots__ = ("applied", "keys", "plan", "state")

    def __init__(self, state: DroneState, plan: _Plan, keys: list[SlotKey], applied: bool) -> None:
        self.state = state
        self.plan = plan
        self.keys = keys
        self.applied = applied

    def __call__(self, versions: list[int] | None, error: ServiceError | None) -> None:
        try:
            if error is not None:
                if self.applied:
                    log.error("memory-acked write lost, db refused it: %s", error.message)
                return
            planned = self.plan.writes
            if versions is not None and len(versions) == len(planned) and not self.applied:
                # Ours, or other versions when the db answered a retried op_id with its first
                # result and applied nothing now: install that result (same writes, the db's
                # versions); `apply` skips a key that already holds something newer.
                _apply(self.state, planned, versions)
        finally:
            self.state.pending.resolve(self.keys)


class _Answer(_Completion):
    """A durable write's completion that also answers its deferred request: remembers the
    reply under the op id (a failure is forgotten, so a retry runs again) and hands it, or
    the error, to `respond`."""

    __slots__ = ("op_id", "respond")

    def __init__(
        self,
        state: DroneState,
        plan: _Plan,
        keys: list[SlotKey],
        applied: bool,
        op_id: bytes,
        respond: Respond,
    ) -> None:
        super().__init__(state, plan, keys, applied)
        self.op_id = op_id
        self.respond = respond

    def __call__(self, versions: list[int] | None, error: ServiceError | None) -> None:
        reply: Message | None = None
        try:
            super().__call__(versions, error)
            if error is None:
                if versions is None or len(versions) != len(self.plan.writes):
                    error = Internal("the db answered a write without its versions")
                else:
                    reply = self.plan.reply(versions)
        finally:
            self.state.ops.finish(self.op_id, reply)
            if reply is not None:
                self.respond(reply)
            else:
                self.respond(error or Internal("a write completion failed"))
