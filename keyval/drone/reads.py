"""Read requests: get, get_many, scan. Reads see the last durable (or memory-acked) state."""

from __future__ import annotations

from typing import Any

from keyval.drone.slots import SlotStatus
from keyval.drone.state import DroneState, check_permission
from keyval.keys import Key, canonical_key, check_key, key_from_canonical, key_slot
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
    if len(msg.keys) > MAX_GET_MANY_KEYS:
        raise BadRequest(f"get_many takes at most {MAX_GET_MANY_KEYS} keys")
    wanted: list[tuple[int, bytes]] = []
    for key in msg.keys:
        data = check_key(key, state.limits.max_key_bytes)
        check_permission(peer, key)
        wanted.append((key_slot(key), data))
    for slot in sorted({slot for slot, _ in wanted}):
        await state.wait_serving(slot)
    for slot in {slot for slot, _ in wanted}:  # re-check after the waits: all at one instant
        state.table.check_serving(slot, state.now())
    items: list[tuple[bool, Any, int]] = []
    size_bytes = 0
    for slot, data in wanted:
        entry = state.store.get(slot, data)
        if entry is None:
            items.append((False, None, 0))
            continue
        size_bytes += len(codec.encode(entry[0]))
        if size_bytes > MAX_GET_MANY_BYTES:
            raise TooLarge(
                f"values of these keys exceed {MAX_GET_MANY_BYTES} bytes: ask for fewer at once",
                detail={"limit": MAX_GET_MANY_BYTES},
            )
        items.append((True, entry[0], entry[1]))
    return ValuesReply(items=items)


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
