"""Per-slot ordered storage: the drone's in-memory data.

Each slot the drone holds is a `SortedDict` from canonical key bytes (keyval.keys) to one
`bytes` record: the version as 8 big-endian bytes, then the value's CBOR. One small object
per key instead of a `(value, version)` tuple, a version int and a value object: measured
with tracemalloc at 1M keys (16-byte keys, 32-byte values) 172 B per key against 270 for the
tuples (the benchmark targets at most 200 B of RSS per key). A read decodes the value (about
a microsecond for a small one). Sorted canonical keys make prefix and range scans within a
slot cheap, and a whole slot is dropped or installed at once.

Versions: a version is `epoch * 2**40 + sequence`. Each slot keeps the highest version it has
handed out or loaded; `next_version` hands out one above both that and the epoch's base, so a
key's version never goes back, across deletes and reseeds (epochs rise on every move).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any

from sortedcontainers import SortedDict

from wire import codec
from wire.errors import BadRequest, Internal

Entry = tuple[Any, int]  # (value, version); version > 0
Item = tuple[bytes, Any, int]  # (canonical key, value, version)

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
    """The keys of every slot this drone holds, ordered per slot."""

    __slots__ = ("_last_version", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, SortedDict] = {}
        self._last_version: dict[int, int] = {}

    # ------------------------------------------------------------ slots as a whole

    def has_slot(self, slot: int) -> bool:
        return slot in self._slots

    def slots(self) -> list[int]:
        return sorted(self._slots)

    def install_slot(self, slot: int, items: Iterable[Item]) -> None:
        """Replace `slot` with `items` (in any order); its version counter starts above them."""
        pairs: list[tuple[bytes, bytes]] = []
        highest = 0
        for key, value, version in items:
            if type(key) is not bytes or type(version) is not int or not 0 < version < 2**64:
                raise BadRequest(f"bad reseed item for slot {slot}: version {version!r}")
            pairs.append((key, _record(value, version)))
            if version > highest:
                highest = version
        # One bulk build (SortedDict sorts once) instead of a sorted insert per key.
        self._slots[slot] = SortedDict(pairs)
        self._last_version[slot] = highest

    def install_slot_encoded(
        self, slot: int, keys: list[bytes], values: list[bytes], versions: list[int]
    ) -> None:
        """`install_slot` for items whose values are still CBOR, in key order (a db page, its
        values checked with codec.check_each): no decode and re-encode per value."""
        if not len(keys) == len(values) == len(versions):
            raise BadRequest(f"reseed of slot {slot}: keys, values and versions differ in length")
        if not set(map(type, keys)) <= {bytes} or not set(map(type, values)) <= {bytes}:
            raise BadRequest(f"reseed of slot {slot}: keys and values must be bytes")
        if not set(map(type, versions)) <= {int} or (
            versions and not (0 < min(versions) and max(versions) < 2**64)
        ):
            raise BadRequest(f"bad reseed version for slot {slot}")
        pack = _VERSION.pack
        records = [pack(version) + value for version, value in zip(versions, values, strict=True)]
        self._slots[slot] = SortedDict(zip(keys, records, strict=True))
        self._last_version[slot] = max(versions, default=0)

    def create_slot(self, slot: int) -> None:
        """Start `slot` empty (a slot the db has nothing for)."""
        self.install_slot(slot, ())

    def drop_slot(self, slot: int) -> None:
        self._slots.pop(slot, None)
        self._last_version.pop(slot, None)

    def key_count(self, slot: int | None = None) -> int:
        if slot is not None:
            return len(self._slots.get(slot, ()))
        return sum(len(data) for data in self._slots.values())

    # ------------------------------------------------------------ single keys

    def _data(self, slot: int) -> SortedDict:
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
            data.pop(key, None)
        else:
            data[key] = _record(value, version)
        if version > self._last_version.get(slot, 0):
            self._last_version[slot] = version
        return True

    def conflicts(self, reads: Iterable[tuple[int, bytes, int]]) -> list[bytes]:
        """OCC validation: the keys of `reads` (slot, key, version seen) whose version moved."""
        return [key for slot, key, seen in reads if self.version_of(slot, key) != seen]

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
        strictly after `after`. A generator: the caller stops when its page is full."""
        data = self._data(slot)
        lower, lower_inclusive = start, True
        if prefix is not None and (lower is None or prefix > lower):
            lower = prefix
        if after is not None and (lower is None or after >= lower):
            lower, lower_inclusive = after, False
        for key in data.irange(lower, end, inclusive=(lower_inclusive, False)):
            if prefix is not None and not key.startswith(prefix):
                return
            value, version = _entry(data[key])
            yield key, value, version
