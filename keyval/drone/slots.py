"""The drone's slot table: which slots it holds, with which epoch, loaded or not, and its lease.

A plain state machine, no I/O and no clock: the caller passes `now` (monotonic seconds).
`apply_grant` takes the grant from a HeartbeatReply and returns instructions (reseed these
slots, drop those); `check_serving` answers whether a request for a slot may be served now.

Lease rule (docs: datapath-shared): a grant's lease runs from the moment the drone SENT the
heartbeat it answered, for `keyval.timing.drone_lease_ms(lease_ms)` on the drone's own clock. The
commander waits `lease_ms` after it last heard from the drone (keyval.timing.commander_expiry_ms),
so the drone always stops serving first.
"""

from __future__ import annotations

import dataclasses
import enum

from keyval.grants import Grant, check_ranges
from keyval.keys import NUM_SLOTS
from keyval.timing import drone_lease_ms
from wire.errors import BadRequest, Moved, Unauthorized, Unavailable

# What a client is told to wait before retrying a slot that is loading or a lapsed lease: about
# one heartbeat, the time it takes for either to change.
DEFAULT_RETRY_AFTER_MS = 100

# What a client is told to wait for a slot frozen by a live move: the handover takes a few
# milliseconds (drain, one map save), then the slot answers MOVED to its new owner.
RELEASING_RETRY_AFTER_MS = 5


class SlotStatus(enum.Enum):
    LOADING = "loading"  # granted, being streamed from the db
    READY = "ready"  # granted and loaded: served while the lease is valid
    RELEASING = "releasing"  # a live move's source: frozen while its writes drain


@dataclasses.dataclass(frozen=True, slots=True)
class Reseed:
    """Stream `slot` from the db (with the current grant) before serving it."""

    slot: int
    epoch: int


@dataclasses.dataclass(frozen=True, slots=True)
class Drop:
    """Forget `slot`'s data: it is no longer granted (or comes back under a new epoch)."""

    slot: int


Instruction = Reseed | Drop


@dataclasses.dataclass(slots=True)
class _Held:
    epoch: int
    status: SlotStatus


