"""Commander election by drone vote, as a sans-I/O state machine (docs/design.md, "Commander
election"). Time is commander-monotonic seconds, passed in; randomness comes from the caller's
`random.Random`, so a simulation replays exactly from its seed.

Drones drive it. A drone that lost its leader sends `Ballot`s to every commander, carrying its
current term and vote; `ballot()` answers with this commander's role, term and known leader.

- Follower: once ballots from a majority of the electorate say "no leader" (a pre-vote: one
  flaky drone cannot depose a healthy leader), it waits a random `CANDIDACY_JITTER_MS`, then
  stands as candidate in `term_seen + 1`.
- Candidate: a drone grants it the term's vote by sending a Ballot whose (term, voted_for) is
  (our term, us). A majority of the electorate (the drones the authority knows, not the ones
  that happen to answer) wins; the caller then registers the term in the db (compare-and-set
  forward) and calls `registered()` before acting. No majority by a random deadline, or a
  ballot of a higher term: back to follower, with a backoff that doubles per failed round.
- Leader: every reply to a drone carries our clock (`sent_ms`); the drone echoes the last one
  it got in its next request (`ack_ms`), and only while it still follows us. `has_lease(now)`
  holds while a majority echoed a time within `LEADER_LEASE_MS`: the leader grants nothing
  without it and steps down when it lapses. A stale echo (a SIGSTOPped leader reading old
  requests) renews nothing, because the time echoed is old.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field

from keyval.timing import MAX_CLOCK_DRIFT
from wire.errors import BadRequest, Forbidden

# A leader keeps acting only while a majority of drones echoed one of its replies this recently.
# Drones heartbeat every 100 ms and echo the previous reply, so a healthy echo is at most
# ~200 ms old; 1 s tolerates a loaded machine (500 ms made a lone commander on a busy 2-core
# box step down and re-elect itself every few seconds). The cost: a new leader waits this
# (plus one grant expiry) before it moves a slot off a drone that did not come back.
LEADER_LEASE_MS = 1000

# A follower counts a drone as leaderless while its last ballot is this recent. Leaderless
# drones ballot every 50 ms (keyval.drone.vote.BALLOT_PERIOD_MS): four periods.
LEADERLESS_WINDOW_MS = 200

# Before standing, a follower waits a uniform random time up to this (times the backoff), so
# commanders that saw the same ballots rarely stand together. Several ballot periods wide.
CANDIDACY_JITTER_MS = 150

# A candidacy that has no majority this long after it began is over (uniformly random in the
# range, so two candidates that tied do not time out together again).
CANDIDATE_TIMEOUT_MS = (200, 400)

# The backoff factor doubles after each failed candidacy, up to this: bounds how long a
# cluster can sit between rounds (8 * 150 ms jitter) while still spreading tied candidates.
MAX_BACKOFF_FACTOR = 8

# Bound on terms accepted from a drone: a term this far above ours is a bug or an attack, and
# an accepted one would be unrecoverable (terms only rise).
MAX_TERM_JUMP = 1_000_000

# Ack times echoed by drones are commander milliseconds; a value ahead of our clock is forged
# or from a previous process life of this commander and is ignored.
ACK_AHEAD_TOLERANCE_MS = 0


class Role(enum.StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"  # won the vote; acts once `registered()` says the db took the term


@dataclass(frozen=True, slots=True)
class BallotView:
    """What a commander answers a ballot with."""

    commander: str
    role: Role
    term: int
    leader: str
    votes: int
    sent_ms: int


@dataclass(frozen=True, slots=True)
class Won:
    """Instruction: the vote of `term` is won; register it in the db, then call `registered`."""

    term: int


@dataclass(frozen=True, slots=True)
class SteppedDown:
    """Instruction: stop acting as leader of `term` (lease lapsed, deposed or fenced)."""

    term: int
    reason: str


ElectionInstruction = Won | SteppedDown


def majority(electorate_size: int) -> int:
    return electorate_size // 2 + 1


def inherited_lease_s(expiry_s: float) -> float:
    """How long after winning a new leader must treat the previous leader's grants as live:
    the old leader may grant until its own lease on a majority lapses (LEADER_LEASE_MS after
    the last echo of a drone that then voted for us, stretched by clock drift), and each such
    grant lasts up to `expiry_s` more."""
    return LEADER_LEASE_MS * (1 + MAX_CLOCK_DRIFT) / 1000 + expiry_s


@dataclass(slots=True)
class Election:
    name: str
    electorate: frozenset[str]
    rng: random.Random
    term: int = 0  # the highest term seen (ours when candidate or leader)
    role: Role = Role.FOLLOWER
    leader: str = ""  # who leads `term`, when known
    acting: bool = False  # leader whose term the db registered
    votes: set[str] = field(default_factory=set)
    support_ms: dict[str, int] = field(default_factory=dict)  # drone -> newest echoed send time
    leaderless_at: dict[str, float] = field(default_factory=dict)  # drone -> last ballot time
    candidacy_at: float = math.inf  # when a follower stands
    candidate_until: float = math.inf
    backoff: int = 1

    def __post_init__(self) -> None:
        if not self.electorate:
            raise ValueError("the electorate is empty: the authority knows no enabled drone")

    # ------------------------------------------------------------ drones

    def ballot(
        self, drone: str, term: int, voted_for: str, ack_ms: int, now: float
    ) -> tuple[BallotView, list[ElectionInstruction]]:
        """A leaderless drone reports its term and vote (granting ours when it names us)."""
        self._check_voter(drone, term)
        instructions: list[ElectionInstruction] = []
        self.leaderless_at[drone] = now
        if term > self.term:
            instructions += self._newer_term(term, f"drone {drone} is in term {term}", now)
        if self.role is Role.LEADER and term <= self.term:
            self._echo(drone, ack_ms, now)  # the drone echoes only to the one it supports
        elif self.role is Role.CANDIDATE and term == self.term and voted_for == self.name:
            self.votes.add(drone)
            self._echo(drone, ack_ms, now)
            if len(self.votes) >= majority(len(self.electorate)):
                self.role = Role.LEADER
                self.leader = self.name
                self.candidate_until = math.inf
                instructions.append(Won(self.term))
        elif self.role is Role.FOLLOWER and self.candidacy_at == math.inf and self._pre_vote(now):
            jitter_s = self.rng.uniform(0, CANDIDACY_JITTER_MS * self.backoff) / 1000
            self.candidacy_at = now + jitter_s
        return self.view(now), instructions

    def follower_ack(self, drone: str, ack_ms: int, now: float) -> None:
        """A drone that follows us echoed one of our replies (heartbeat, register)."""
        if drone in self.electorate and self.role is Role.LEADER:
            self._echo(drone, ack_ms, now)
            self.leaderless_at.pop(drone, None)

    def _echo(self, drone: str, ack_ms: int, now: float) -> None:
        if 0 < ack_ms <= self.now_ms(now) + ACK_AHEAD_TOLERANCE_MS:
            self.support_ms[drone] = max(ack_ms, self.support_ms.get(drone, 0))

    def _check_voter(self, drone: str, term: int) -> None:
        if drone not in self.electorate:
            raise Forbidden(
                f"{drone!r} is not an enabled drone the authority knows: it has no vote",
                detail={"drone": drone},
            )
        if term < 0 or term > self.term + MAX_TERM_JUMP:
            raise BadRequest(f"term {term} is outside 0..{self.term + MAX_TERM_JUMP}")

    def _pre_vote(self, now: float) -> bool:
        recent = now - LEADERLESS_WINDOW_MS / 1000
        leaderless = sum(1 for at in self.leaderless_at.values() if at >= recent)
        return leaderless >= majority(len(self.electorate))

    # ------------------------------------------------------------ time and the db

    def tick(self, now: float) -> list[ElectionInstruction]:
        if self.role is Role.FOLLOWER and now >= self.candidacy_at:
            self.candidacy_at = math.inf
            if self._pre_vote(now):
                self.stand(now)
        elif self.role is Role.CANDIDATE and now >= self.candidate_until:
            self.role = Role.FOLLOWER
            self.candidate_until = math.inf
            self.backoff = min(self.backoff * 2, MAX_BACKOFF_FACTOR)
        elif self.role is Role.LEADER and not self.has_lease(now):
            return self._step_down("its lease on a majority of drones lapsed")
        return []

    def registered(self, term: int) -> None:
        """The db took our term: act."""
        if self.role is not Role.LEADER or term != self.term:
            raise RuntimeError(f"registered({term}) but the election is {self.role} {self.term}")
        self.acting = True
        self.backoff = 1

    def fenced(self, newest_term: int, commander: str, now: float) -> list[ElectionInstruction]:
        """The db refused our term (or a save under it): a newer term is registered."""
        instructions = self._newer_term(max(newest_term, self.term + 1), "fenced by the db", now)
        self.leader = commander if newest_term > 0 else ""
        return instructions

    def has_lease(self, now: float) -> bool:
        """Leader only: a majority echoed one of our replies within LEADER_LEASE_MS."""
        if self.role is not Role.LEADER:
            return False
        oldest_ms = self.now_ms(now) - LEADER_LEASE_MS
        fresh = sum(1 for ack in self.support_ms.values() if ack > oldest_ms)
        return fresh >= majority(len(self.electorate))

    def _newer_term(self, term: int, reason: str, now: float) -> list[ElectionInstruction]:
        instructions: list[ElectionInstruction] = []
        if self.role is Role.LEADER:
            instructions = self._step_down(reason)
        self.term = term
        self.role = Role.FOLLOWER
        self.leader = ""
        self.votes = set()
        self.candidate_until = math.inf
        return instructions

    def _step_down(self, reason: str) -> list[ElectionInstruction]:
        term = self.term
        self.role = Role.FOLLOWER
        self.acting = False
        self.leader = ""
        self.support_ms = {}
        self.candidacy_at = math.inf
        return [SteppedDown(term, reason)]

    def stand(self, now: float) -> None:
        """Stand as candidate in the next term (also: tests forcing a tied election)."""
        self.term += 1
        self.role = Role.CANDIDATE
        self.leader = ""
        self.votes = set()
        self.support_ms = {}
        low_ms, high_ms = CANDIDATE_TIMEOUT_MS
        self.candidate_until = now + self.rng.uniform(low_ms, high_ms) / 1000

    def observe_term(self, term: int, leader: str) -> None:
        """Learned from outside the vote (the db's record at start-up)."""
        if term > self.term:
            self.term = term
            self.leader = leader

    # ------------------------------------------------------------ queries

    @staticmethod
    def now_ms(now: float) -> int:
        return math.floor(now * 1000)

    def view(self, now: float) -> BallotView:
        return BallotView(
            commander=self.name,
            role=self.role,
            term=self.term,
            leader=self.leader,
            votes=len(self.votes),
            sent_ms=self.now_ms(now),
        )
