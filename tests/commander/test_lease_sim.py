"""Lease-safety simulation: the real commander state machine and the real drone slot tables,
driven in one loop with simulated time, message delay, drifting drone clocks, kills and
partitions. The db is instant and always up; reseeds finish at once.

After each step it checks directly that no slot is served by two drones at once (each drone's
`serving_slots` on its own clock), and at the end that every slot has exactly one owner that
serves it. This is the sans-I/O part of the issue's simulation list; the whole-process
simulation over keyval/sim/network.py is still to be built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keyval.commander.state import CommanderState, SaveMap
from keyval.drone.slots import Reseed, SlotTable
from keyval.grants import NUM_SLOTS, Grant
from keyval.timing import MAX_CLOCK_DRIFT
from wire.errors import BadRequest, NotFound

STEP_S = 0.01
DELAY_S = 0.005  # one-way message delay
HEARTBEAT_S = 0.1
LEASE_MS = 600


@dataclass
class SimDrone:
    name: str
    clock_rate: float  # drone clock seconds per commander second (drift)
    table: SlotTable = field(init=False)
    incarnation: int | None = None
    reseeds: int = 0  # slots this drone loaded from the db
    next_beat: float = 0.0
    alive: bool = True
    cut_off: bool = False  # partitioned from the commander (clients still reach it)

    def __post_init__(self) -> None:
        self.table = SlotTable(self.name)

    def now(self, t: float) -> float:
        return t * self.clock_rate


class Sim:
    def __init__(self, rates: list[float]) -> None:
        self.t = 0.0
        self.term = 1
        self.commander = CommanderState(
            name="commander-1", term=1, now=0.0, expect_drones=len(rates), lease_ms=LEASE_MS
        )
        self.drones = [SimDrone(f"drone-{i + 1}", rate) for i, rate in enumerate(rates)]
        self.overlaps: list[tuple[float, str, str, int]] = []

    def restart_commander(self) -> None:
        """A new commander term resumes the saved map (a restart, or an election won)."""
        self.term += 1
        self.commander = CommanderState(
            name="commander-1",
            term=self.term,
            now=self.t,
            persisted_version=self.commander.saved_version,
            persisted_ranges=self.commander.saved.ranges(),
            expect_drones=len(self.drones),
            lease_ms=LEASE_MS,
        )
        for drone in self.drones:
            drone.incarnation = None  # the new term knows nobody: every drone registers

    def step(self) -> None:
        self.t += STEP_S
        for instruction in self.commander.tick(self.t):
            if isinstance(instruction, SaveMap):
                self.commander.map_saved(instruction.version, self.t)
        for drone in self.drones:
            if drone.alive and self.t >= drone.next_beat:
                drone.next_beat = self.t + HEARTBEAT_S
                self._beat(drone)
        self._check()

    def _beat(self, drone: SimDrone) -> None:
        sent_at = drone.now(self.t)
        if drone.cut_off:
            return
        arrive = self.t + DELAY_S
        if drone.incarnation is None:
            try:
                held = drone.table.ready_ranges()
                record = self.commander.register(drone.name, "127.0.0.1:1", 0, arrive, held)
            except BadRequest:  # a live name: the old incarnation must expire first
                return
            drone.incarnation = record.incarnation
            return
        try:
            ranges = self.commander.heartbeat(drone.name, drone.incarnation, {}, arrive)
        except NotFound:
            drone.incarnation = None
            drone.table = SlotTable(drone.name)  # re-registers as a new drone
            return
        if not self.commander.granting:
            return  # a provisional reply: the drone keeps what it holds, renews nothing
        grant = Grant(drone.name, self.term, tuple(ranges), int(arrive * 1000))
        for instruction in drone.table.apply_grant(grant, sent_at=sent_at, lease_ms=LEASE_MS):
            if isinstance(instruction, Reseed):
                drone.reseeds += 1
                drone.table.mark_loaded(instruction.slot, instruction.epoch)

    def _check(self) -> None:
        serving = [
            (d.name, set(d.table.serving_slots(d.now(self.t)))) for d in self.drones if d.alive
        ]
        for index, (name, slots) in enumerate(serving):
            for other, other_slots in serving[index + 1 :]:
                both = slots & other_slots
                if both:
                    self.overlaps.append((self.t, name, other, min(both)))

    def run_until(self, t: float) -> None:
        while self.t < t:
            self.step()

    def assert_settled(self) -> None:
        assert self.overlaps == []
        owners = self.commander.saved.owners
        live = {d.name for d in self.drones if d.alive and d.incarnation is not None}
        assert set(owners) <= live
        served: dict[int, str] = {}
        for drone in self.drones:
            if drone.alive:
                for slot in drone.table.serving_slots(drone.now(self.t)):
                    served[slot] = drone.name
        assert len(served) == NUM_SLOTS
        assert all(served[slot] == owners[slot] for slot in range(NUM_SLOTS))


# Drone clocks up to 4 % slow or fast against the commander's (MAX_CLOCK_DRIFT is 5 %).
RATES = [0.96, 1.0, 1.04]


def test_kill_a_drone_its_slots_are_served_by_the_others_never_twice() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    sim.assert_settled()
    sim.drones[1].alive = False
    sim.run_until(2.0)
    sim.assert_settled()
    assert "drone-2" not in sim.commander.saved.owners


def test_partitioned_drone_stops_serving_before_others_take_over() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    sim.drones[0].cut_off = True  # the slowest clock: the hardest case for its lease
    sim.run_until(2.5)
    assert sim.overlaps == []
    assert sim.drones[0].table.serving_slots(sim.drones[0].now(sim.t)) == []
    sim.drones[0].cut_off = False  # it comes back as a new drone and gets a fair share
    sim.run_until(4.0)
    sim.assert_settled()


def test_a_drone_clock_slow_by_the_whole_drift_bound_still_stops_first() -> None:
    """The commander waits exactly the lease after a receive (timing.commander_expiry_ms):
    enough even for a drone whose clock runs MAX_CLOCK_DRIFT slow, the edge of the argument."""
    sim = Sim([1 - MAX_CLOCK_DRIFT, 1.0, 1 + MAX_CLOCK_DRIFT])
    sim.run_until(1.0)
    sim.assert_settled()
    sim.drones[0].cut_off = True
    sim.run_until(2.5)
    assert sim.overlaps == []
    assert "drone-1" not in sim.commander.saved.owners
    sim.drones[0].cut_off = False
    sim.run_until(4.0)
    sim.assert_settled()


def test_flapping_drone_never_causes_double_serving() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    for _ in range(6):
        sim.drones[2].cut_off = True
        sim.run_until(sim.t + 0.4)
        sim.drones[2].cut_off = False
        sim.run_until(sim.t + 0.5)
    sim.run_until(sim.t + 2.0)
    sim.assert_settled()


def test_all_drones_restart_and_the_map_is_served_again() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    for drone in sim.drones:
        drone.alive = False
    sim.run_until(2.0)
    for drone in sim.drones:
        drone.alive, drone.incarnation, drone.table = True, None, SlotTable(drone.name)
    sim.run_until(4.0)
    sim.assert_settled()


def test_live_move_whose_source_dies_before_releasing_ends_with_one_owner() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    source = sim.commander.saved.owners[0]
    target = next(d.name for d in sim.drones if d.name != source)
    sim.commander.move(0, target, sim.t)
    sim.commander.target_waiting(target, sim.drones[int(target[-1]) - 1].incarnation or 0, [0])
    sim.run_until(1.2)
    next(d for d in sim.drones if d.name == source).alive = False
    sim.run_until(3.0)
    sim.assert_settled()
    assert sim.commander.migrations == {}


def test_a_new_commander_term_keeps_the_slots_their_owners_still_hold() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    sim.assert_settled()
    before = {d.name: d.reseeds for d in sim.drones}
    epochs = list(sim.commander.saved.epochs)
    for _ in range(3):
        sim.restart_commander()
        sim.run_until(sim.t + 1.5)
        sim.assert_settled()
    assert {d.name: d.reseeds for d in sim.drones} == before
    assert sim.commander.saved.epochs == epochs


def test_a_new_term_reseeds_only_the_restarted_drone_and_never_serves_twice() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    restarted = sim.drones[1]
    restarted.table = SlotTable(restarted.name)  # its process restarted: memory is gone
    held_by_others = {d.name: d.reseeds for d in sim.drones if d is not restarted}
    sim.restart_commander()
    sim.run_until(sim.t + 2.0)
    sim.assert_settled()
    assert {d.name: d.reseeds for d in sim.drones if d is not restarted} == held_by_others
    assert restarted.reseeds > 0


def test_a_new_term_gives_an_unreachable_owners_slots_away_never_twice() -> None:
    sim = Sim(RATES)
    sim.run_until(1.0)
    sim.drones[0].cut_off = True  # keeps its slots in memory, but cannot register
    sim.restart_commander()
    sim.run_until(sim.t + 3.0)
    assert sim.overlaps == []
    assert "drone-1" not in sim.commander.saved.owners
    sim.drones[0].cut_off = False  # comes back late: a newcomer, nothing kept by surprise
    sim.run_until(sim.t + 3.0)
    sim.assert_settled()
