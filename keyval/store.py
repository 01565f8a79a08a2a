"""Per-slot ordered storage: the drone's in-memory data.

Each key is one `bytes` record: the version as 8 big-endian bytes, then the value's CBOR. One
small object per key instead of a `(value, version)` tuple, a version int and a value object.
A read decodes the value (about a microsecond for a small one).

A slot keeps its keys in order, so prefix and range scans within it are cheap and a whole slot
is installed or dropped at once. A small slot (up to SMALL_SLOT_MAX_KEYS keys, nearly every
slot: 1M keys over 16,384 slots is ~61 per slot) is one sorted list of entries, each one bytes
object holding the (escaped) key and then its record, found by bisection: for a 16-byte key
and a 32-byte value one 96 B object plus an 8 B list pointer, against a 64 B key, an 80 B
record and a hash table slot. A slot that grows past the bound becomes a `SortedDict` of key
to record (a hash lookup and O(log n) inserts; ~46 B of table and index per key and ~1 KiB
per slot, which only a big slot can afford). Measured in-process at 1M such keys: ~107 B of
RSS per key, against ~196 with a `SortedDict` for every slot (the benchmark's target is at
most 200 B of RSS per key for the whole drone). The price is a lookup of ~0.8 us of CPU
instead of ~0.3 (escape the key, bisect, slice the record out).

Versions: a version is `epoch * 2**40 + sequence`. Each slot keeps the highest version it has
handed out or loaded; `next_version` hands out one above both that and the epoch's base, so a
key's version never goes back, across deletes and reseeds (epochs rise on every move).
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

from sortedcontainers import SortedDict

from wire import codec
from wire.errors import BadRequest, Internal

Entry = tuple[Any, int]  # (value, version); version > 0
Item = tuple[bytes, Any, int]  # (canonical key, value, version)

# Keys a slot holds as a sorted list of entries before it becomes a SortedDict: inserting a
# new key there moves up to 8 B x this many pointers (16 KiB, about a microsecond), and a
# lookup is at most 12 key comparisons.
SMALL_SLOT_MAX_KEYS = 2048

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


# A small slot's entry is one bytes object: its key, escaped so that entries sort as their
# keys do and no entry's key part is a prefix of another's (each 0x00 byte becomes 0x00 0xFF,
# then 0x00 0x00 ends the key: FoundationDB's tuple layer encodes byte strings the same way),
# then the key's record. One object per key instead of a key and a record: 96 B against
# 64 + 80 for a 16-byte key with a 32-byte value.
_ZERO = b"\x00"
_ESCAPED_ZERO = b"\x00\xff"
_KEY_END = b"\x00\x00"


def _entry_prefix(key: bytes) -> bytes:
    """What a key's entry starts with; also the probe that finds it by bisection."""
    if _ZERO in key:
        key = key.replace(_ZERO, _ESCAPED_ZERO)
    return key + _KEY_END


def _split_entry(entry: bytes) -> tuple[bytes, bytes]:
    """(key, record) of an entry; the first 0x00 0x00 ends the escaped key."""
    end = entry.index(_KEY_END)
    key = entry[:end]
    if _ZERO in key:
        key = key.replace(_ESCAPED_ZERO, _ZERO)
    return key, entry[end + len(_KEY_END) :]


