"""The participant side of cross-drone transactions (two-phase commit).

A kv.txn_prepare names the transaction (txid), every participant drone, and this drone's part
of its read and write sets. The participant:

1. admits the request like a single-drone commit, waits until its slots are served and no
   earlier write to its keys is in flight, and refuses (CONFLICT, no wait) a key that another
   prepared transaction holds;
2. validates the read versions, hands out versions for its writes, and locks every key it
   reads or writes: in the lock table here and as pending writes (keyval.drone.pending), so
   compare-and-set and single-drone commits on those keys wait for the outcome. All of this
   with no await in between, as in keyval.drone.writes;
3. votes yes to the db (db.txn_vote_op: its writes and the grant covering them) and waits for
   the decision. The db records a commit together with every participant's writes (so a
   participant that crashes now loses nothing: its slots are reseeded from the db) and
   decides abort when the votes are not all in by the transaction's deadline;
4. on commit installs its writes in memory, on abort drops them; releases the locks and
   answers the client: kv.committed, or CONFLICT.

A participant that fails before voting (a stale read, a locked key, a slot that moved) votes
no: it records abort (db.decide), so the others are not held until the deadline.

Recovery: if the db's answer does not come within the time bound plus VOTE_MARGIN_MS, the
participant asks the db to record abort (compare-and-set: a commit already recorded stands and
is applied). Steps 3-4 are shielded from cancellation: a client that hangs up does not make
the drone drop its locks without a decision. If the db stays unreachable for RECOVERY_MAX_MS
the transaction is left in doubt, its keys locked, and the next kv.txn_abort for it or
`resolve_in_doubt` retries.

Blind puts and deletes do not wait for locks: they take a newer version than the prepared
writes, so they are ordered after the transaction whatever the decision (the db keeps the
newest version of a key; here a prepared write is installed only if nothing newer came).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from keyval.db.decisions import MAX_VOTE_WAIT_MS, check_participants
from keyval.db.records import DECISION_ABORT, DECISION_COMMIT
from keyval.drone.opcache import check_op_id
from keyval.drone.writes import MAX_TXN_KEYS, _admit_key, _admit_txn_writes, _once
from keyval.keys import key_from_canonical
from keyval.messages import (
    Committed,
    DbDecide,
    DbDecision,
    DbTxnVoteOp,
    TxnAbort,
    TxnOutcome,
    TxnPrepare,
    pack_op,
)
from wire import codec
from wire.channel import PeerInfo
from wire.errors import (
    BadRequest,
    Conflict,
    Internal,
    ServiceError,
    Timeout,
    TooLarge,
    Unavailable,
)
from wire.messages import Message

if TYPE_CHECKING:
    from keyval.drone.state import DroneState

log = logging.getLogger("keyval.drone")

# Longest time bound a client may ask for: the db caps a ballot's wait at the same value, so a
# client cannot make a drone hold locks longer than this plus VOTE_MARGIN_MS.
MAX_TIME_BOUND_MS = MAX_VOTE_WAIT_MS

# Extra wait for the db's answer past the time bound: the db decides abort at the deadline
# and needs a group commit (milliseconds) to record it; one second covers a busy db.
VOTE_MARGIN_MS = 1000

# Timeout of one db.decide request during recovery, the pause between attempts, and how long
# recovery keeps trying before it leaves the transaction in doubt (keys locked).
DECIDE_TIMEOUT_MS = 2000
RECOVERY_PAUSE_MS = 100
RECOVERY_MAX_MS = 30_000

# Finished transactions remembered so a retried prepare or an abort gets the same answer.
# A client retries for seconds; 64 Ki entries of ~100 B cover that at any realistic rate.
MAX_FINISHED = 64 * 1024

# What a client is told to wait after a transaction went in doubt.
IN_DOUBT_RETRY_AFTER_MS = 1000

Key = tuple[int, bytes]  # (slot, canonical key)


class _Write(NamedTuple):
    """One prepared write: what is installed on commit, and its value's CBOR for the vote."""

    slot: int
    key: bytes
    value: Any
    deleted: bool
    version: int
    encoded: bytes | None  # None for a deletion


