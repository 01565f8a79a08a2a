"""The fence table: per slot, the newest commander term and slot epoch the db has seen.

Fences only rise. They rise from a saved slot map and from every grant that passes its MAC
check; a grant older than the fence in either term or epoch is refused (keyval.grants.
check_fence). Raised fences are remembered as pending until the caller has stored them.
"""

from __future__ import annotations

from collections.abc import Iterable

from keyval.db.records import MapRange, SlotFence
from keyval.grants import Grant, check_fence
from keyval.keys import NUM_SLOTS


class FenceTable:
    def __init__(self, stored: Iterable[SlotFence] = ()) -> None:
        self._terms = [0] * NUM_SLOTS
        self._epochs = [0] * NUM_SLOTS
        self._pending: set[int] = set()
        for fence in stored:
            self._terms[fence.slot] = fence.term
            self._epochs[fence.slot] = fence.epoch

    def get(self, slot: int) -> SlotFence:
        return SlotFence(slot, self._terms[slot], self._epochs[slot])

    def admit(self, grant: Grant, slot: int) -> int:
        """The grant's epoch for `slot`, raising the fence to it; Fenced if the grant is stale
        or does not cover the slot. The caller has verified the grant's MAC."""
        epoch = check_fence(grant, slot, self._terms[slot], self._epochs[slot])
        self._raise(slot, grant.term, epoch)
        return epoch

    def admit_range(self, grant: Grant, first: int, last: int) -> None:
        """`admit` for every slot of first..last, all or none: Fenced (naming the first stale
        or uncovered slot) before any fence rises. The caller has verified the grant's MAC."""
        epochs = [
            check_fence(grant, slot, self._terms[slot], self._epochs[slot])
            for slot in range(first, last + 1)
        ]
        for slot, epoch in zip(range(first, last + 1), epochs, strict=True):
            self._raise(slot, grant.term, epoch)

    def _raise(self, slot: int, term: int, epoch: int) -> None:
        if term > self._terms[slot] or epoch > self._epochs[slot]:
            self._terms[slot] = max(term, self._terms[slot])
            self._epochs[slot] = max(epoch, self._epochs[slot])
            self._pending.add(slot)

    def for_map(self, term: int, ranges: Iterable[MapRange]) -> list[SlotFence]:
        """The fences a map saved under `term` would set, where they rise (not applied yet)."""
        raised: list[SlotFence] = []
        for first, last, _drone, epoch in ranges:
            for slot in range(first, last + 1):
                if term > self._terms[slot] or epoch > self._epochs[slot]:
                    new_term = max(term, self._terms[slot])
                    raised.append(SlotFence(slot, new_term, max(epoch, self._epochs[slot])))
        return raised

    def apply(self, fences: Iterable[SlotFence]) -> None:
        """Apply fences that were stored together with what set them."""
        for fence in fences:
            self._terms[fence.slot] = max(fence.term, self._terms[fence.slot])
            self._epochs[fence.slot] = max(fence.epoch, self._epochs[fence.slot])

    def take_pending(self) -> list[SlotFence]:
        """Raised fences not yet stored; the caller stores them or hands them back."""
        pending = [self.get(slot) for slot in sorted(self._pending)]
        self._pending.clear()
        return pending

    def return_pending(self, fences: Iterable[SlotFence]) -> None:
        """Fences whose store failed: store them with the next transaction."""
        self._pending.update(fence.slot for fence in fences)

    def pending_count(self) -> int:
        return len(self._pending)