class _SmallSlot:
    """A small slot: one sorted list of entries (escaped key, then record), bisected.

    Offers what the store needs of a slot (get, set, delete, `between`), as `_BigSlot` does."""

    __slots__ = ("entries",)

    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.entries = sorted(_entry_prefix(key) + record for key, record in records.items())

    def __len__(self) -> int:
        return len(self.entries)

    def _find(self, key: bytes) -> tuple[int, int]:
        """(index of `key`'s entry or where it would go, its key part's length or 0)."""
        probe = _entry_prefix(key)
        entries = self.entries
        index = bisect_left(entries, probe)
        found = index < len(entries) and entries[index].startswith(probe)
        return index, len(probe) if found else 0

    def get(self, key: bytes) -> bytes | None:
        probe = _entry_prefix(key)  # _find inlined: this is every read's lookup
        entries = self.entries
        index = bisect_left(entries, probe)
        if index < len(entries):
            entry = entries[index]
            if entry.startswith(probe):
                return entry[len(probe) :]
        return None

    def __contains__(self, key: bytes) -> bool:
        return self._find(key)[1] > 0

    def __setitem__(self, key: bytes, record: bytes) -> None:
        index, prefix_bytes = self._find(key)
        entry = _entry_prefix(key) + record
        if prefix_bytes:
            self.entries[index] = entry
        else:
            self.entries.insert(index, entry)

    def __delitem__(self, key: bytes) -> None:
        index, prefix_bytes = self._find(key)
        if not prefix_bytes:
            raise KeyError(key)
        del self.entries[index]

    def between(
        self, lower: bytes | None, lower_inclusive: bool, upper: bytes | None
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, record) in key order from `lower` (None: the first) to `upper` (exclusive)."""
        entries = self.entries
        first, stop = 0, len(entries)
        if lower is not None:
            first, prefix_bytes = self._find(lower)
            if prefix_bytes and not lower_inclusive:
                first += 1
        if upper is not None:
            stop = self._find(upper)[0]
        return map(_split_entry, entries[first:stop])

    def pairs(self) -> Iterator[tuple[bytes, bytes]]:
        return map(_split_entry, self.entries)


class _BigSlot(SortedDict):
    """A big slot: a SortedDict from key to record (hashed lookups, O(log n) inserts)."""

    def between(
        self, lower: bytes | None, lower_inclusive: bool, upper: bytes | None
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, record) in key order from `lower` (None: the first) to `upper` (exclusive)."""
        for key in self.irange(lower, upper, inclusive=(lower_inclusive, False)):
            yield key, self[key]


SlotData: TypeAlias = "_SmallSlot | _BigSlot"


def _slot_data(records: dict[bytes, bytes]) -> SlotData:
    """A slot holding `records`, sorted once (not a sorted insert per key)."""
    if len(records) > SMALL_SLOT_MAX_KEYS:
        return _BigSlot(records)
    return _SmallSlot(records)


class SlotStore:
    """The keys of every slot this drone holds, ordered per slot."""

    __slots__ = ("_last_version", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, SlotData] = {}
        self._last_version: dict[int, int] = {}

    # ------------------------------------------------------------ slots as a whole

    def has_slot(self, slot: int) -> bool:
        return slot in self._slots

    def slots(self) -> list[int]:
        return sorted(self._slots)

    def install_slot(self, slot: int, items: Iterable[Item]) -> None:
        """Replace `slot` with `items` (in any order); its version counter starts above them."""
        records: dict[bytes, bytes] = {}
        highest = 0
        for key, value, version in items:
            if type(key) is not bytes or type(version) is not int or not 0 < version < 2**64:
                raise BadRequest(f"bad reseed item for slot {slot}: version {version!r}")
            records[key] = _record(value, version)
            if version > highest:
                highest = version
        self._slots[slot] = _slot_data(records)
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
        self._slots[slot] = _slot_data(dict(zip(keys, records, strict=True)))
        self._last_version[slot] = max(versions, default=0)

    def create_slot(self, slot: int) -> None:
        """Start `slot` empty (a slot the db has nothing for)."""
        self.install_slot(slot, ())

    def drop_slot(self, slot: int) -> None:
        self._slots.pop(slot, None)
        self._last_version.pop(slot, None)

    def key_count(self, slot: int | None = None) -> int:
        if slot is not None:
            data = self._slots.get(slot)
            return 0 if data is None else len(data)
        return sum(len(data) for data in self._slots.values())

    def big_slots(self) -> int:
        """How many slots hold over SMALL_SLOT_MAX_KEYS keys (each kept as a SortedDict)."""
        return sum(type(data) is _BigSlot for data in self._slots.values())

    # ------------------------------------------------------------ single keys

    def _data(self, slot: int) -> SlotData:
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
        else:
            data[key] = _record(value, version)
            if current is None and type(data) is _SmallSlot and len(data) > SMALL_SLOT_MAX_KEYS:
                self._slots[slot] = _BigSlot(data.pairs())
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
        strictly after `after`. A generator: the caller stops when its page is full, and
        does not change the slot while it iterates (no await in between)."""
        data = self._data(slot)
        lower, lower_inclusive = start, True
        if prefix is not None and (lower is None or prefix > lower):
            lower = prefix
        if after is not None and (lower is None or after >= lower):
            lower, lower_inclusive = after, False
        for key, record in data.between(lower, lower_inclusive, end):
            if prefix is not None and not key.startswith(prefix):
                return
            value, version = _entry(record)
            yield key, value, version