class SlotTable:
    """Slots held under the current grant, and the lease that lets the drone serve them."""

    def __init__(self, drone: str, *, retry_after_ms: int = DEFAULT_RETRY_AFTER_MS) -> None:
        self.drone = drone
        self.retry_after_ms = retry_after_ms
        self.grant: Grant | None = None
        self.lease_expires_at = float("-inf")  # monotonic seconds; no lease yet
        self._held: dict[int, _Held] = {}
        self._last_epoch: dict[int, int] = {}  # slot -> newest epoch seen, for MOVED detail
        self._owners: dict[int, tuple[str, str]] = {}  # slot -> (owner, address) hints
        self._released: dict[int, int] = {}  # slot -> epoch handed over by a live move
        # ready_ranges() runs on every heartbeat; over thousands of held slots it cost a few ms
        # each time on a loaded machine. Recomputed only after a held slot changed.
        self._ready_cache: list[tuple[int, int, int]] | None = None

    # ------------------------------------------------------------ stimuli

    def apply_grant(self, grant: Grant, *, sent_at: float, lease_ms: int) -> list[Instruction]:
        """Take `grant` (answer to a heartbeat sent at `sent_at`) as the whole set of held slots.

        Renews the lease; returns Drop for slots no longer granted (or re-granted under another
        epoch) and Reseed for slots newly granted. Raises Unauthorized for another drone's
        grant and BadRequest for malformed ranges; the held state is then unchanged."""
        if grant.drone != self.drone:
            raise Unauthorized(f"grant names drone {grant.drone!r}, this is {self.drone!r}")
        check_ranges(grant.ranges)
        if lease_ms <= 0:
            raise BadRequest(f"lease_ms must be positive, got {lease_ms}")
        if self.grant is not None and grant.term < self.grant.term:
            return []  # a late reply from a deposed commander: neither renews nor changes
        lease_s = drone_lease_ms(lease_ms) / 1000
        if (
            self.grant is not None
            and grant.term == self.grant.term
            and grant.issued_ms < self.grant.issued_ms
        ):
            # Overtaken by a newer grant (a heartbeat and a live move's long poll race): it
            # still renews the lease it was issued with, but changes no slot.
            self.lease_expires_at = max(self.lease_expires_at, sent_at + lease_s)
            return []
        instructions: list[Instruction] = []
        if self.grant is None or grant.ranges != self.grant.ranges:
            self._ready_cache = None
            instructions = self._diff(grant)
        self.grant = grant
        self.lease_expires_at = max(self.lease_expires_at, sent_at + lease_s)
        return instructions

    def _diff(self, grant: Grant) -> list[Instruction]:
        wanted = {
            slot: epoch for first, last, epoch in grant.ranges for slot in range(first, last + 1)
        }
        instructions: list[Instruction] = []
        for slot in sorted(self._held):
            if wanted.get(slot) != self._held[slot].epoch:
                del self._held[slot]
                instructions.append(Drop(slot))
        for slot in [s for s, epoch in self._released.items() if wanted.get(s) != epoch]:
            del self._released[slot]  # the grant caught up with the handover
        for slot, epoch in sorted(wanted.items()):
            self._last_epoch[slot] = max(epoch, self._last_epoch.get(slot, 0))
            if self._released.get(slot) == epoch:
                continue  # handed over under this epoch: never served again
            if slot not in self._held:
                self._held[slot] = _Held(epoch, SlotStatus.LOADING)
                instructions.append(Reseed(slot, epoch))
        return instructions

    def mark_loaded(self, slot: int, epoch: int) -> bool:
        """A reseed of (slot, epoch) finished. False if the slot was dropped or re-epoched
        meanwhile (the caller then discards what it loaded)."""
        held = self._held.get(slot)
        if held is None or held.epoch != epoch:
            return False
        held.status = SlotStatus.READY
        self._ready_cache = None
        return True

    def begin_release(self, slot: int) -> int | None:
        """A live move's source: freeze a loaded slot. Its epoch, or None if not READY."""
        held = self._held.get(slot)
        if held is None or held.status is not SlotStatus.READY:
            return None
        held.status = SlotStatus.RELEASING
        self._ready_cache = None
        return held.epoch

    def cancel_release(self, slot: int, epoch: int) -> None:
        """The commander refused the release: serve the slot again."""
        held = self._held.get(slot)
        if held is not None and held.epoch == epoch and held.status is SlotStatus.RELEASING:
            held.status = SlotStatus.READY
            self._ready_cache = None

    def finish_release(self, slot: int, epoch: int) -> bool:
        """The slot under `epoch` is handed over: never serve it again under that epoch.
        True if it was held (the caller drops its data)."""
        self._released[slot] = epoch
        held = self._held.get(slot)
        if held is None or held.epoch != epoch:
            return False
        del self._held[slot]
        self._ready_cache = None
        return True

    def note_owner(self, slot: int, owner: str, address: str, epoch: int) -> None:
        """Remember who the commander's map says owns `slot` (for MOVED replies)."""
        self._owners[slot] = (owner, address)
        self._last_epoch[slot] = max(epoch, self._last_epoch.get(slot, 0))

    # ------------------------------------------------------------ questions

    def lease_valid(self, now: float) -> bool:
        return now < self.lease_expires_at

    def epoch_of(self, slot: int) -> int | None:
        held = self._held.get(slot)
        return None if held is None else held.epoch

    def status_of(self, slot: int) -> SlotStatus | None:
        held = self._held.get(slot)
        return None if held is None else held.status

    def check_held(self, slot: int) -> int:
        """The slot's epoch if it is granted to this drone (loaded or not), else raise Moved."""
        if not 0 <= slot < NUM_SLOTS:
            raise BadRequest(f"slot {slot} out of range 0..{NUM_SLOTS - 1}")
        held = self._held.get(slot)
        if held is None:
            owner, address = self._owners.get(slot, ("", ""))
            raise Moved(
                f"slot {slot} is not held by {self.drone}",
                detail={
                    "slot": slot,
                    "epoch": self._last_epoch.get(slot, 0),
                    "owner": owner,
                    "address": address,
                },
            )
        return held.epoch

    def check_serving(self, slot: int, now: float) -> int:
        """The slot's epoch if a request for it may be served at `now`.

        Raises Moved (not held), Unavailable with retry_after_ms (lease lapsed, or loading)."""
        epoch = self.check_held(slot)
        if not self.lease_valid(now):
            raise Unavailable(
                f"{self.drone}'s lease has lapsed; waiting for the commander to renew it",
                detail={"retry_after_ms": self.retry_after_ms, "slot": slot},
            )
        if self._held[slot].status is SlotStatus.LOADING:
            raise Unavailable(
                f"slot {slot} is still loading on {self.drone}",
                detail={"retry_after_ms": self.retry_after_ms, "slot": slot},
            )
        if self._held[slot].status is SlotStatus.RELEASING:
            raise Unavailable(
                f"slot {slot} is moving away from {self.drone}",
                detail={"retry_after_ms": RELEASING_RETRY_AFTER_MS, "slot": slot},
            )
        return epoch

    def ready_ranges(self) -> list[tuple[int, int, int]]:
        """Loaded slots as (first, last, epoch) ranges, for the heartbeat (a fresh list)."""
        if self._ready_cache is not None:
            return list(self._ready_cache)
        ranges: list[tuple[int, int, int]] = []
        for slot in sorted(self._held):
            held = self._held[slot]
            if held.status is not SlotStatus.READY:
                continue
            if ranges and ranges[-1][1] == slot - 1 and ranges[-1][2] == held.epoch:
                ranges[-1] = (ranges[-1][0], slot, held.epoch)
            else:
                ranges.append((slot, slot, held.epoch))
        self._ready_cache = ranges
        return list(ranges)

    def held_slots(self) -> list[int]:
        return sorted(self._held)

    def serving_slots(self, now: float) -> list[int]:
        """Slots loaded and servable at `now` (empty while the lease has lapsed)."""
        if not self.lease_valid(now):
            return []
        return [s for s in sorted(self._held) if self._held[s].status is SlotStatus.READY]
