"""The db's side of two-phase commit: collecting votes and recording the decision.

Each participant drone, once it has validated and locked its keys, votes (db.txn_vote_op:
its writes as one write-batch op, checked by `vote_writes`; the older db.txn_vote with nested
writes is still served) and waits. The `VoteCollector` keeps one ballot per transaction id
in memory:

- the last vote in makes the decision "commit": it is recorded (kv_decisions, first one per
  txid wins) in the same db transaction as every participant's writes, after the fence check
  of every written slot with the voter's grant (a slot that moved since the prepare turns the
  decision into "abort"). Only then is any voter answered;
- a ballot still missing votes at its deadline (the transaction's time bound, as the first
  voter saw it) is decided "abort" by compare-and-set, which also answers a participant that
  asks later; so does db.decide("abort") from a participant's recovery or a client's abort.

Votes live in memory only. If the db restarts, open ballots are gone: nothing was recorded,
so every participant's recovery records "abort" and releases its locks. A commit is durable
before anyone hears of it, so no participant ever applies a commit the db could forget.
A transaction that writes nothing (read-only) needs no record: "commit" then only says that
all its read sets were valid while every participant held its locks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import trio

from keyval.db.batch import prepare_op
from keyval.db.records import DECISION_ABORT, DECISION_COMMIT, StoredWrite
from keyval.grants import Grant
from keyval.messages import DbTxnVoteOp
from wire import codec
from wire.errors import BadRequest, DecodeError, Unavailable

# Drones one transaction may span: at most every drone of a large cluster; bounds a ballot.
MAX_PARTICIPANTS = 64

# Open ballots before new votes are refused: each holds its writes in memory until decided,
# and a participant's locks are bounded by its time bound anyway (a full table means clients
# open transactions faster than the db decides them).
MAX_OPEN_BALLOTS = 16_384

# Longest a ballot waits for its missing votes. A client's time bound is seconds (5 s by
# default); this caps what a client can make the db and the participants hold.
MAX_VOTE_WAIT_MS = 60_000

# What a voter is told to wait before asking again when the decision could not be stored.
DECISION_RETRY_AFTER_MS = 200


@dataclasses.dataclass(frozen=True, slots=True)
class Vote:
    grant: Grant | None
    writes: tuple[StoredWrite, ...]


# (txid, decision wanted, the votes by drone) -> the decision that stands, "" if not stored.
Record = Callable[[bytes, str, dict[str, Vote]], Awaitable[str]]


@dataclasses.dataclass(eq=False)
class _Ballot:
    participants: tuple[str, ...]
    deadline: float  # trio clock
    votes: dict[str, Vote] = dataclasses.field(default_factory=dict)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    deciding: bool = False
    decision: str = ""  # after done: the standing decision, "" when it could not be stored


def check_participants(participants: list[str], voter: str) -> tuple[str, ...]:
    """BadRequest unless `participants` are 2..MAX distinct names, sorted, including `voter`."""
    if not 2 <= len(participants) <= MAX_PARTICIPANTS:
        raise BadRequest(f"a 2PC transaction spans 2..{MAX_PARTICIPANTS} drones")
    if participants != sorted(set(participants)):
        raise BadRequest("participants must be distinct and sorted")
    if voter not in participants:
        raise BadRequest(f"{voter!r} votes in a transaction it is not part of")
    return tuple(participants)


def vote_writes(vote: DbTxnVoteOp) -> tuple[StoredWrite, ...]:
    """The writes of a db.txn_vote_op, checked as a write batch's op is (BadRequest/TooLarge
    naming the field); its op id must be the vote's txid."""
    try:
        op = codec.decode(vote.op)
    except DecodeError as error:
        raise BadRequest(f"op: {error.message}") from None
    prepared = prepare_op(0, op)
    if prepared.op_id != vote.txid:
        raise BadRequest("a vote's op must carry its txid as the op id")
    return prepared.writes


class VoteCollector:
    """Open ballots by transaction id; `record` stores a decision (see the module docstring)."""

    def __init__(self, record: Record) -> None:
        self._record = record
        self._ballots: dict[bytes, _Ballot] = {}

    def __len__(self) -> int:
        return len(self._ballots)

    async def vote(
        self, voter: str, txid: bytes, participants: tuple[str, ...], vote: Vote, wait_ms: int
    ) -> str:
        """Count `voter`'s yes; return the decision once it stands (Unavailable if not stored)."""
        if not 1 <= wait_ms <= MAX_VOTE_WAIT_MS:
            raise BadRequest(f"wait_ms must be 1..{MAX_VOTE_WAIT_MS}")
        ballot = self._ballots.get(txid)
        if ballot is None:
            if len(self._ballots) >= MAX_OPEN_BALLOTS:
                raise Unavailable(
                    f"{MAX_OPEN_BALLOTS} transactions are waiting for votes",
                    detail={"retry_after_ms": DECISION_RETRY_AFTER_MS},
                )
            ballot = _Ballot(participants, trio.current_time() + wait_ms / 1000)
            self._ballots[txid] = ballot
        if ballot.participants != participants:
            await self._finish(txid, ballot, DECISION_ABORT)  # the voters disagree: no commit
        elif not ballot.deciding:
            ballot.votes[voter] = vote  # a repeated vote (a retry) replaces the first
            if len(ballot.votes) == len(participants):
                await self._finish(txid, ballot, DECISION_COMMIT)
        if not ballot.done.is_set():  # the last voter finds it decided: no wait
            with trio.move_on_at(ballot.deadline):
                await ballot.done.wait()
        if not ballot.done.is_set():
            await self._finish(txid, ballot, DECISION_ABORT)
        return _standing(ballot)

    async def decide(self, txid: bytes, decision: str) -> str:
        """Record `decision` unless one stands (an open ballot is closed with it)."""
        ballot = self._ballots.get(txid)
        if ballot is not None:
            await self._finish(txid, ballot, decision)
            return _standing(ballot)
        standing = await self._record(txid, decision, {})
        if not standing:
            raise _not_stored()
        return standing

    async def _finish(self, txid: bytes, ballot: _Ballot, decision: str) -> None:
        if ballot.deciding:  # another task decides; its outcome is ours
            await ballot.done.wait()
            return
        ballot.deciding = True
        # Shielded: a voter whose drone hung up must not leave the others without an answer.
        with trio.CancelScope(shield=True):
            try:
                votes = ballot.votes if decision == DECISION_COMMIT else {}
                ballot.decision = await self._record(txid, decision, votes)
            finally:
                if self._ballots.get(txid) is ballot:
                    del self._ballots[txid]
                ballot.done.set()


def _standing(ballot: _Ballot) -> str:
    if not ballot.decision:
        raise _not_stored()
    return ballot.decision


def _not_stored() -> Unavailable:
    return Unavailable(
        "the decision could not be stored; ask again",
        detail={"retry_after_ms": DECISION_RETRY_AFTER_MS},
    )
