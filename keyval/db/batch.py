"""Reading a db.write_batch: its flat op arrays checked by hand, field by field.

The batch's `ops` bytes decode (one C decode) to an array of ops, each
`[op_id, slot, key, version, value, ...]` (keyval.messages.pack_op). Checking these flat
arrays directly costs a fraction of building a message object per op and per write. Values
stay the CBOR bytes the drone sent: the db checks each is one valid CBOR item (cbor2's C
decoder, no value object kept; one decoder pass for the whole batch, see `prepare_ops`) and
stores the bytes as they are. Every
malformed case is a typed error naming the op (and write) and the field: the whole request's
for a batch that is not an array of ops, the op's own for anything inside one op.
"""

from __future__ import annotations

from typing import Any

from keyval.db.records import PreparedOp, StoredWrite
from keyval.keys import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, canonical_slot
from keyval.messages import WIRE_WRITE_ITEMS
from wire import codec
from wire.errors import BadRequest, DecodeError, ServiceError, TooLarge

# Client-chosen operation ids are 16 random bytes: collisions are out of reach (2**-64 after
# 2**32 ops) and a fixed size keeps the op-result table's index small.
OP_ID_BYTES = 16

# Ops in one DbWriteBatch and writes in one op. A drone flushes at most a few hundred ops at
# a time and a transaction touches tens of keys; the bounds stop one request from claiming
# a whole transaction's worth of memory and time.
MAX_OPS_PER_REQUEST = 4096
MAX_WRITES_PER_OP = 1024

# Versions are stored as signed 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT).
MAX_STORED_VERSION = 2**63 - 1


def decode_ops(data: bytes) -> list[Any]:
    """The ops array of a write batch; BadRequest/TooLarge for the whole request."""
    try:
        ops = codec.decode(data)
    except DecodeError as error:
        raise BadRequest(f"ops: {error.message}") from None
    if type(ops) is not list:
        raise BadRequest(f"ops: expected an array of ops, got {_kind(ops)}")
    if len(ops) > MAX_OPS_PER_REQUEST:
        raise TooLarge(f"{len(ops)} ops in one batch, limit {MAX_OPS_PER_REQUEST}")
    return ops


def prepare_ops(ops: list[Any]) -> list[PreparedOp | ServiceError]:
    """Every op of a batch, checked: its PreparedOp, or the error refusing it (that op only).

    The values are checked as CBOR first all together, in one decoder pass (`_values_valid`);
    only when that pass finds a bad one is each value checked on its own, so that the error
    goes to the op that carried it and the batch's other ops still go through."""
    values_checked = _values_valid(ops)
    prepared: list[PreparedOp | ServiceError] = []
    for index, op in enumerate(ops):
        try:
            prepared.append(prepare_op(index, op, values_checked=values_checked))
        except ServiceError as error:
            prepared.append(error)
    return prepared


def _values_valid(ops: list[Any]) -> bool:
    """True when every value `prepare_op` would check as CBOR (non-empty bytes within the size
    limit, at a value position of an op array) is one valid item, checked in one pass."""
    values = [
        value
        for op in ops
        if type(op) is list
        for value in op[WIRE_WRITE_ITEMS::WIRE_WRITE_ITEMS]
        if type(value) is bytes and 0 < len(value) <= DEFAULT_MAX_VALUE_BYTES
    ]
    try:
        codec.check_each(values)
    except DecodeError:
        return False
    return True


def prepare_op(index: int, op: Any, *, values_checked: bool = False) -> PreparedOp:
    """Op `index` of a batch, checked: BadRequest/TooLarge naming the op, write and field.
    `values_checked`: the caller has checked every value as CBOR already (`_values_valid`)."""
    if type(op) is not list:
        raise BadRequest(f"op {index}: expected an array, got {_kind(op)}")
    count, extra = divmod(len(op) - 1, WIRE_WRITE_ITEMS)
    if not op or extra:
        raise BadRequest(
            f"op {index}: {len(op)} items; an op is its op_id then {WIRE_WRITE_ITEMS} per write"
        )
    if count > MAX_WRITES_PER_OP:
        raise TooLarge(f"op {index}: {count} writes in one op, limit {MAX_WRITES_PER_OP}")
    op_id = op[0]
    if type(op_id) is not bytes or len(op_id) != OP_ID_BYTES:
        raise BadRequest(f"op {index}: op_id must be {OP_ID_BYTES} bytes, got {_kind(op_id)}")
    writes = []
    for number in range(count):
        base = 1 + number * WIRE_WRITE_ITEMS
        slot, key, version, value = op[base], op[base + 1], op[base + 2], op[base + 3]
        writes.append(_write(index, number, slot, key, version, value, not values_checked))
    return PreparedOp(op_id, tuple(writes), tuple(write.version for write in writes))


def _write(
    index: int, number: int, slot: Any, key: Any, version: Any, value: Any, check_value: bool
) -> StoredWrite:
    if type(key) is not bytes:
        raise BadRequest(f"op {index} write {number}: key must be bytes, got {_kind(key)}")
    if len(key) > DEFAULT_MAX_KEY_BYTES:
        raise TooLarge(
            f"op {index} write {number}: key of {len(key)} bytes, limit {DEFAULT_MAX_KEY_BYTES}"
        )
    if type(slot) is not int:
        raise BadRequest(f"op {index} write {number}: slot must be an int, got {_kind(slot)}")
    try:
        hashed = canonical_slot(key)
    except BadRequest as error:
        raise BadRequest(f"op {index} write {number}: key: {error.message}") from None
    if slot != hashed:
        raise BadRequest(f"op {index} write {number}: key {key!r} does not hash to slot {slot}")
    if value is None:
        deleted, lowest = True, 0
    elif type(value) is not bytes or not value:
        raise BadRequest(
            f"op {index} write {number}: value must be CBOR bytes or null, got {_kind(value)}"
        )
    elif len(value) > DEFAULT_MAX_VALUE_BYTES:
        raise TooLarge(
            f"op {index} write {number}: value of {len(value)} bytes, "
            f"limit {DEFAULT_MAX_VALUE_BYTES}"
        )
    else:
        # One CBOR item keyval's codec accepts: a reseed must never meet a bad value.
        if check_value:
            try:
                codec.check_each((value,))
            except DecodeError as error:
                raise BadRequest(
                    f"op {index} write {number}: value is not valid CBOR ({error.message})"
                ) from None
        deleted, lowest = False, 1
    if type(version) is not int or not lowest <= version <= MAX_STORED_VERSION:
        raise BadRequest(f"op {index} write {number}: bad version {version!r} for key {key!r}")
    return StoredWrite(slot, key, b"" if deleted else value, deleted, version)


def _kind(value: Any) -> str:
    """How an error names a bad field: its type, and its length for bytes."""
    if type(value) is bytes:
        return f"{len(value)} bytes"
    return type(value).__name__
