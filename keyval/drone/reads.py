"""Read requests: get, get_many, scan. Reads see the last durable (or memory-acked) state."""

from __future__ import annotations

from typing import Any

from keyval.drone.slots import SlotStatus
from keyval.drone.state import DroneState, check_permission
from keyval.keys import (
    Key,
    canonical_key,
    check_key,
    check_key_slot,
    key_from_canonical,
    key_slot,
)
from keyval.messages import Get, GetMany, Scan, ScanPage, ValueReply, ValuesReply
from wire import codec
from wire.channel import PeerInfo
from wire.errors import BadRequest, TooLarge

# Keys in one get_many: bounds one request's work and the size of its reply.
MAX_GET_MANY_KEYS = 1000

# Encoded value bytes in one get_many reply: it must fit one 1 MiB frame with its envelope.
MAX_GET_MANY_BYTES = 768 * 1024

# Items in one scan page; the client pages on with `after`.
MAX_SCAN_LIMIT = 1000

# Encoded bytes of values in one scan page: keeps the reply under the 1 MiB frame. A page
# always holds at least one item (a value is at most 512 KiB).
MAX_SCAN_PAGE_BYTES = 512 * 1024

# Whole-drone scan cursors are the slot (2 bytes, big-endian) then the canonical key.
SLOT_CURSOR_BYTES = 2


async def handle_get(state: DroneState, peer: PeerInfo, msg: Get) -> ValueReply:
    data = check_key(msg.key, state.limits.max_key_bytes)
    check_permission(peer, msg.key)
    slot = key_slot(msg.key)
    await state.wait_serving(slot)
    return _lookup(state, slot, data)


def get_nowait(state: DroneState, peer: PeerInfo, msg: Get) -> ValueReply | None:
    """`handle_get` without waiting: None when the slot is still loading (the caller then
    awaits `handle_get`). Same checks, same errors, same answer."""
    data = check_key(msg.key, state.limits.max_key_bytes)
    check_permission(peer, msg.key)
    slot = key_slot(msg.key)
    if state.table.status_of(slot) is SlotStatus.LOADING:
        return None
    state.table.check_serving(slot, state.now())
    return _lookup(state, slot, data)


def _lookup(state: DroneState, slot: int, data: bytes) -> ValueReply:
    entry = state.store.get(slot, data)
    if entry is None:
        return ValueReply(found=False)
    return ValueReply(found=True, value=entry[0], version=entry[1])


async def handle_get_many(state: DroneState, peer: PeerInfo, msg: GetMany) -> ValuesReply:
    reply = get_many_nowait(state, peer, msg)
    if reply is not None:
        return reply
    for slot in sorted({key_slot(key) for key in msg.keys}):  # some slot is still loading
        await state.wait_serving(slot)
    reply = _read_many(state, peer, msg.keys, defer_loading=False)
    assert reply is not None  # defer_loading=False raises instead of returning None
    return reply


def get_many_nowait(state: DroneState, peer: PeerInfo, msg: GetMany) -> ValuesReply | None:
    """`handle_get_many` without waiting: None when a slot of the keys is still loading (the
    caller then awaits `handle_get_many`). Same checks, same errors, same answer."""
    return _read_many(state, peer, msg.keys, defer_loading=True)


def _read_many(
    state: DroneState, peer: PeerInfo, keys: list[Key], *, defer_loading: bool
) -> ValuesReply | None:
    """Every key's (found, value, version), all read at one instant (no await): one pass over
    the keys, each slot's ownership checked once. A loading slot gives None with
    `defer_loading`, else UNAVAILABLE like any slot that cannot be served."""
    if len(keys) > MAX_GET_MANY_KEYS:
        raise BadRequest(f"get_many takes at most {MAX_GET_MANY_KEYS} keys")
    table, store, now = state.table, state.store, state.now()
    max_key_bytes = state.limits.max_key_bytes
    restricted = bool(peer.permissions)
    served: set[int] = set()
    items: list[tuple[bool, Any, int]] = []
    size_bytes = 0
    for key in keys:
        data, slot = check_key_slot(key, max_key_bytes)
        if restricted:
            check_permission(peer, key)
        if slot not in served:
            if defer_loading and table.status_of(slot) is SlotStatus.LOADING:
                return None
            table.check_serving(slot, now)
            served.add(slot)
        entry = store.get(slot, data)
        if entry is None:
            items.append(_ABSENT)
            continue
        value = entry[0]
        size_bytes += _encoded_size_bound(value)
        if size_bytes > MAX_GET_MANY_BYTES:
            raise TooLarge(
                f"values of these keys exceed {MAX_GET_MANY_BYTES} bytes: ask for fewer at once",
                detail={"limit": MAX_GET_MANY_BYTES},
            )
        items.append((True, value, entry[1]))
    return ValuesReply(items=items)


