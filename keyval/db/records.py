"""Plain records the db layers hand each other. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# Result of one op as DbBatchResult carries it: ("ok", [versions]) or (error code, message).
OpResult = tuple[str, Any]
RESULT_OK = "ok"

# 2PC decisions (the first one recorded wins).
DECISION_COMMIT = "commit"
DECISION_ABORT = "abort"
DECISIONS = (DECISION_COMMIT, DECISION_ABORT)

# A slot map as stored: (first_slot, last_slot, drone, epoch) ranges.
MapRange = tuple[int, int, str, int]


class StoredWrite(NamedTuple):
    """One key's new state. `value` is CBOR bytes, empty for a delete.

    A tuple (the write path makes one per write: a tuple costs a third of a frozen dataclass
    to build), in the column order of the SQL upsert, so SQLite stores it as it is."""

    slot: int
    key: bytes
    value: bytes
    deleted: bool
    version: int


class PreparedOp(NamedTuple):
    """One client operation that passed validation and fencing: written all together."""

    op_id: bytes
    writes: tuple[StoredWrite, ...]
    versions: tuple[int, ...]  # the result the op answers with


@dataclass(frozen=True, slots=True)
class SlotFence:
    """The newest commander term and slot epoch the db has seen for `slot`."""

    slot: int
    term: int
    epoch: int


@dataclass(frozen=True, slots=True)
class TermRecord:
    """The registered commander term; term 0 and commander "" before any registration."""

    term: int
    commander: str


@dataclass(frozen=True, slots=True)
class MapRecord:
    term: int
    version: int
    ranges: tuple[MapRange, ...]


@dataclass(frozen=True, slots=True)
class SaveMapOutcome:
    saved: bool
    current_term: TermRecord
    stored_version: int  # the map version in the store after the call


@dataclass(frozen=True, slots=True)
class SlotItem:
    key: bytes
    value: bytes  # CBOR
    version: int


@dataclass(frozen=True, slots=True)
class SlotRange:
    """One page of a slot-range read, as columns (a failover reads 100k keys per drone: a
    row object per key cost more than the query). `runs` is (slot, item count) for each slot
    with items on the page, in slot order; keys, values (CBOR) and versions are the items in
    (slot, key) order; `done`: none are left in the range."""

    runs: list[tuple[int, int]]
    keys: list[bytes]
    values: list[bytes]
    versions: list[int]
    done: bool

    @property
    def last(self) -> tuple[int, bytes] | None:
        """The (slot, key) of the page's last item, None for an empty page."""
        return (self.runs[-1][0], self.keys[-1]) if self.runs else None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A 2PC decision to record (first one per txid wins) and, for commit, the writes of every
    participant, stored in the same transaction only if this decision is the one that stands."""

    txid: bytes
    decision: str
    writes: tuple[StoredWrite, ...]