@dataclasses.dataclass(eq=False)
class _Prepared:
    txid: bytes
    keys: list[Key]
    writes: list[_Write]
    before: dict[Key, int]  # version of each written key when it was locked
    decision: str = ""


class Participant:
    """Prepared transactions and their locks on one drone."""

    def __init__(self, state: DroneState) -> None:
        self.state = state
        self._locks: dict[Key, bytes] = {}  # key -> txid holding it
        self._prepared: dict[bytes, _Prepared] = {}
        self._in_doubt: dict[bytes, _Prepared] = {}
        # txid -> (decision, versions of this drone's writes)
        self._finished: collections.OrderedDict[bytes, tuple[str, list[int]]] = (
            collections.OrderedDict()
        )
        self._released = trio.Event()  # set and replaced whenever a transaction resolves
        self.recovery_max_ms = RECOVERY_MAX_MS
        self.committed = 0
        self.aborted = 0

    # ------------------------------------------------------------ for slot moves

    def prepared_slots(self) -> set[int]:
        """Slots with a prepared (or in-doubt) transaction holding a lock."""
        return {slot for slot, _ in self._locks}

    async def wait_resolved(self, slot: int) -> None:
        """Return once no prepared transaction holds a key of `slot`. Bounded by the callers'
        deadlines: a prepared transaction resolves within its time bound plus VOTE_MARGIN_MS
        (or goes in doubt when the db is unreachable, which a move cannot fix either)."""
        while slot in self.prepared_slots():
            await self._released.wait()

    def statistics(self) -> dict[str, int]:
        return {
            "prepared": len(self._prepared),
            "in_doubt": len(self._in_doubt),
            "locked_keys": len(self._locks),
            "committed": self.committed,
            "aborted": self.aborted,
        }

    # ------------------------------------------------------------ requests

    async def prepare(self, peer: PeerInfo, msg: TxnPrepare) -> Message:
        check_op_id(msg.txid)
        participants = check_participants(msg.participants, self.state.name)
        if not 1 <= msg.time_left_ms <= MAX_TIME_BOUND_MS:
            raise BadRequest(f"time_left_ms must be 1..{MAX_TIME_BOUND_MS}")
        if len(msg.reads) + len(msg.writes) > MAX_TXN_KEYS:
            raise TooLarge(f"a transaction touches at most {MAX_TXN_KEYS} keys")
        if not msg.reads and not msg.writes:
            raise BadRequest("a participant with no keys has no part in the transaction")
        reads = [(*_admit_key(self.state, peer, key), version) for key, version in msg.reads]
        writes, encoded = _admit_txn_writes(self.state, peer, msg.writes)

        async def attempt() -> Message:
            return await self._prepare(msg, participants, reads, writes, encoded)

        return await _once(self.state, msg.txid, attempt)

    async def abort(self, peer: PeerInfo, msg: TxnAbort) -> Message:
        """Abort `msg.txid` unless decided; answer the decision that stands."""
        check_op_id(msg.txid)
        known = self._finished.get(msg.txid)
        if known is not None:
            return TxnOutcome(known[0])
        in_doubt = self._in_doubt.get(msg.txid)
        if in_doubt is not None:
            return TxnOutcome(await self._resolve(in_doubt))
        return TxnOutcome(await self._ask_db(msg.txid))

    async def resolve_in_doubt(self) -> None:
        """Retry every in-doubt transaction once (for a periodic caller)."""
        for prepared in list(self._in_doubt.values()):
            await self._resolve(prepared)

    # ------------------------------------------------------------ prepare

    async def _prepare(
        self,
        msg: TxnPrepare,
        participants: tuple[str, ...],
        reads: list[tuple[int, bytes, int]],
        writes: list[tuple[int, bytes, Any, bool]],
        encoded: list[bytes | None],
    ) -> Message:
        known = self._finished.get(msg.txid)
        if known is not None:  # a retry of a finished prepare whose reply was lost
            return _reply(*known)
        try:
            prepared = await self._lock(msg.txid, reads, writes, encoded)
        except (ServiceError, trio.Cancelled):
            with trio.CancelScope(shield=True):
                await self._vote_no(msg.txid)
            raise
        with trio.CancelScope(shield=True):
            decision = await self._vote(prepared, participants, msg.time_left_ms)
            if not decision:
                decision = await self._resolve(prepared)
        return _reply(decision, [write.version for write in prepared.writes])

    async def _lock(
        self,
        txid: bytes,
        reads: list[tuple[int, bytes, int]],
        writes: list[tuple[Any, ...]],
        encoded: list[bytes | None],
    ) -> _Prepared:
        state = self.state
        keys = sorted({(slot, data) for slot, data, _ in reads} | {(w[0], w[1]) for w in writes})
        epochs = {slot: await state.wait_serving(slot) for slot in sorted({s for s, _ in keys})}
        self._check_unlocked(keys)
        pending = state.pending
        if any(pending.is_pending(slot, data) for slot, data in keys):  # rare: skip the wait
            await pending.wait_clear(keys)
        self._check_unlocked(keys)  # no await from here to the locking below
        for slot, epoch in epochs.items():
            state.check_slot_servable(slot, epoch)
        stale = state.store.conflicts(reads)
        if stale:
            raise Conflict(
                f"{len(stale)} read key(s) changed since they were read",
                detail={"keys": [key_from_canonical(data) for data in stale]},
            )
        planned = [
            _Write(slot, data, value, deleted, state.store.next_version(slot, epochs[slot]), cbor)
            for (slot, data, value, deleted), cbor in zip(writes, encoded, strict=True)
        ]
        before = {(w.slot, w.key): state.store.version_of(w.slot, w.key) for w in planned}
        prepared = _Prepared(txid, keys, planned, before)
        for key in keys:
            self._locks[key] = txid
        state.pending.add(keys)
        self._prepared[txid] = prepared
        return prepared

    def _check_unlocked(self, keys: list[Key]) -> None:
        held = [key for key in keys if key in self._locks]
        if held:
            raise Conflict(
                f"{len(held)} key(s) are locked by another prepared transaction",
                detail={"keys": [key_from_canonical(data) for _, data in held]},
            )

    # ------------------------------------------------------------ voting and recovery

    async def _vote(self, prepared: _Prepared, participants: tuple[str, ...], wait_ms: int) -> str:
        """Vote yes and wait for the decision; "" when the db did not answer in time."""
        writes = prepared.writes
        op = pack_op(prepared.txid, [(w.slot, w.key, w.version, w.encoded) for w in writes])
        vote = DbTxnVoteOp(
            txid=prepared.txid,
            participants=list(participants),
            grant=self.state.table.grant if prepared.writes else None,
            op=codec.encode(op),
            wait_ms=wait_ms,
        )
        timeout_s = (wait_ms + VOTE_MARGIN_MS) / 1000
        try:
            with trio.fail_after(timeout_s):
                reply = await self.state.db.request(vote, timeout=timeout_s)
        except (ServiceError, trio.TooSlowError) as error:
            log.info(
                "2PC %s: no decision from the vote (%s); recovering", prepared.txid.hex(), error
            )
            return ""
        if not isinstance(reply, DbDecision) or reply.decision not in (
            DECISION_COMMIT,
            DECISION_ABORT,
        ):
            log.error("2PC %s: the db answered a vote with %r", prepared.txid.hex(), reply)
            return ""
        self._finish(prepared, reply.decision)
        return reply.decision

    async def _resolve(self, prepared: _Prepared) -> str:
        """Record abort unless decided (CAS) and finish; keep it in doubt if the db is away."""
        with trio.move_on_after(self.recovery_max_ms / 1000):
            while True:
                try:
                    decision = await self._ask_db(prepared.txid)
                except ServiceError as error:
                    log.warning("2PC %s: recovery: %s", prepared.txid.hex(), error.message)
                    await trio.sleep(RECOVERY_PAUSE_MS / 1000)
                    continue
                self._finish(prepared, decision)
                return decision
        self._in_doubt[prepared.txid] = prepared
        log.error("2PC %s: in doubt, keys stay locked until the db answers", prepared.txid.hex())
        raise Unavailable(
            "the transaction's outcome is not known yet (the db is unreachable)",
            detail={"retry_after_ms": IN_DOUBT_RETRY_AFTER_MS, "txid": prepared.txid.hex()},
        )

    async def _ask_db(self, txid: bytes) -> str:
        """db.decide(abort): the decision that stands afterwards."""
        timeout_s = DECIDE_TIMEOUT_MS / 1000
        try:
            with trio.fail_after(timeout_s):
                reply = await self.state.db.request(
                    DbDecide(txid, DECISION_ABORT), timeout=timeout_s
                )
        except trio.TooSlowError:
            raise Timeout(f"no answer to db.decide within {timeout_s} s") from None
        if not isinstance(reply, DbDecision) or reply.decision not in (
            DECISION_COMMIT,
            DECISION_ABORT,
        ):
            raise Internal(f"the db answered db.decide with {reply!r}")
        return reply.decision

    async def _vote_no(self, txid: bytes) -> None:
        """Best effort: record abort so the other participants need not wait for the deadline."""
        try:
            await self._ask_db(txid)
        except (ServiceError, trio.TooSlowError) as error:
            log.info("2PC %s: could not vote no (%s); the deadline will", txid.hex(), error)

    # ------------------------------------------------------------ the outcome

    def _finish(self, prepared: _Prepared, decision: str) -> None:
        """Install (commit) or drop (abort) the writes, release the locks, remember it."""
        was_prepared = self._prepared.pop(prepared.txid, None) is not None
        was_in_doubt = self._in_doubt.pop(prepared.txid, None) is not None
        if not (was_prepared or was_in_doubt):
            return  # already finished
        store = self.state.store
        if decision == DECISION_COMMIT:
            self.committed += 1
            for write in prepared.writes:
                key = (write.slot, write.key)
                # Something newer came (a blind put/delete takes a later version): skip.
                if store.has_slot(write.slot) and store.version_of(*key) == prepared.before[key]:
                    store.apply(
                        write.slot, write.key, write.value, write.version, deleted=write.deleted
                    )
        else:
            self.aborted += 1
        for key in prepared.keys:
            if self._locks.get(key) != prepared.txid:
                raise RuntimeError(f"2PC lock of {key!r} not held by {prepared.txid.hex()}")
            del self._locks[key]
        self.state.pending.resolve(prepared.keys)
        self._remember(prepared.txid, decision, [write.version for write in prepared.writes])
        self._released.set()
        self._released = trio.Event()

    def _remember(self, txid: bytes, decision: str, versions: list[int]) -> None:
        self._finished[txid] = (decision, versions)
        self._finished.move_to_end(txid)
        while len(self._finished) > MAX_FINISHED:
            self._finished.popitem(last=False)


def _reply(decision: str, versions: list[int]) -> Message:
    if decision == DECISION_COMMIT:
        return Committed(versions=versions)
    raise Conflict("the transaction aborted", detail={"decision": decision})


_participants: weakref.WeakKeyDictionary[DroneState, Participant] = weakref.WeakKeyDictionary()


def participant(state: DroneState) -> Participant:
    """The one Participant of a drone (created on first use)."""
    found = _participants.get(state)
    if found is None:
        found = _participants[state] = Participant(state)
    return found


async def handle_txn_prepare(state: DroneState, peer: PeerInfo, msg: TxnPrepare) -> Message:
    return await participant(state).prepare(peer, msg)


async def handle_txn_abort(state: DroneState, peer: PeerInfo, msg: TxnAbort) -> Message:
    return await participant(state).abort(peer, msg)