_ABSENT = (False, None, 0)

# CBOR's longest head (type and length) of a byte or text string: 1 + an 8-byte length.
_CBOR_STRING_HEAD_BYTES = 9


def _encoded_size_bound(value: Any) -> int:
    """At least the CBOR size of `value`, cheaply: a byte string's (or an ASCII text's) length
    plus the longest head, without encoding it; other values are encoded and measured."""
    kind = type(value)
    if kind is bytes or (kind is str and value.isascii()):
        return len(value) + _CBOR_STRING_HEAD_BYTES
    return len(codec.encode(value))


def _prefix_bytes(prefix: Key | None) -> bytes | None:
    if prefix is None:
        return None
    if isinstance(prefix, int):
        raise BadRequest("a scan prefix is str or bytes; int keys have no prefixes")
    return canonical_key(prefix)


def _check_scan_permission(peer: PeerInfo, prefix: Key | None) -> None:
    """A principal limited to prefixes may only scan inside one of them."""
    if not peer.permissions:
        return
    if prefix is None or isinstance(prefix, int):
        raise BadRequest(
            f"principal {peer.name!r} may only scan with a prefix inside its permitted ones"
        )
    check_permission(peer, prefix)


async def handle_scan(state: DroneState, peer: PeerInfo, msg: Scan) -> ScanPage:
    if not 0 < msg.limit <= MAX_SCAN_LIMIT:
        raise BadRequest(f"scan limit must be 1..{MAX_SCAN_LIMIT}, got {msg.limit}")
    _check_scan_permission(peer, msg.prefix)
    prefix = _prefix_bytes(msg.prefix)
    start = None if msg.start is None else check_key(msg.start, state.limits.max_key_bytes)
    end = None if msg.end is None else check_key(msg.end, state.limits.max_key_bytes)
    if msg.slot is not None:
        await state.wait_serving(msg.slot)
        slots, first_after = [msg.slot], msg.after
    else:
        slots, first_after = _drone_scan_start(state, msg.after)
    page = _Page(msg.limit)
    for index, slot in enumerate(slots):
        after = first_after if index == 0 else None
        for item in state.store.scan(slot, prefix=prefix, start=start, end=end, after=after):
            if not page.add(slot, item):
                cursor = page.last_key
                if msg.slot is None:
                    cursor = page.last_slot.to_bytes(SLOT_CURSOR_BYTES, "big") + cursor
                return ScanPage(items=page.items, after=cursor)
    return ScanPage(items=page.items, after=None)


def _drone_scan_start(state: DroneState, after: bytes | None) -> tuple[list[int], bytes | None]:
    """Slots to scan (every slot served now, in order) and the key to resume after."""
    slots = state.table.serving_slots(state.now())
    held = state.table.held_slots()
    if not slots and held:
        state.table.check_serving(held[0], state.now())  # raises UNAVAILABLE saying why
    if after is None:
        return slots, None
    if len(after) <= SLOT_CURSOR_BYTES:
        raise BadRequest("bad whole-drone scan cursor")
    slot = int.from_bytes(after[:SLOT_CURSOR_BYTES], "big")
    remaining = [s for s in slots if s >= slot]
    if not remaining or remaining[0] != slot:
        return remaining, None  # the cursor's slot is gone: start the next one from its start
    return remaining, after[SLOT_CURSOR_BYTES:]


class _Page:
    """Items gathered for one scan page, with its count and byte budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[tuple[Key, Any, int]] = []
        self.size_bytes = 0
        self.last_key = b""
        self.last_slot = 0

    def add(self, slot: int, item: tuple[bytes, Any, int]) -> bool:
        """Add `item` if it fits (the first always does); False when the page is full."""
        data, value, version = item
        if len(self.items) >= self.limit:
            return False
        size_bytes = len(data) + len(codec.encode(value))
        if self.items and self.size_bytes + size_bytes > MAX_SCAN_PAGE_BYTES:
            return False
        self.items.append((key_from_canonical(data), value, version))
        self.size_bytes += size_bytes
        self.last_key, self.last_slot = data, slot
        return True
