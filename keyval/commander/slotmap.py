"""The slot table: for each of the 16384 slots its owner (a drone name, "" for none) and epoch.

Stored as two flat lists indexed by slot, so a change is O(1); converted to the compressed
range form `(first, last, drone, epoch)` that the db persists and clients cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from keyval.grants import NUM_SLOTS
from wire.errors import BadRequest

NO_OWNER = ""

MapRange = tuple[int, int, str, int]  # (first_slot, last_slot, drone, epoch)
GrantRange = tuple[int, int, int]  # (first_slot, last_slot, epoch)


class SlotTable:
    """Owner and epoch per slot. Epochs only rise: `assign` bumps the epoch of a moved slot."""

    __slots__ = ("epochs", "owners")

    def __init__(self) -> None:
        self.owners: list[str] = [NO_OWNER] * NUM_SLOTS
        self.epochs: list[int] = [0] * NUM_SLOTS

    @classmethod
    def from_ranges(cls, ranges: Iterable[MapRange]) -> SlotTable:
        """Build from persisted ranges; raise BadRequest if they overlap or leave 0..16383."""
        table = cls()
        previous_last = -1
        for first, last, drone, epoch in sorted(ranges):
            if not (previous_last < first <= last < NUM_SLOTS) or epoch < 0:
                raise BadRequest(f"bad persisted slot range ({first}, {last}, {drone!r}, {epoch})")
            for slot in range(first, last + 1):
                table.owners[slot] = drone
                table.epochs[slot] = epoch
            previous_last = last
        return table

    def copy(self) -> SlotTable:
        table = SlotTable()
        table.owners = list(self.owners)
        table.epochs = list(self.epochs)
        return table

    def is_empty(self) -> bool:
        return all(owner == NO_OWNER for owner in self.owners)

    def assign(self, slot: int, drone: str) -> None:
        """Give `slot` to `drone` under a new epoch (no-op when it already owns it)."""
        if self.owners[slot] == drone:
            return
        self.owners[slot] = drone
        self.epochs[slot] += 1

    def slots_of(self, drone: str) -> list[int]:
        return [slot for slot, owner in enumerate(self.owners) if owner == drone]

    def counts(self) -> dict[str, int]:
        """Number of slots per owner ("" counts the unowned)."""
        result: dict[str, int] = {}
        for owner in self.owners:
            result[owner] = result.get(owner, 0) + 1
        return result

    def ranges(self) -> list[MapRange]:
        """Maximal runs of slots with the same owner and epoch; unowned slots are left out."""
        return [run for run in _runs(self.owners, self.epochs) if run[2] != NO_OWNER]

    def grant_ranges(self) -> dict[str, list[GrantRange]]:
        """Per owner, its ranges as a grant lists them (sorted, disjoint)."""
        result: dict[str, list[GrantRange]] = {}
        for first, last, drone, epoch in self.ranges():
            result.setdefault(drone, []).append((first, last, epoch))
        return result


def _runs(owners: list[str], epochs: list[int]) -> Iterator[MapRange]:
    start = 0
    for slot in range(1, NUM_SLOTS + 1):
        if slot == NUM_SLOTS or owners[slot] != owners[start] or epochs[slot] != epochs[start]:
            yield (start, slot - 1, owners[start], epochs[start])
            start = slot


def without_slots(ranges: list[GrantRange], excluded: set[int]) -> list[GrantRange]:
    """`ranges` with the slots in `excluded` cut out (ranges split around them)."""
    if not excluded:
        return ranges
    result: list[GrantRange] = []
    for first, last, epoch in ranges:
        start = first
        for slot in sorted(s for s in excluded if first <= s <= last):
            if slot > start:
                result.append((start, slot - 1, epoch))
            start = slot + 1
        if start <= last:
            result.append((start, last, epoch))
    return result
