"""Per-slot storage: the drone's in-memory data.

Each slot the drone holds is a plain `dict` from canonical key bytes (keyval.keys) to one
`bytes` record: the version as 8 big-endian bytes, then the value's CBOR. One small object
per key instead of a `(value, version)` tuple, a version int and a value object. A read
decodes the value (about a microsecond for a small one).

Key order for scans is kept apart and only for slots that are scanned: the first scan of a
slot sorts its keys into a list, which inserts and deletes then keep sorted (bisect; a
`SortedList` once the slot holds over SORTED_LIST_MIN_KEYS keys, so a huge hash-tagged slot
does not pay a long memmove per insert). A slot never scanned pays nothing for order. At 1M
keys over 16,384 slots (16-byte keys, 32-byte values, ~61 keys per slot) this is about
180 B per key in memory (keys 64, records 80, dict slots ~36) against ~196 with a
`SortedDict` per slot, whose per-slot objects and index lists cost ~16 B per key more; the
benchmark targets at most 200 B of RSS per key for the whole drone. A whole slot is
installed (no sorting) or dropped at once.

Versions: a version is `epoch * 2**40 + sequence`. Each slot keeps the highest version it has
handed out or loaded; `next_version` hands out one above both that and the epoch's base, so a
key's version never goes back, across deletes and reseeds (epochs rise on every move).
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

from sortedcontainers import SortedList

from wire import codec
from wire.errors import BadRequest, Internal

Entry = tuple[Any, int]  # (value, version); version > 0
Item = tuple[bytes, Any, int]  # (canonical key, value, version)
# A scanned slot's keys in order: a plain list while small, a SortedList once large.
Order: TypeAlias = "list[bytes] | SortedList"

# Above this many keys a slot's order is a SortedList (O(log n) inserts); below it a plain
# sorted list (an insert moves at most 8 KiB of pointers, cheaper than SortedList's own
# per-slot objects, which cost ~1 KiB per slot).
SORTED_LIST_MIN_KEYS = 1024

# Versions are epoch * 2**40 + a per-slot sequence: 2**40 writes to one slot in one epoch
# (a trillion) is beyond any slot's life between moves.
EPOCH_SHIFT_BITS = 40
MAX_SEQUENCE = (1 << EPOCH_SHIFT_BITS) - 1


def epoch_base(epoch: int) -> int:
    """The lowest version a slot may hand out in `epoch` is one above this."""
    return epoch << EPOCH_SHIFT_BITS


# A record's version prefix: versions are below 2**64 (epochs stay far under 2**24).
_VERSION = struct.Struct(">Q")
_VERSION_BYTES = _VERSION.size


def _record(value: Any, version: int) -> bytes:
    return _VERSION.pack(version) + codec.encode(value)


def _version(record: bytes) -> int:
    version: int = _VERSION.unpack_from(record)[0]
    return version


def _entry(record: bytes) -> Entry:
    return codec.decode(record[_VERSION_BYTES:]), _version(record)


class SlotStore:
    """The keys of every slot this drone holds; key order only for slots that are scanned."""

    __slots__ = ("_last_version", "_orders", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, dict[bytes, bytes]] = {}
        self._orders: dict[int, Order] = {}  # built by the first scan of a slot, then kept
        self._last_version: dict[int, int] = {}

    # ------------------------------------------------------------ slots as a whole

    def has_slot(self, slot: int) -> bool:
        return slot in self._slots

    def slots(self) -> list[int]:
        return sorted(self._slots)

    def install_slot(self, slot: int, items: Iterable[Item]) -> None:
        """Replace `slot` with `items` (in any order); its version counter starts above them."""
        data: dict[bytes, bytes] = {}
        highest = 0
        for key, value, version in items:
            if type(key) is not bytes or type(version) is not int or not 0 < version < 2**64:
                raise BadRequest(f"bad reseed item for slot {slot}: version {version!r}")
            data[key] = _record(value, version)
            if version > highest:
                highest = version
        self._slots[slot] = data
        self._orders.pop(slot, None)  # sorted again by the next scan
        self._last_version[slot] = highest

    def create_slot(self, slot: int) -> None:
        """Start `slot` empty (a slot the db has nothing for)."""
        self.install_slot(slot, ())

    def drop_slot(self, slot: int) -> None:
        self._slots.pop(slot, None)
        self._orders.pop(slot, None)
        self._last_version.pop(slot, None)

    def key_count(self, slot: int | None = None) -> int:
        if slot is not None:
            return len(self._slots.get(slot, ()))
        return sum(len(data) for data in self._slots.values())

    def ordered_slots(self) -> int:
        """How many slots currently keep a key order (slots scanned since they were loaded)."""
        return len(self._orders)

    # ------------------------------------------------------------ single keys

    def _data(self, slot: int) -> dict[bytes, bytes]:
        data = self._slots.get(slot)
        if data is None:
            raise Internal(f"slot {slot} is not loaded in this store")
        return data

    def get(self, slot: int, key: bytes) -> Entry | None:
        record = self._data(slot).get(key)
        return None if record is None else _entry(record)

    def contains(self, slot: int, key: bytes) -> bool:
        return key in self._data(slot)

    def version_of(self, slot: int, key: bytes) -> int:
        """The key's current version, 0 when absent."""
        record = self._data(slot).get(key)
        return 0 if record is None else _version(record)

    def next_version(self, slot: int, epoch: int) -> int:
        """Hand out the next version for a write to `slot` in `epoch` (never reused)."""
        base = epoch_base(epoch)
        version = max(self._last_version.get(slot, 0), base) + 1
        if version - base > MAX_SEQUENCE:
            raise Internal(f"slot {slot} ran out of versions in epoch {epoch}")
        self._last_version[slot] = version
        return version

    def apply(self, slot: int, key: bytes, value: Any, version: int, *, deleted: bool) -> bool:
        """Install one durable write unless the key already holds a newer version.

        Returns whether it was applied. A delete removes the key."""
        data = self._data(slot)
        current = data.get(key)
        if current is not None and _version(current) >= version:
            return False
        if deleted:
            if current is not None:
                del data[key]
                self._order_remove(slot, key)
        else:
            data[key] = _record(value, version)
            if current is None:
                self._order_insert(slot, key)
        if version > self._last_version.get(slot, 0):
            self._last_version[slot] = version
        return True

    def conflicts(self, reads: Iterable[tuple[int, bytes, int]]) -> list[bytes]:
        """OCC validation: the keys of `reads` (slot, key, version seen) whose version moved."""
        return [key for slot, key, seen in reads if self.version_of(slot, key) != seen]

    # ------------------------------------------------------------ key order

    def _order_insert(self, slot: int, key: bytes) -> None:
        order = self._orders.get(slot)
        if order is None:
            return
        if isinstance(order, SortedList):
            order.add(key)
            return
        bisect.insort(order, key)
        if len(order) > SORTED_LIST_MIN_KEYS:
            self._orders[slot] = SortedList(order)

    def _order_remove(self, slot: int, key: bytes) -> None:
        order = self._orders.get(slot)
        if order is None:
            return
        if isinstance(order, SortedList):
            order.remove(key)
            return
        del order[bisect.bisect_left(order, key)]

    def _order(self, slot: int, data: dict[bytes, bytes]) -> Order:
        order = self._orders.get(slot)
        if order is None:
            keys = sorted(data)
            order = keys if len(keys) <= SORTED_LIST_MIN_KEYS else SortedList(keys)
            self._orders[slot] = order
        if len(order) != len(data):
            raise Internal(f"slot {slot}: key order holds {len(order)} keys, data {len(data)}")
        return order

    # ------------------------------------------------------------ scans

    def scan(
        self,
        slot: int,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        end: bytes | None = None,
        after: bytes | None = None,
    ) -> Iterator[Item]:
        """Items of `slot` in key order: keys starting with `prefix`, in [start, end), and
        strictly after `after`. A generator: the caller stops when its page is full, and
        must not change the slot while it holds the generator (no await in between)."""
        data = self._data(slot)
        lower, lower_inclusive = start, True
        if prefix is not None and (lower is None or prefix > lower):
            lower = prefix
        if after is not None and (lower is None or after >= lower):
            lower, lower_inclusive = after, False
        for key in _keys_between(self._order(slot, data), lower, lower_inclusive, end):
            if prefix is not None and not key.startswith(prefix):
                return
            value, version = _entry(data[key])
            yield key, value, version


def _keys_between(
    order: Order, lower: bytes | None, lower_inclusive: bool, upper: bytes | None
) -> Iterator[bytes]:
    """Keys of `order` from `lower` (inclusive or not) up to `upper` (exclusive)."""
    if isinstance(order, SortedList):
        keys: Iterator[bytes] = order.irange(lower, upper, inclusive=(lower_inclusive, False))
        return keys
    first = 0
    if lower is not None:
        first = (bisect.bisect_left if lower_inclusive else bisect.bisect_right)(order, lower)
    stop = len(order) if upper is None else bisect.bisect_left(order, upper)
    return itertools.islice(order, first, max(first, stop))
