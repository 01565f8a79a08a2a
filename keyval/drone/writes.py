"""Mutations: put, delete, compare-and-set, transaction commit.

Every mutation follows the same steps: admit the request (key, value size, permission, op id),
claim its op id (a retry gets the first reply), wait until its slots are served, and for
cas/txn wait until its keys have no pending write. Then, with no await in between: re-check
the slots, validate (cas/txn), hand out versions and mark the keys pending. The writes go to
the db in the drone's next batch.

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

from keyval.drone.batcher import Completion
from keyval.drone.opcache import check_op_id
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
    Written,
    pack_op,
)
from wire import codec
from wire.channel import PeerInfo
from wire.errors import BadRequest, Conflict, ServiceError, TooLarge
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


async def handle_put(state: DroneState, peer: PeerInfo, msg: Put) -> Message:
    _check_ack(msg.ack)
    slot, data = _admit_key(state, peer, msg.key)
    encoded = _encode_value(state, msg.value)
    return await _once(state, msg.op_id, lambda: _put(state, msg, slot, data, encoded))


async def _put(state: DroneState, msg: Put, slot: int, data: bytes, encoded: bytes) -> Message:
    epoch = await state.wait_serving(slot)
    state.check_slot_servable(slot, epoch)
    existed = state.store.contains(slot, data) or state.pending.is_pending(slot, data)
    versions = await _write(state, msg.op_id, msg.ack, [(slot, data, msg.value, False)], [encoded])
    return Written(version=versions[0], existed=existed)


async def handle_delete(state: DroneState, peer: PeerInfo, msg: Delete) -> Message:
    _check_ack(msg.ack)
    slot, data = _admit_key(state, peer, msg.key)
    return await _once(state, msg.op_id, lambda: _delete(state, msg, slot, data))


async def _delete(state: DroneState, msg: Delete, slot: int, data: bytes) -> Message:
    epoch = await state.wait_serving(slot)
    state.check_slot_servable(slot, epoch)
    if not state.store.contains(slot, data) and not state.pending.is_pending(slot, data):
        return Written(version=0, existed=False)
    versions = await _write(state, msg.op_id, msg.ack, [(slot, data, None, True)], [None])
    return Written(version=versions[0], existed=True)


async def handle_cas(state: DroneState, peer: PeerInfo, msg: CompareAndSet) -> Message:
    _check_ack(msg.ack)
    if msg.expected_version < 0:
        raise BadRequest("expected_version is a version (>= 1) or 0 for 'absent'")
    slot, data = _admit_key(state, peer, msg.key)
    encoded = None if msg.delete else _encode_value(state, msg.value)
    return await _once(state, msg.op_id, lambda: _cas(state, msg, slot, data, encoded))


async def _cas(
    state: DroneState, msg: CompareAndSet, slot: int, data: bytes, encoded: Encoded
) -> Message:
    epoch = await state.wait_serving(slot)
    await state.pending.wait_clear([(slot, data)])
    state.check_slot_servable(slot, epoch)  # no await from here to _write's marking
    current = state.store.version_of(slot, data)
    if current != msg.expected_version:
        raise Conflict(
            f"key version is {current}, expected {msg.expected_version}",
            detail={"version": current},
        )
    if msg.delete and current == 0:
        return Written(version=0, existed=False)
    value = None if msg.delete else msg.value
    versions = await _write(state, msg.op_id, msg.ack, [(slot, data, value, msg.delete)], [encoded])
    return Written(version=versions[0], existed=current != 0)


async def handle_txn_commit(state: DroneState, peer: PeerInfo, msg: TxnCommit) -> Message:
    _check_ack(msg.ack)
    if len(msg.reads) + len(msg.writes) > MAX_TXN_KEYS:
        raise TooLarge(f"a transaction touches at most {MAX_TXN_KEYS} keys")
    reads = [(*_admit_key(state, peer, key), version) for key, version in msg.reads]
    writes, encoded = _admit_txn_writes(state, peer, msg.writes)
    return await _once(state, msg.op_id, lambda: _txn(state, msg, reads, writes, encoded))


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


async def _txn(
    state: DroneState,
    msg: TxnCommit,
    reads: list[tuple[int, bytes, int]],
    writes: list[Planned],
    encoded: list[Encoded],
) -> Message:
    keys = sorted({(slot, data) for slot, data, _ in reads} | {(s, d) for s, d, _, _ in writes})
    epochs = {slot: await state.wait_serving(slot) for slot in sorted({s for s, _ in keys})}
    await state.pending.wait_clear(keys)
    for slot, epoch in epochs.items():  # no await from here to _write's marking
        state.check_slot_servable(slot, epoch)
    stale = [] if _INJECT_BUG_SKIP_TXN_VALIDATION else state.store.conflicts(reads)
    if stale:
        raise Conflict(
            f"{len(stale)} read key(s) changed since they were read",
            detail={"keys": [key_from_canonical(data) for data in stale]},
        )
    if not writes:
        return Committed(versions=[])
    versions = await _write(state, msg.op_id, msg.ack, writes, encoded)
    return Committed(versions=versions)


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


async def _write(
    state: DroneState, op_id: bytes, ack: str, writes: list[Planned], encoded: list[Encoded]
) -> list[int]:
    """Hand out versions, mark the keys pending, send to the db; return the new versions.

    `encoded` holds each write's value CBOR (None for a deletion). Must be entered with no
    await since the caller's last check of slots and versions."""
    versions = []
    for slot, _data, _value, _deleted in writes:
        epoch = state.table.epoch_of(slot)
        if epoch is None:
            raise RuntimeError(f"slot {slot} vanished between check and write")
        versions.append(state.store.next_version(slot, epoch))
    keys = [(slot, data) for slot, data, _value, _deleted in writes]
    state.pending.add(keys)
    memory = ack == ACK_MEMORY
    if memory:
        _apply(state, writes, versions)
    on_done = _completion(state, writes, keys, applied=memory)
    op = pack_op(
        op_id,
        [
            (slot, data, version, value)
            for (slot, data), version, value in zip(keys, versions, encoded, strict=True)
        ],
    )
    size_bytes = sum(len(value) for value in encoded if value is not None)
    if memory:
        await state.batcher.submit(op, size_bytes, on_done)
        return versions
    return await state.batcher.commit(op, size_bytes, on_done)


def _apply(state: DroneState, writes: list[Planned], versions: Sequence[int]) -> None:
    """Install `writes` in memory with `versions`."""
    store = state.store
    for (slot, data, value, deleted), version in zip(writes, versions, strict=True):
        if store.has_slot(slot):
            store.apply(slot, data, value, version, deleted=deleted)


def _completion(
    state: DroneState,
    planned: list[Planned],
    keys: list[tuple[int, bytes]],
    *,
    applied: bool,
) -> Completion:
    def on_done(versions: list[int] | None, error: ServiceError | None) -> None:
        try:
            if error is not None:
                if applied:
                    log.error("memory-acked write lost, db refused it: %s", error.message)
                return
            if versions is not None and len(versions) == len(planned) and not applied:
                # Ours, or other versions when the db answered a retried op_id with its first
                # result and applied nothing now: install that result (same writes, the db's
                # versions); `apply` skips a key that already holds something newer.
                _apply(state, planned, versions)
        finally:
            state.pending.resolve(keys)

    return on_done
