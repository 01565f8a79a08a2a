"""The commander's node logic as a sans-I/O state machine: events and `now` in, instructions out.

Time is commander-monotonic seconds (float), passed in by the caller, never read here.

Two slot tables are kept. `working` is the map the commander wants; `saved` is the last map the
db has confirmed under this commander's term. Grants are computed from `saved` only, so no
grant ever uses a map that is not durable. When `working` differs, `tick` returns a `SaveMap`
(one in flight at a time); the daemon calls `map_saved` once the db confirms it.

Lease safety: for every drone the commander remembers until when the last grant it handed that
drone may still be honoured (`receive time + timing.commander_expiry_ms`). When a saved map
moves a slot away from a drone, the slot is blocked until that moment: the new owner's grants
leave it out until then. A failed drone is declared failed only once its lease is surely over,
so its slots are free at once.

Start-up, resume and returning drones (the choices, as the issue asks to document them):

- Fresh cluster (empty persisted map): nothing is granted until `expect_drones` drones have
  registered; then the 16384 slots are split evenly in contiguous ranges, epoch 1, saved, and
  only then granted. Later drones get a fair share moved to them (`rebalance`).
- Commander restart with a persisted map: the previous commander's grants may still be live,
  so each persisted owner is treated as holding a lease until `start + expiry`. Drones that
  re-register under a name that owns slots, within `RESUME_GRACE_MS` of the start, get their
  persisted slots back. A slot the drone reports still holding in memory (Register.held) at
  exactly the persisted epoch keeps that epoch: the same drone goes on serving what it has, no
  reseed (docs/design.md, "Continuity across terms", argues why that is safe). Every other slot
  gets its epoch bumped by one (so versions and fences move past anything from the previous
  term, and a drone that restarted reseeds). This is what a user restarting a whole cluster
  expects. Owners that do not come back within the grace are treated as failed: their slots
  are spread over the drones that did.
- While this commander runs, a drone that was declared failed and comes back is a new drone
  (a new incarnation, no slots by surprise); it only gets the fair share that rebalancing
  gives any newcomer, under new epochs.
- A name that is live cannot register again: a second process claiming it is refused.

Live moves (`move`; docs/design.md, "Live moves"): a `Migration` goes PREPARING (the target is
told `importing` in its heartbeat reply and long-polls with AwaitGrant) -> RELEASING (the
source is told `release`: it freezes the slot, drains its pending writes to the db, and sends
Released) -> the map moves the slot to the target under epoch + 1 and is saved; the source
promised not to serve the slot again, so the slot is not blocked for its lease, and the target
gets its grant in the answer to its long poll and reseeds the slot from the db. A migration is
dropped when either side fails; it becomes a plain handover (which waits for the source's lease)
when the target does not poll within MIGRATION_PREPARE_S or the source does not release within
MIGRATION_TIMEOUT_S.
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass, field
from typing import Any

from keyval.commander import placement
from keyval.commander.slotmap import NO_OWNER, GrantRange, MapRange, SlotTable, without_slots
from keyval.grants import NUM_SLOTS, check_ranges
from keyval.nodeconfig import ConfigError, split_address
from keyval.timing import HEARTBEAT_MS, LEASE_MS, RESUME_GRACE_MS, commander_expiry_ms
from wire.errors import BadRequest, NotFound, Unavailable

# Incarnations are term * INCARNATIONS_PER_TERM + a counter, so ids from a previous commander
# never match one this commander handed out.
INCARNATIONS_PER_TERM = 2**32

# A drone name is a principal name; principal names are short identifiers.
MAX_DRONE_NAME_CHARS = 128

# Registered drones, live or draining. Each costs a heartbeat per period; a thousand is far
# beyond a loopback or rack cluster and bounds the commander's memory against a flood.
MAX_DRONES = 1000


# A live move whose source has not released the slot this long after it was asked is
# abandoned (the slot stays where it was): many heartbeat periods, so only a stuck source hits it.
MIGRATION_TIMEOUT_S = 5.0

# A live move's target that has not long-polled (AwaitGrant) this long does not speak the
# live-move protocol (or is stuck): ten heartbeat periods, then the move becomes a plain handover.
MIGRATION_PREPARE_S = 1.0


class MovePhase(enum.Enum):
    PREPARING = "preparing"  # waiting for the target's AwaitGrant
    RELEASING = "releasing"  # the source is told to freeze, drain and release


@dataclass(slots=True)
class Migration:
    slot: int
    source: str
    target: str
    started_at: float
    phase: MovePhase = MovePhase.PREPARING


class Phase(enum.Enum):
    WAITING = "waiting"  # empty map: waiting for expect_drones to register
    RESUMING = "resuming"  # persisted map: waiting for its owners to come back
    RUNNING = "running"


@dataclass(frozen=True, slots=True)
class SaveMap:
    """Instruction: persist this map (DbSaveMap under the term), then call `map_saved`."""

    version: int
    ranges: list[MapRange]


@dataclass(frozen=True, slots=True)
class DroneFailed:
    """Instruction (informative): this drone's lease expired; it has been removed."""

    drone: str
    incarnation: int


