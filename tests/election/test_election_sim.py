"""Election simulation: the real commander `Election`s, the real drone `Voter`s and the real
SQLite backend's term compare-and-set and fenced map save, driven in one loop with simulated
time, message delay, crashes, partitions, pauses (SIGSTOP: messages queue and arrive at once on
SIGCONT) and flapping links. One seeded `random.Random` drives everything; a failure prints it.

Checked after every step: the db's registered term never goes back; every map save the db
accepted in a term came from one commander; a leader acts (grants) only while no newer leader
could have moved a slot: its last grant is within LEADER_LEASE_MS of any newer leader's win.
Liveness: after the fault heals, one leader acting with a lease within a bounded time.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyval.commander.election import LEADER_LEASE_MS, Election, Role, SteppedDown, Won
from keyval.db.records import MapRecord
from keyval.db.sqlite import SqliteBackend
from keyval.drone.vote import BALLOT_PERIOD_MS, LEADER_TIMEOUT_MS, Reply, Vote, Voter

STEP_S = 0.005
DELAY_S = 0.002  # one-way message delay
HEARTBEAT_S = 0.1
ACTION_S = 0.05  # an acting leader saves its map (an action the db must fence) this often
LIVENESS_BOUND_S = 5.0  # a leader acts within this after the faults end


@dataclass
class SimCommander:
    election: Election
    alive: bool = True
    paused: bool = False
    registering: bool = False
    next_action: float = 0.0
    last_grant_at: dict[int, float] = field(default_factory=dict)  # term -> last grant time
    won_at: dict[int, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.election.name


@dataclass
class SimDrone:
    voter: Voter
    alive: bool = True
    last_ok: float = 0.0  # send time of the last answered heartbeat
    next_beat: float = 0.0
    next_ballot: float = 0.0

    @property
    def name(self) -> str:
        return self.voter.name


class Sim:
    def __init__(self, seed: int, path: Path, commanders: int = 3, drones: int = 5) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.t = 0.0
        names = [f"drone-{i}" for i in range(1, drones + 1)]
        electorate = frozenset(names)
        self.commanders = {
            f"commander-{i}": SimCommander(Election(f"commander-{i}", electorate, self.rng))
            for i in range(1, commanders + 1)
        }
        self.drones = {name: SimDrone(Voter(name)) for name in names}
        self.cut: set[tuple[str, str]] = set()  # (drone, commander) links that drop everything
        self.db = SqliteBackend(path / f"sim-{seed}.sqlite3")
        self.db.open()
        self.db_term = 0
        self.map_version = 0
        self.accepted: dict[int, set[str]] = {}  # term -> commanders whose saves the db took
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ network

    def _send(self, drone: str, commander: str, deliver: Callable[[], None]) -> None:
        if (drone, commander) in self.cut:
            return
        heapq.heappush(self._queue, (self.t + DELAY_S, next(self._order), deliver))

    # ------------------------------------------------------------ the loop

    def step(self) -> None:
        self.t += STEP_S
        while self._queue and self._queue[0][0] <= self.t:
            heapq.heappop(self._queue)[2]()
        for commander in self.commanders.values():
            if commander.alive and not commander.paused:
                self._commander_step(commander)
        for drone in self.drones.values():
            if drone.alive:
                self._drone_step(drone)
        self._check()

    def run(self, seconds: float) -> None:
        end = self.t + seconds
        while self.t < end:
            self.step()

    def _commander_step(self, commander: SimCommander) -> None:
        for instruction in commander.election.tick(self.t):
            self._instruction(commander, instruction)
        election = commander.election
        if election.role is Role.LEADER and election.acting and self.t >= commander.next_action:
            commander.next_action = self.t + ACTION_S
            self.map_version += 1
            record = MapRecord(election.term, self.map_version, ((0, 16383, "drone-1", 1),))
            outcome = self.db.save_map(commander.name, record, [])
            if outcome.saved:
                self.accepted.setdefault(election.term, set()).add(commander.name)
            else:
                current = outcome.current_term
                for instruction in election.fenced(current.term, current.commander, self.t):
                    self._instruction(commander, instruction)

    def _instruction(self, commander: SimCommander, instruction: Won | SteppedDown) -> None:
        if isinstance(instruction, Won):
            commander.won_at[instruction.term] = self.t
            stored = self.db.register_term(commander.name, instruction.term)
            if stored.term < self.db_term:
                raise AssertionError(f"seed {self.seed}: db term went back to {stored.term}")
            self.db_term = stored.term
            if (stored.term, stored.commander) == (instruction.term, commander.name):
                commander.election.registered(instruction.term)
            else:
                for step in commander.election.fenced(stored.term, stored.commander, self.t):
                    self._instruction(commander, step)

    def _drone_step(self, drone: SimDrone) -> None:
        voter = drone.voter
        if voter.leader and self.t - drone.last_ok > LEADER_TIMEOUT_MS / 1000:
            voter.leader_lost()
        if voter.leader:
            if self.t >= drone.next_beat:
                drone.next_beat = self.t + HEARTBEAT_S
                self._heartbeat(drone, voter.leader, self.t)
        elif self.t >= drone.next_ballot:
            drone.next_ballot = self.t + BALLOT_PERIOD_MS / 1000
            for name in self.commanders:
                self._ballot(drone, name)

    def _heartbeat(self, drone: SimDrone, name: str, sent_at: float) -> None:
        ack = drone.voter.ack_for(name)

        def at_commander() -> None:
            commander = self.commanders[name]
            if not commander.alive:
                return
            if commander.paused:  # SIGSTOP: the request waits in the socket buffer
                heapq.heappush(self._queue, (self.t + STEP_S, next(self._order), at_commander))
                return
            election = commander.election
            election.follower_ack(drone.name, ack, self.t)
            if not (election.acting and election.has_lease(self.t)):
                self._send(drone.name, name, lambda: self._not_leader(drone, name))
                return
            commander.last_grant_at[election.term] = self.t
            sent_ms = election.now_ms(self.t)
            self._send(drone.name, name, lambda: self._heartbeat_ok(drone, name, sent_at, sent_ms))

        self._send(drone.name, name, at_commander)

    def _heartbeat_ok(self, drone: SimDrone, name: str, sent_at: float, sent_ms: int) -> None:
        if drone.alive and drone.voter.leader == name:
            drone.last_ok = max(drone.last_ok, sent_at)
            drone.voter.on_heartbeat_reply(name, sent_ms)

    def _not_leader(self, drone: SimDrone, name: str) -> None:
        commander = self.commanders[name]
        if drone.voter.leader == name and commander.election.role is not Role.LEADER:
            drone.voter.leader_lost()

    def _ballot(self, drone: SimDrone, name: str) -> None:
        voter = drone.voter
        term, voted_for, ack = voter.term, voter.voted_for, voter.ack_for(name)

        def at_commander() -> None:
            commander = self.commanders[name]
            if not commander.alive:
                return
            if commander.paused:
                heapq.heappush(self._queue, (self.t + STEP_S, next(self._order), at_commander))
                return
            view, instructions = commander.election.ballot(drone.name, term, voted_for, ack, self.t)
            for instruction in instructions:
                self._instruction(commander, instruction)
            reply = Reply(view.commander, str(view.role), view.term, view.sent_ms)
            self._send(drone.name, name, lambda: self._ballot_reply(drone, reply))

        self._send(drone.name, name, at_commander)

    def _ballot_reply(self, drone: SimDrone, reply: Reply) -> None:
        if not drone.alive:
            return
        decision = drone.voter.on_reply(reply)
        if isinstance(decision, Vote):
            self._ballot(drone, decision.commander)
        elif decision is not None:
            drone.last_ok = self.t

    # ------------------------------------------------------------ invariants

    def _check(self) -> None:
        stored = self.db._run("read", self.db._term)
        if stored.term < self.db_term:
            raise AssertionError(f"seed {self.seed}: the db's term went back")
        self.db_term = stored.term
        for term, names in self.accepted.items():
            if len(names) > 1:
                raise AssertionError(f"seed {self.seed}: term {term} saves by {sorted(names)}")
        for old in self.commanders.values():
            for new in self.commanders.values():
                for old_term, last_grant in old.last_grant_at.items():
                    for new_term, won in new.won_at.items():
                        if new_term > old_term and last_grant > won + LEADER_LEASE_MS / 1000:
                            raise AssertionError(
                                f"seed {self.seed}: {old.name} granted in term {old_term} at "
                                f"{last_grant:.3f}, after {new.name} won {new_term} at {won:.3f}"
                            )

    def acting_leaders(self) -> list[SimCommander]:
        return [
            c
            for c in self.commanders.values()
            if c.alive and not c.paused and c.election.acting and c.election.has_lease(self.t)
        ]

    def leader(self) -> SimCommander | None:
        leaders = self.acting_leaders()
        return leaders[0] if len(leaders) == 1 else None

    def wait_leader(
        self, bound_s: float = LIVENESS_BOUND_S, *, other_than: SimCommander | None = None
    ) -> tuple[SimCommander, float]:
        """Step until one commander acts as leader, followed by a majority of the drones."""
        start = self.t
        while self.t - start < bound_s:
            self.step()
            leader = self.leader()
            if leader is None or leader is other_than:
                continue
            if self._followers(leader) * 2 > len(self.drones):
                return leader, self.t - start
        raise AssertionError(f"seed {self.seed}: no leader within {bound_s} s")

    def _followers(self, commander: SimCommander) -> int:
        return sum(1 for d in self.drones.values() if d.alive and d.voter.leader == commander.name)


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    sims: list[Sim] = []

    def make(seed: int, commanders: int = 3, drones: int = 5) -> Sim:
        sim = Sim(seed, tmp_path, commanders, drones)
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.close()


def partition(sim: Sim, commander: str, drones: list[str]) -> None:
    sim.cut |= {(drone, commander) for drone in drones}


def test_a_fresh_cluster_elects_one_leader(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(1)
    leader, took_s = sim.wait_leader()
    assert took_s < 1.5
    sim.run(2.0)
    assert sim.leader() is leader
    assert sim.db_term == leader.election.term


@pytest.mark.parametrize("seed", range(8))
def test_leader_crash(make_sim: Callable[..., Sim], seed: int) -> None:
    sim = make_sim(seed)
    old, _ = sim.wait_leader()
    old.alive = False
    new, took_s = sim.wait_leader(other_than=old)
    assert new is not old and new.election.term > old.election.term
    assert took_s < 2.0, f"seed {seed}"


@pytest.mark.parametrize("seed", range(6))
def test_leader_partitioned_from_all_drones(make_sim: Callable[..., Sim], seed: int) -> None:
    sim = make_sim(seed)
    old, _ = sim.wait_leader()
    partition(sim, old.name, list(sim.drones))
    new, _ = sim.wait_leader(other_than=old)
    assert new is not old
    sim.run(1.0)
    assert old.election.role is not Role.LEADER  # it stepped down: no lease on a majority
    sim.cut.clear()
    sim.run(2.0)
    assert sim.leader() is new  # healing does not bring the old one back


@pytest.mark.parametrize("seed", range(6))
def test_leader_partitioned_from_half(make_sim: Callable[..., Sim], seed: int) -> None:
    sim = make_sim(seed, drones=4)  # cut from 2 of 4: no majority (3) on its side
    old, _ = sim.wait_leader()
    partition(sim, old.name, ["drone-1", "drone-2"])
    new, _ = sim.wait_leader(other_than=old)
    assert new is not old
    assert old.election.role is not Role.LEADER


@pytest.mark.parametrize("seed", range(6))
def test_leader_partitioned_from_a_minority_keeps_leading(
    make_sim: Callable[..., Sim], seed: int
) -> None:
    sim = make_sim(seed, drones=5)
    old, _ = sim.wait_leader()
    partition(sim, old.name, ["drone-1", "drone-2"])
    sim.run(3.0)
    assert sim.leader() is old  # the pre-vote: two leaderless drones depose nobody


@pytest.mark.parametrize("seed", range(40))
def test_two_candidates_at_once_settle(make_sim: Callable[..., Sim], seed: int) -> None:
    sim = make_sim(seed)
    for drone in sim.drones.values():  # every drone leaderless: both pre-votes pass
        sim._drone_step(drone)
    sim.run(0.005)
    first, second = sim.commanders["commander-1"], sim.commanders["commander-2"]
    top = max(c.election.term for c in sim.commanders.values())
    for candidate in (first, second):
        candidate.election.term = top
        candidate.election.stand(sim.t)
    assert (first.election.role, second.election.role) == (Role.CANDIDATE, Role.CANDIDATE)
    assert first.election.term == second.election.term
    _, took_s = sim.wait_leader(bound_s=3.0)
    assert took_s < 3.0


@pytest.mark.parametrize("seed", range(6))
def test_sigstop_longer_than_the_lease(make_sim: Callable[..., Sim], seed: int) -> None:
    sim = make_sim(seed)
    old, _ = sim.wait_leader()
    old.paused = True
    new, _ = sim.wait_leader(other_than=old)
    assert new is not old
    old.paused = False  # SIGCONT: queued heartbeats and ballots arrive at once
    sim.run(2.0)
    assert old.election.role is not Role.LEADER
    assert sim.leader() is new


@pytest.mark.parametrize("seed", range(6))
def test_network_flapping(make_sim: Callable[..., Sim], seed: int) -> None:
    sim = make_sim(seed)
    sim.wait_leader()
    links = [(d, c) for d in sim.drones for c in sim.commanders]
    for _ in range(40):
        sim.cut = {link for link in links if sim.rng.random() < 0.4}
        sim.run(sim.rng.uniform(0.05, 0.4))
    sim.cut.clear()
    sim.wait_leader()
    terms = [c.election.term for c in sim.commanders.values()]
    assert max(terms) == sim.db_term or sim.db_term <= max(terms)


def test_a_crashed_leader_restarting_rejoins_as_follower(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(3)
    old, _ = sim.wait_leader()
    old.alive = False
    new, _ = sim.wait_leader(other_than=old)
    old.alive = True
    old.election = Election(old.name, old.election.electorate, sim.rng)
    sim.run(2.0)
    assert sim.leader() is new