Instruction = SaveMap | DroneFailed


@dataclass(slots=True)
class DroneRecord:
    name: str
    address: str
    incarnation: int
    capacity_keys: int  # 0: unknown
    last_heartbeat_at: float
    load: dict[str, Any] = field(default_factory=dict)
    draining: bool = False
    # What the drone said it holds loaded when it registered: slot -> epoch (for `_resume`).
    held: dict[int, int] = field(default_factory=dict)

    def free_capacity(self) -> float | None:
        if self.capacity_keys <= 0:
            return None
        keys = self.load.get("keys", 0)
        used = keys if type(keys) is int else 0
        return float(max(self.capacity_keys - used, 0))


class CommanderState:
    """Slot map, membership, failure detection and grants of one commander term."""

    def __init__(
        self,
        *,
        name: str,
        term: int,
        now: float,
        persisted_version: int = 0,
        persisted_ranges: list[MapRange] | None = None,
        expect_drones: int = 1,
        heartbeat_ms: int = HEARTBEAT_MS,
        lease_ms: int = LEASE_MS,
        resume_grace_ms: int = RESUME_GRACE_MS,
        inherited_lease_s: float | None = None,
    ) -> None:
        if term <= 0 or expect_drones <= 0:
            raise ValueError("term and expect_drones must be positive")
        self.name = name
        self.term = term
        self.heartbeat_ms = heartbeat_ms
        self.lease_ms = lease_ms
        self.expect_drones = expect_drones
        self.expiry_s = commander_expiry_ms(lease_ms) / 1000
        self.drones: dict[str, DroneRecord] = {}
        self.saved = SlotTable.from_ranges(persisted_ranges or [])
        self.saved_version = persisted_version
        self.working = self.saved.copy()
        self._saved_by_us = False  # grants wait for the first map saved under our term
        self._saving: tuple[int, SlotTable] | None = None
        self._dirty = False  # working differs from saved (or must be re-saved under our term)
        self._lease_end: dict[str, float] = {}  # drone -> until when its last grant may be used
        self._blocked_until: dict[int, float] = {}  # slot -> no grant to its owner before this
        self._grant_cache: dict[str, list[GrantRange]] | None = None
        self._ranges_cache: list[MapRange] | None = None
        self._incarnations = 0
        self._rebalance_pending = False
        self.migrations: dict[int, Migration] = {}  # slot -> live move in progress
        self._released: dict[int, str] = {}  # slot -> source that released it (no lease wait)
        self._persisted_owners = {owner for owner in self.saved.owners if owner != NO_OWNER}
        self.resume_kept = 0  # slots whose epoch the resume kept (their owner held them)
        # Some slot may have an owner that is not live (or drains): set by every event that can
        # orphan a slot, cleared once they are all spread. The tick then skips a 16384-slot scan
        # (on a loaded 2-core machine that scan every 20 ms starved the heartbeat handlers).
        self._orphans_possible = True
        if self._persisted_owners:
            self.phase = Phase.RESUMING
            self._resume_deadline = now + resume_grace_ms / 1000
            # The previous commander's grants: at most one expiry old when it stopped (a
            # restart), or, after an election, until its own lease on a majority lapsed
            # (election.inherited_lease_s).
            inherited_s = self.expiry_s if inherited_lease_s is None else inherited_lease_s
            for owner in self._persisted_owners:
                self._lease_end[owner] = now + inherited_s
        else:
            self.phase = Phase.WAITING
            self._resume_deadline = now

    # ------------------------------------------------------------ membership events

    def register(
        self,
        drone: str,
        address: str,
        capacity_keys: int,
        now: float,
        held: list[GrantRange] | None = None,
    ) -> DroneRecord:
        """A drone (already authenticated as `drone`) joins, holding `held` (ranges it still has
        loaded from an earlier term). Raises BadRequest if the name is live or the fields are
        bad; nothing changes then."""
        if not drone or len(drone) > MAX_DRONE_NAME_CHARS:
            raise BadRequest(f"drone name must be 1..{MAX_DRONE_NAME_CHARS} characters")
        try:
            split_address(address)
        except ConfigError as error:
            raise BadRequest(f"drone {drone!r}: {error}") from None
        if capacity_keys < 0:
            raise BadRequest("capacity_keys must be >= 0 (0: unknown)")
        held_epochs = _held_epochs(held or [])
        if drone in self.drones:
            raise BadRequest(
                f"drone {drone!r} is already live (incarnation "
                f"{self.drones[drone].incarnation}); a second process cannot take its name",
                detail={"drone": drone},
            )
        if len(self.drones) >= MAX_DRONES:
            raise Unavailable(f"the commander already tracks {MAX_DRONES} drones")
        self._incarnations += 1
        record = DroneRecord(
            name=drone,
            address=address,
            incarnation=self.term * INCARNATIONS_PER_TERM + self._incarnations,
            capacity_keys=capacity_keys,
            last_heartbeat_at=now,
            held=held_epochs if self.phase is Phase.RESUMING else {},
        )
        self.drones[drone] = record
        self._rebalance_pending = True
        return record

    def heartbeat(
        self, drone: str, incarnation: int, load: dict[str, Any], now: float
    ) -> list[GrantRange]:
        """Renew a drone's lease; return the ranges to grant it now (possibly empty).

        Raises NotFound for a drone or incarnation this commander does not know live (the
        drone must register again)."""
        record = self.drones.get(drone)
        if record is None or record.incarnation != incarnation:
            raise NotFound(
                f"drone {drone!r} incarnation {incarnation} is not registered here: register again",
                detail={"drone": drone},
            )
        record.last_heartbeat_at = now
        record.load = dict(load)
        ranges = self.grant_for(drone, now)
        if ranges:
            self._lease_end[drone] = now + self.expiry_s
        return ranges

    def renew_grant(self, drone: str, incarnation: int, now: float) -> list[GrantRange]:
        """The grant for a heartbeat received earlier and answered now (a held reply): what
        `drone` may hold at `now`. It is not news that the drone lives (that was its receive);
        the lease it was granted is counted until `now + expiry`, later than the drone's own
        count (from its send), so the slot-blocking stays safe. NotFound if the drone is gone."""
        self._check_incarnation(drone, incarnation)
        ranges = self.grant_for(drone, now)
        if ranges:
            self._lease_end[drone] = max(self._lease_end.get(drone, -math.inf), now + self.expiry_s)
        return ranges

    def failure_near(self, now: float, within_s: float) -> bool:
        """Will some drone's lease surely end within `within_s` unless it is heard from?"""
        return any(
            now + within_s >= record.last_heartbeat_at + self.expiry_s
            for record in self.drones.values()
        )

    def moves_for(self, drone: str) -> tuple[list[int], list[int]]:
        """(slots `drone` must release, slots coming to it) for its heartbeat reply."""
        release = [
            m.slot
            for m in self.migrations.values()
            if m.source == drone and m.phase is MovePhase.RELEASING
        ]
        importing = [m.slot for m in self.migrations.values() if m.target == drone]
        return sorted(release), sorted(importing)

    def target_waiting(self, drone: str, incarnation: int, slots: list[int]) -> list[int]:
        """The target of live moves long-polls: its moves may now ask the source to release.

        Returns the slots of `slots` still moving to `drone`."""
        self._check_incarnation(drone, incarnation)
        moving = []
        for slot in slots:
            migration = self.migrations.get(slot)
            if migration is not None and migration.target == drone:
                migration.phase = MovePhase.RELEASING
                moving.append(slot)
        return moving

    def released(self, drone: str, incarnation: int, slot: int, epoch: int, now: float) -> int:
        """The source froze `slot` and drained its writes: give it to the target (epoch + 1).

        Returns the map version that carries it. Raises BadRequest (nothing changes) unless
        `drone` is this slot's releasing source under `epoch`."""
        self._check_incarnation(drone, incarnation)
        migration = self.migrations.get(slot)
        if (
            migration is None
            or migration.source != drone
            or migration.phase is not MovePhase.RELEASING
        ):
            raise BadRequest(
                f"slot {slot} is not being released by {drone!r}", detail={"slot": slot}
            )
        if self.saved.owners[slot] != drone or self.saved.epochs[slot] != epoch:
            raise BadRequest(
                f"slot {slot} is not held by {drone!r} under epoch {epoch}", detail={"slot": slot}
            )
        del self.migrations[slot]
        self._released[slot] = drone
        self._assign(slot, migration.target)
        return self.next_version()

    def _check_incarnation(self, drone: str, incarnation: int) -> DroneRecord:
        record = self.drones.get(drone)
        if record is None or record.incarnation != incarnation:
            raise NotFound(
                f"drone {drone!r} incarnation {incarnation} is not registered here: register again",
                detail={"drone": drone},
            )
        return record

    def grant_for(self, drone: str, now: float) -> list[GrantRange]:
        """What `drone` may hold now: its slots in the saved map, minus slots still blocked by
        a previous owner's lease. Empty until a map was saved under this term."""
        if not self._saved_by_us:
            return []
        if self._grant_cache is None:
            self._grant_cache = self.saved.grant_ranges()
        ranges = self._grant_cache.get(drone, [])
        owners = self.saved.owners
        blocked = {
            slot
            for slot, until in self._blocked_until.items()
            if until > now and owners[slot] == drone
        }
        granted = without_slots(ranges, blocked)
        self._check_grant_safe(drone, granted, now)
        return granted

    def _check_grant_safe(self, drone: str, granted: list[GrantRange], now: float) -> None:
        """Crash rather than hand out a grant that breaks the safety rules."""
        if not self._saved_by_us:
            raise RuntimeError("invariant: grant computed from a map not saved under our term")
        for first, last, epoch in granted:
            for slot in (first, last):
                if self.saved.owners[slot] != drone or self.saved.epochs[slot] != epoch:
                    raise RuntimeError(f"invariant: grant of slot {slot} disagrees with saved map")
        firsts = [first for first, _, _ in granted]
        for slot, until in self._blocked_until.items():
            index = bisect.bisect_right(firsts, slot) - 1  # the range that could hold `slot`
            if until > now and index >= 0 and slot <= granted[index][1]:
                raise RuntimeError(f"invariant: slot {slot} granted before the old lease ended")

    # ------------------------------------------------------------ operator events

    def drain(self, drone: str, now: float) -> int:
        """Move every slot off `drone` (it stays registered, holding nothing). Returns the map
        version that carries the change. Refuses an unknown drone or the last eligible one."""
        record = self._live(drone)
        others = [r for r in self.drones.values() if r.name != drone and not r.draining]
        if not others:
            raise BadRequest(f"cannot drain {drone!r}: no other drone could take its slots")
        if self.phase is not Phase.RUNNING:
            raise Unavailable("the slot map is not assigned yet", detail={"retry_after_ms": 100})
        record.draining = True
        self._orphans_possible = True
        self._plan(now)
        return self.next_version()

    def move(self, slot: int, drone: str, now: float, *, live: bool = True) -> int:
        """Move `slot` to `drone`: live (see the module docstring), or with `live=False` a
        plain handover (the new owner gets it once the old owner's lease surely ended). A slot
        with no live owner is assigned at once. Returns the map version of the change."""
        if not 0 <= slot < NUM_SLOTS:
            raise BadRequest(f"slot {slot} is outside 0..{NUM_SLOTS - 1}")
        record = self._live(drone)
        if record.draining:
            raise BadRequest(f"drone {drone!r} is draining; it takes no slots")
        if self.phase is not Phase.RUNNING:
            raise Unavailable("the slot map is not assigned yet", detail={"retry_after_ms": 100})
        if slot in self.migrations:
            raise BadRequest(
                f"slot {slot} is already moving to {self.migrations[slot].target!r}",
                detail={"slot": slot},
            )
        source = self.working.owners[slot]
        if source == drone:
            return self.next_version()
        if live and source in self.drones and self.saved.owners[slot] == source:
            self.migrations[slot] = Migration(slot, source, drone, now)
            return self.next_version() + 1
        self._assign(slot, drone)
        return self.next_version()

    def rebalance(self, now: float) -> int:
        """Ask for a fair share per live drone at the next tick; returns the version."""
        if self.phase is not Phase.RUNNING:
            raise Unavailable("the slot map is not assigned yet", detail={"retry_after_ms": 100})
        self._rebalance_pending = True
        self._plan(now)
        return self.next_version()

    def _live(self, drone: str) -> DroneRecord:
        record = self.drones.get(drone)
        if record is None:
            raise NotFound(f"no live drone named {drone!r}", detail={"drone": drone})
        return record

    # ------------------------------------------------------------ time and the db

    def tick(self, now: float, *, detect_failures: bool = True) -> list[Instruction]:
        """Detect failures, plan the map, and ask for a save when the map changed.

        `detect_failures=False`: the caller's own loop was just stalled, so heartbeats may sit
        unread; nobody is declared failed this tick (later is always safe: see the module)."""
        instructions: list[Instruction] = []
        for record in list(self.drones.values()):
            if detect_failures and now >= record.last_heartbeat_at + self.expiry_s:
                del self.drones[record.name]
                self._orphans_possible = True
                instructions.append(DroneFailed(record.name, record.incarnation))
        for slot, migration in list(self.migrations.items()):
            if migration.source not in self.drones or migration.target not in self.drones:
                del self.migrations[slot]
                continue
            limit_s = MIGRATION_PREPARE_S if migration.phase is MovePhase.PREPARING else 0.0
            if now >= migration.started_at + (limit_s or MIGRATION_TIMEOUT_S):
                # A target that never long-polls (or a source that never releases): fall back
                # to a plain handover, which waits for the source's lease and is always safe.
                del self.migrations[slot]
                self._assign(slot, migration.target)
        for slot in [s for s, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[slot]
        self._plan(now)
        if self._dirty and self._saving is None:
            version = self.saved_version + 1
            snapshot = self.working.copy()
            self._saving = (version, snapshot)
            instructions.append(SaveMap(version, snapshot.ranges()))
        return instructions

    def map_saved(self, version: int, now: float) -> None:
        """The db confirmed the SaveMap of `version`: it becomes the map grants come from."""
        if self._saving is None or self._saving[0] != version:
            raise RuntimeError(f"map_saved({version}) without that save in flight")
        _, table = self._saving
        self._saving = None
        for slot in range(NUM_SLOTS):
            old = self.saved.owners[slot]
            if old != NO_OWNER and old != table.owners[slot]:
                if self._released.get(slot) == old:
                    continue  # the old owner released it: it serves it no more
                until = self._lease_end.get(old, -math.inf)
                if until > now:
                    self._blocked_until[slot] = max(self._blocked_until.get(slot, until), until)
        for slot in [s for s, old in self._released.items() if table.owners[s] != old]:
            del self._released[slot]
        self.saved = table
        self.saved_version = version
        self._saved_by_us = True
        self._grant_cache = None
        self._ranges_cache = None
        self._dirty = self._differs(self.working, self.saved)

    def save_failed(self, version: int) -> None:
        """The SaveMap of `version` failed; the next tick asks again."""
        if self._saving is not None and self._saving[0] == version:
            self._saving = None

    def next_version(self) -> int:
        """The map version that will carry the working map's current changes."""
        if not self._dirty:
            return self.saved_version
        if self._saving is not None and not self._differs(self.working, self._saving[1]):
            return self._saving[0]
        return self.saved_version + (2 if self._saving is not None else 1)

    # ------------------------------------------------------------ planning

    def _plan(self, now: float) -> None:
        if self.phase is Phase.WAITING:
            if len(self._eligible()) >= self.expect_drones:
                self._initial_assignment()
                self.phase = Phase.RUNNING
                self._rebalance_pending = False
            return
        if self.phase is Phase.RESUMING:
            if now < self._resume_deadline and not self._persisted_owners <= self.drones.keys():
                return
            self._resume()
            self.phase = Phase.RUNNING
        self._spread_orphans()
        if self._rebalance_pending:
            self._rebalance_pending = False
            slots_by_drone: dict[str, list[int]] = {name: [] for name in self._eligible()}
            for slot, owner in enumerate(self.working.owners):
                if owner in slots_by_drone:
                    slots_by_drone[owner].append(slot)
            for slot, owner in placement.rebalance(slots_by_drone).items():
                self._assign(slot, owner)

    def _eligible(self) -> list[str]:
        return sorted(name for name, record in self.drones.items() if not record.draining)

    def _initial_assignment(self) -> None:
        for name, (first, last) in placement.even_split(self._eligible()).items():
            for slot in range(first, last + 1):
                self._assign(slot, name)

    def _resume(self) -> None:
        """Keep the persisted owners that came back, and save under our term even if nothing
        else changed (grants need a map saved by us). A slot its owner still holds at exactly
        the persisted epoch keeps it (no reseed); every other slot's epoch is bumped."""
        self.resume_kept = 0
        for slot, owner in enumerate(self.working.owners):
            record = self.drones.get(owner)
            if record is None:
                continue
            if record.held.get(slot) == self.working.epochs[slot]:
                self.resume_kept += 1
            else:
                self.working.epochs[slot] += 1
        for record in self.drones.values():
            record.held = {}  # only a resume reads it; no need to keep 16384 entries around
        self._dirty = True

    def _spread_orphans(self) -> None:
        if not self._orphans_possible:
            return
        eligible = self._eligible()
        if not eligible:
            return
        orphans = [
            slot
            for slot, owner in enumerate(self.working.owners)
            if owner not in self.drones or self.drones[owner].draining
        ]
        if not orphans:
            self._orphans_possible = False
            return
        counts = dict.fromkeys(eligible, 0)
        for owner in self.working.owners:
            if owner in counts:
                counts[owner] += 1
        capacities = {name: self.drones[name].free_capacity() for name in eligible}
        free: dict[str, float] | None = None
        if all(value is not None for value in capacities.values()):
            free = {name: value or 0.0 for name, value in capacities.items()}
        quotas = placement.spread_quotas(len(orphans), counts, free)
        placed = placement.spread(orphans, quotas)
        for slot, owner in placed.items():
            self._assign(slot, owner)
        self._orphans_possible = len(placed) < len(orphans)

    def _assign(self, slot: int, drone: str) -> None:
        if self.working.owners[slot] == drone:
            return
        self.working.assign(slot, drone)
        self._dirty = True

    @staticmethod
    def _differs(left: SlotTable, right: SlotTable) -> bool:
        return left.owners != right.owners or left.epochs != right.epochs

    # ------------------------------------------------------------ queries

    @property
    def granting(self) -> bool:
        """A map was saved under our term: grants (possibly empty) are real from now on."""
        return self._saved_by_us

    def map_ranges(self) -> list[MapRange]:
        """The saved map as ranges (what clients may rely on)."""
        if self._ranges_cache is None:
            self._ranges_cache = self.saved.ranges()
        return self._ranges_cache

    def addresses(self) -> dict[str, str]:
        return {name: record.address for name, record in sorted(self.drones.items())}


def _held_epochs(held: list[GrantRange]) -> dict[int, int]:
    """slot -> epoch of a drone's reported ranges; BadRequest unless sorted, disjoint, in range."""
    try:
        check_ranges(tuple(held))
    except BadRequest as error:
        raise BadRequest(f"held: {error.message}") from None
    return {slot: epoch for first, last, epoch in held for slot in range(first, last + 1)}
