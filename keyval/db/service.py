"""The db's request handlers over one backend: fencing, op ids, term, map, grant key.

Every backend call runs in the backend's one thread (keyval.db.worker: one connection, one
call at a time, in order), so the event loop never blocks on SQLite or PostgreSQL. Fence
checks and the storage call that depends on them run under one FIFO lock (`_order`), so a
slot read that raises a fence is ordered exactly against the write batches before and after
it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar

import trio

from auth.roles import require_role
from keyval.db.backend import Backend, StorageError
from keyval.db.batch import MAX_WRITES_PER_OP, decode_ops, prepare_ops
from keyval.db.committer import CommitterStatistics, GroupCommitter
from keyval.db.decisions import Vote, VoteCollector, check_participants, vote_writes
from keyval.db.fences import FenceTable
from keyval.db.records import (
    DECISION_ABORT,
    DECISION_COMMIT,
    DECISIONS,
    DecisionRecord,
    MapRange,
    MapRecord,
    OpResult,
    PreparedOp,
    StoredWrite,
)
from keyval.db.worker import BackendThread
from keyval.grants import GRANT_KEY_BYTES, Grant, GrantVerifier, check_ranges
from keyval.keys import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, NUM_SLOTS, canonical_slot
from keyval.messages import (
    DbBatchResult,
    DbDecide,
    DbDecision,
    DbGetDecision,
    DbGrantKey,
    DbGrantKeyReply,
    DbLoadMap,
    DbMap,
    DbReadSlot,
    DbReadSlots,
    DbRegisterTerm,
    DbSaveMap,
    DbSlotPage,
    DbSlotsPage,
    DbTerm,
    DbTxnVote,
    DbTxnVoteOp,
    DbWrite,
    DbWriteBatch,
)
from wire import codec
from wire.channel import PeerInfo
from wire.errors import (
    BadRequest,
    Fenced,
    ServiceError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from wire.messages import Message

logger = logging.getLogger("keyval.db")

P = ParamSpec("P")
T = TypeVar("T")

ROLE_DRONE = "drone"
ROLE_COMMANDER = "commander"

# Grants in one request (ops and writes per op: keyval.db.batch). A drone sends its one
# current grant; a few more cover a batch written across a grant change.
MAX_GRANTS_PER_REQUEST = 16

# A slot page: at most this many items, and past the first item at most this many bytes of
# keys and values, so a page always fits the 1 MiB frame (one max value is 512 KiB).
MAX_SLOT_PAGE_ITEMS = 10_000
SLOT_PAGE_MAX_BYTES = 768 * 1024

# Slots one db.read_slots may span: every slot of the range is fence-checked on every page, so
# this bounds that work (a drone reads a failover's thousands of slots in runs of this size).
MAX_READ_SLOTS_SPAN = 2048

# 2PC transaction ids: random ids of 16 bytes in practice; 64 bounds the decision table rows.
MAX_TXID_BYTES = 64

# Op results are kept this long (wall clock). A client retries for seconds, a drone's flush
# queue drains in well under a minute; one hour covers any retry with a wide margin.
OP_RESULT_RETENTION_MS = 60 * 60 * 1000
OP_RESULT_PURGE_INTERVAL_S = 60.0

# Group commit defaults, measured with scripts/bench_db (2 shared cores, 64 one-op submitters):
# with no delay a batch takes whatever queued while the previous transaction committed, and
# that already fills batches (mean 64 ops: SQLite ~18,600 writes/s, PostgreSQL ~15,000/s);
# waiting 1 or 2 ms for company only lowered throughput (SQLite 16,200 / 12,900, PostgreSQL
# 8,700 / 8,200) and adds latency to a lone writer (3,900 -> 670 writes/s at delay 1 ms).
# 512 ops bounds one transaction's lock time and memory; raise the delay only for a disk
# whose fsync is slow compared with the arrival gap between writes.
DEFAULT_BATCH_MAX_OPS = 512
DEFAULT_BATCH_MAX_DELAY_MS = 0.0

# Submissions waiting for the committer before submitters block (back-pressure to drones).
MAX_PENDING_SUBMISSIONS = 1024

# What a caller is told to wait after a storage failure before retrying.
STORAGE_RETRY_AFTER_MS = 200


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class _GrantSet:
    """The grants one DbWriteBatch carried, split into those that verified and those not."""

    valid: tuple[Grant, ...]
    refused: tuple[tuple[Grant, Unauthorized], ...]

    def grant_for(self, slot: int) -> Grant:
        """The newest verified grant covering `slot`; Unauthorized/Fenced when there is none."""
        if len(self.valid) == 1 and self.valid[0].epoch_of(slot) is not None:
            return self.valid[0]  # the common case: a drone sends its one current grant
        covering = [g for g in self.valid if g.epoch_of(slot) is not None]
        if covering:
            return max(covering, key=lambda g: (g.term, g.epoch_of(slot) or 0))
        for grant, error in self.refused:
            if grant.epoch_of(slot) is not None:
                raise error
        raise Fenced(f"no grant in the batch covers slot {slot}", detail={"slot": slot})


@dataclass(frozen=True)
class _PendingDecision:
    """A decision waiting for the committer, with the (grant, slot) fence checks a commit needs."""

    record: DecisionRecord
    fences: tuple[tuple[Grant, int], ...]


class _PendingOp(NamedTuple):
    """A validated op waiting for the committer: fence checks happen at commit time."""

    grants: _GrantSet
    op: PreparedOp


class Database:
    def __init__(
        self,
        backend: Backend,
        *,
        batch_max_ops: int = DEFAULT_BATCH_MAX_OPS,
        batch_max_delay_ms: float = DEFAULT_BATCH_MAX_DELAY_MS,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.backend = backend
        self._clock_ms = clock_ms
        # One backend connection: one call at a time, in order, in one thread.
        self._thread = BackendThread(f"keyval-db {backend.description}")
        self._order = trio.Lock()
        self._committer: GroupCommitter[_PendingOp, OpResult] = GroupCommitter(
            self._commit,
            max_items=batch_max_ops,
            max_delay_ms=batch_max_delay_ms,
            max_pending=MAX_PENDING_SUBMISSIONS,
        )
        # 2PC decisions commit in groups of their own, under the same `_order` as write batches.
        self._decisions: GroupCommitter[_PendingDecision, str] = GroupCommitter(
            self._commit_decisions,
            max_items=batch_max_ops,
            max_delay_ms=batch_max_delay_ms,
            max_pending=MAX_PENDING_SUBMISSIONS,
        )
        self._collector = VoteCollector(self._record_decision)
        self._grants = GrantVerifier()  # the grant key, and the grants it verified
        self._fences = FenceTable()
        self._routes: dict[type[Message], tuple[str, Callable[[PeerInfo, Any], Awaitable[Message]]]]
        self._routes = {
            DbWriteBatch: (ROLE_DRONE, self._write_batch),
            DbReadSlot: (ROLE_DRONE, self._read_slot),
            DbReadSlots: (ROLE_DRONE, self._read_slots),
            DbRegisterTerm: (ROLE_COMMANDER, self._register_term),
            DbSaveMap: (ROLE_COMMANDER, self._save_map),
            DbLoadMap: (ROLE_COMMANDER, self._load_map),
            DbGrantKey: (ROLE_COMMANDER, self._grant_key_reply),
            DbTxnVote: (ROLE_DRONE, self._txn_vote),
            DbTxnVoteOp: (ROLE_DRONE, self._txn_vote_op),
            DbDecide: (ROLE_DRONE, self._decide_request),
            DbGetDecision: (ROLE_DRONE, self._get_decision),
        }

    # ------------------------------------------------------------ life cycle

    async def _call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._thread.call(lambda: function(*args, **kwargs))

    async def open(self) -> None:
        """Start the backend thread; connect, create the schema, create or load the grant
        key, load the fences. Raises StorageError."""
        self._thread.start()
        await self._call(self.backend.open)
        key = await self._call(self.backend.ensure_grant_key, secrets.token_bytes(GRANT_KEY_BYTES))
        if len(key) != GRANT_KEY_BYTES:
            raise StorageError(f"stored grant key has {len(key)} bytes, not {GRANT_KEY_BYTES}")
        self._grants.set_key(key)
        self._fences = FenceTable(await self._call(self.backend.load_fences))

    async def aclose(self) -> None:
        """Close the backend and end its thread (after the calls queued before this one)."""
        if not self._thread.running:
            return
        try:
            await self._call(self.backend.close)
        finally:
            self._thread.stop()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer and the op-result expiry, until cancelled. Call `open` first."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._committer.run)
            await nursery.start(self._decisions.run)
            nursery.start_soon(self._purge_op_results_forever)
            task_status.started()

    async def _purge_op_results_forever(self) -> None:
        while True:
            await trio.sleep(OP_RESULT_PURGE_INTERVAL_S)
            cutoff_ms = self._clock_ms() - OP_RESULT_RETENTION_MS
            try:
                purged = await self._call(self.backend.purge_op_results, cutoff_ms)
            except StorageError as error:
                logger.warning("op result expiry failed (retrying later): %s", error)
                continue
            if purged:
                logger.info("forgot %d op results older than one retention period", purged)

    def statistics(self) -> CommitterStatistics:
        return self._committer.statistics()

    # ------------------------------------------------------------ dispatch

    async def handle(self, peer: PeerInfo, request: Message) -> Message:
        route = self._routes.get(type(request))
        if route is None:
            raise BadRequest(f"the db does not serve {request.TYPE!r}")
        role, handler = route
        require_role(peer, role, action=request.TYPE)
        return await handler(peer, request)

    # ------------------------------------------------------------ writes

    async def _write_batch(self, peer: PeerInfo, request: DbWriteBatch) -> DbBatchResult:
        if len(request.grants) > MAX_GRANTS_PER_REQUEST:
            raise TooLarge(f"{len(request.grants)} grants, limit {MAX_GRANTS_PER_REQUEST}")
        prepared = prepare_ops(decode_ops(request.ops))
        grants = self._verify_grants(request.grants, peer.name)
        pending = [_PendingOp(grants, op) for op in prepared if isinstance(op, PreparedOp)]
        committed = iter(await self._committer.submit(pending) if pending else [])
        return DbBatchResult(
            [
                error_result(op) if isinstance(op, ServiceError) else next(committed)
                for op in prepared
            ]
        )

    def _verify_grants(self, grants: Sequence[Grant], drone: str) -> _GrantSet:
        valid: list[Grant] = []
        refused: list[tuple[Grant, Unauthorized]] = []
        for grant in grants:
            try:
                self._grants.verify(grant, drone=drone)
                valid.append(grant)
            except Unauthorized as error:
                refused.append((grant, error))
        return _GrantSet(tuple(valid), tuple(refused))

    async def _commit(self, pending: list[_PendingOp]) -> list[OpResult]:
        """One group-commit batch: fence every op, then store the admitted ones together."""
        async with self._order:
            results: list[OpResult | None] = []
            admitted: list[PreparedOp] = []
            # slot -> the grants (of one request) whose grant for it was last admitted in this
            # batch. Admitting that same grant again changes nothing (the fence already stands
            # at its term and epoch), so a batch checks each (request, slot) pair once, not
            # once per write. Another request's grant admitted for the slot replaces the
            # entry, so a fence it raised is checked again.
            fenced: dict[int, _GrantSet] = {}
            for item in pending:
                grants = item.grants
                try:
                    for write in item.op.writes:
                        if fenced.get(write.slot) is not grants:
                            self._fences.admit(grants.grant_for(write.slot), write.slot)
                            fenced[write.slot] = grants
                    admitted.append(item.op)
                    results.append(None)
                except ServiceError as error:
                    results.append(error_result(error))
            stored = await self._store(admitted)
        return [next(stored) if r is None else r for r in results]

    async def _store(self, admitted: list[PreparedOp]) -> Iterator[OpResult]:
        fences = self._fences.take_pending()
        if not admitted and not fences:
            return iter([])
        try:
            committed = await self._call(
                self.backend.commit_batch, admitted, fences, self._clock_ms()
            )
        except StorageError as error:
            self._fences.return_pending(fences)
            logger.warning("batch of %d ops not stored: %s", len(admitted), error)
            failure = error_result(storage_unavailable(error))
            return iter([failure] * len(admitted))
        return iter(committed)

    # ------------------------------------------------------------ reads

    async def _read_slot(self, peer: PeerInfo, request: DbReadSlot) -> DbSlotPage:
        if not 0 <= request.slot < NUM_SLOTS:
            raise BadRequest(f"slot {request.slot} outside 0..{NUM_SLOTS - 1}")
        if not 1 <= request.limit <= MAX_SLOT_PAGE_ITEMS:
            raise BadRequest(f"limit {request.limit} outside 1..{MAX_SLOT_PAGE_ITEMS}")
        if request.after is not None and len(request.after) > DEFAULT_MAX_KEY_BYTES:
            raise BadRequest("'after' is longer than any key")
        self._grants.verify(request.grant, drone=peer.name)
        async with self._order:
            self._fences.admit(request.grant, request.slot)
            fences = self._fences.take_pending()
            try:
                if fences:  # the raised fence is stored before the data leaves
                    await self._call(self.backend.save_fences, fences)
                items, done = await self._call(
                    self.backend.read_slot,
                    request.slot,
                    request.after,
                    request.limit,
                    SLOT_PAGE_MAX_BYTES,
                )
            except StorageError as error:
                self._fences.return_pending(fences)
                raise storage_unavailable(error) from None
        decoded = [(item.key, codec.decode(item.value), item.version) for item in items]
        return DbSlotPage(decoded, done)

    async def _read_slots(self, peer: PeerInfo, request: DbReadSlots) -> DbSlotsPage:
        first, last = check_slot_span(request)
        after = check_resume_point(request, first, last)
        if not 1 <= request.limit_items <= MAX_SLOT_PAGE_ITEMS:
            raise BadRequest(f"limit_items {request.limit_items} outside 1..{MAX_SLOT_PAGE_ITEMS}")
        if request.limit_bytes < 1:
            raise BadRequest(f"limit_bytes must be positive, not {request.limit_bytes}")
        max_bytes = min(request.limit_bytes, SLOT_PAGE_MAX_BYTES)
        self._grants.verify(request.grant, drone=peer.name)
        # Only the slots still to be read are fenced: those before the resume point were
        # fenced by the pages that read them.
        start = first if after is None else after[0]
        async with self._order:
            self._fences.admit_range(request.grant, start, last)
            fences = self._fences.take_pending()
            try:
                if fences:  # the raised fences are stored before the data leaves
                    await self._call(self.backend.save_fences, fences)
                page = await self._call(
                    self.backend.read_slots, first, last, after, request.limit_items, max_bytes
                )
            except StorageError as error:
                self._fences.return_pending(fences)
                raise storage_unavailable(error) from None
        resume = None if page.done else page.last
        return DbSlotsPage(page.runs, page.keys, page.values, page.versions, resume)

    # ------------------------------------------------------------ commander

    async def _register_term(self, peer: PeerInfo, request: DbRegisterTerm) -> DbTerm:
        if request.term < 1:
            raise BadRequest(f"term must be positive, not {request.term}")
        if request.commander != peer.name:
            raise Unauthorized(
                f"{peer.name!r} may register a term only for itself, not {request.commander!r}"
            )
        try:
            stored = await self._call(self.backend.register_term, peer.name, request.term)
        except StorageError as error:
            raise storage_unavailable(error) from None
        if (stored.term, stored.commander) != (request.term, peer.name):
            raise Fenced(
                f"term {request.term} refused: the current term is {stored.term} "
                f"({stored.commander or 'none'})",
                detail={"term": stored.term, "commander": stored.commander},
            )
        return DbTerm(stored.term, stored.commander)

    async def _save_map(self, peer: PeerInfo, request: DbSaveMap) -> DbMap:
        ranges = check_map_ranges(request.ranges)
        if request.version < 1:
            raise BadRequest(f"map version must be positive, not {request.version}")
        record = MapRecord(request.term, request.version, ranges)
        async with self._order:
            raised = self._fences.for_map(request.term, ranges)
            try:
                outcome = await self._call(self.backend.save_map, peer.name, record, raised)
            except StorageError as error:
                raise storage_unavailable(error) from None
            if outcome.saved:
                self._fences.apply(raised)
        if not outcome.saved:
            current = outcome.current_term
            raise Fenced(
                f"map version {request.version} of term {request.term} by {peer.name!r} "
                f"refused: the current term is {current.term} ({current.commander or 'none'}), "
                f"stored map version {outcome.stored_version}",
                detail={
                    "term": current.term,
                    "commander": current.commander,
                    "version": outcome.stored_version,
                },
            )
        return DbMap(record.term, record.version, list(record.ranges))

    async def _load_map(self, peer: PeerInfo, request: DbLoadMap) -> DbMap:
        try:
            record = await self._call(self.backend.load_map)
        except StorageError as error:
            raise storage_unavailable(error) from None
        if record is None:
            return DbMap(0, 0, [])
        return DbMap(record.term, record.version, list(record.ranges))

    async def _grant_key_reply(self, peer: PeerInfo, request: DbGrantKey) -> DbGrantKeyReply:
        logger.info("handing the grant key to commander %r", peer.name)
        return DbGrantKeyReply(self._grants.key)

    # ------------------------------------------------------------ 2PC decisions

    async def decide(self, txid: bytes, decision: str) -> str:
        """Record `decision` for `txid` unless one exists; return the decision that stands.

        A commit decided here carries no writes: the 2PC path decides commit only through
        votes (db.txn_vote_op, db.txn_vote). This entry point is for tests and for aborts."""
        check_txid(txid)
        if decision not in DECISIONS:
            raise BadRequest(f"decision must be one of {', '.join(DECISIONS)}")
        return await self._collector.decide(txid, decision)

    async def _txn_vote(self, peer: PeerInfo, request: DbTxnVote) -> DbDecision:
        check_txid(request.txid)
        if len(request.writes) > MAX_WRITES_PER_OP:
            raise TooLarge(f"{len(request.writes)} writes in one vote, limit {MAX_WRITES_PER_OP}")
        writes = tuple(prepare_write(write) for write in request.writes)
        return await self._count_vote(peer, request.txid, request, writes)

    async def _txn_vote_op(self, peer: PeerInfo, request: DbTxnVoteOp) -> DbDecision:
        check_txid(request.txid)
        return await self._count_vote(peer, request.txid, request, vote_writes(request))

    async def _count_vote(
        self,
        peer: PeerInfo,
        txid: bytes,
        request: DbTxnVote | DbTxnVoteOp,
        writes: tuple[StoredWrite, ...],
    ) -> DbDecision:
        """Count a checked yes vote (either form) and answer the decision once it stands."""
        participants = check_participants(request.participants, peer.name)
        if writes:
            if request.grant is None:
                raise BadRequest("a vote with writes needs the grant covering their slots")
            self._grants.verify(request.grant, drone=peer.name)
        vote = Vote(request.grant, writes)
        decision = await self._collector.vote(peer.name, txid, participants, vote, request.wait_ms)
        return DbDecision(decision)

    async def _decide_request(self, peer: PeerInfo, request: DbDecide) -> DbDecision:
        if request.decision != DECISION_ABORT:
            raise BadRequest("only abort can be decided directly; commit takes every vote")
        return DbDecision(await self.decide(request.txid, request.decision))

    async def _get_decision(self, peer: PeerInfo, request: DbGetDecision) -> DbDecision:
        check_txid(request.txid)
        try:
            return DbDecision(await self._call(self.backend.get_decision, request.txid))
        except StorageError as error:
            raise storage_unavailable(error) from None

    async def _record_decision(self, txid: bytes, decision: str, votes: dict[str, Vote]) -> str:
        """Store one decision (with the voters' writes for a commit) in the next group."""
        writes = tuple(write for vote in votes.values() for write in vote.writes)
        if decision == DECISION_COMMIT and votes and not writes:
            return DECISION_COMMIT  # read-only: nothing to make durable, no record needed
        fences = tuple(
            (vote.grant, write.slot)
            for vote in votes.values()
            if vote.grant is not None
            for write in vote.writes
        )
        pending = _PendingDecision(DecisionRecord(txid, decision, writes), fences)
        (standing,) = await self._decisions.submit([pending])
        return standing

    async def _commit_decisions(self, pending: list[_PendingDecision]) -> list[str]:
        """One group of decisions: fence every commit's slots (a stale one aborts), store all."""
        async with self._order:
            records = [self._fenced(item) for item in pending]
            fences = self._fences.take_pending()
            try:
                return await self._call(
                    self.backend.commit_decisions, records, fences, self._clock_ms()
                )
            except StorageError as error:
                self._fences.return_pending(fences)
                logger.warning("%d 2PC decisions not stored: %s", len(records), error)
                return [""] * len(records)

    def _fenced(self, item: _PendingDecision) -> DecisionRecord:
        record = item.record
        if record.decision != DECISION_COMMIT:
            return record
        try:
            for grant, slot in item.fences:
                self._fences.admit(grant, slot)
        except ServiceError as error:
            logger.info("2PC transaction %s aborted at commit: %s", record.txid.hex(), error)
            return DecisionRecord(record.txid, DECISION_ABORT, ())
        return record


def check_slot_span(request: DbReadSlots) -> tuple[int, int]:
    """(first, last) of a slot-range read; BadRequest/TooLarge for a bad or too wide range."""
    first, last = request.first, request.last
    if not 0 <= first <= last < NUM_SLOTS:
        raise BadRequest(f"slot range {first}..{last} is not inside 0..{NUM_SLOTS - 1}")
    if last - first + 1 > MAX_READ_SLOTS_SPAN:
        raise TooLarge(
            f"slot range {first}..{last} spans {last - first + 1} slots, "
            f"limit {MAX_READ_SLOTS_SPAN}"
        )
    return first, last


def check_resume_point(request: DbReadSlots, first: int, last: int) -> tuple[int, bytes] | None:
    """The (slot, key) a slot-range read resumes after, or None to start at `first`."""
    if request.after_slot is None:
        if request.after_key is not None:
            raise BadRequest("'after_key' without 'after_slot'")
        return None
    if request.after_key is None:
        raise BadRequest("'after_slot' without 'after_key'")
    if not first <= request.after_slot <= last:
        raise BadRequest(f"after_slot {request.after_slot} is outside {first}..{last}")
    if len(request.after_key) > DEFAULT_MAX_KEY_BYTES:
        raise BadRequest("'after_key' is longer than any key")
    return request.after_slot, request.after_key


def check_txid(txid: bytes) -> None:
    if not 1 <= len(txid) <= MAX_TXID_BYTES:
        raise BadRequest(f"txid must be 1..{MAX_TXID_BYTES} bytes")


def prepare_write(write: DbWrite) -> StoredWrite:
    if len(write.key) > DEFAULT_MAX_KEY_BYTES:
        raise TooLarge(f"key of {len(write.key)} bytes, limit {DEFAULT_MAX_KEY_BYTES}")
    if write.slot != canonical_slot(write.key):
        raise BadRequest(f"key {write.key!r} does not hash to slot {write.slot}")
    if write.version < (0 if write.deleted else 1):
        raise BadRequest(f"bad version {write.version} for key {write.key!r}")
    value = b"" if write.deleted else codec.encode(write.value)
    if len(value) > DEFAULT_MAX_VALUE_BYTES:
        raise TooLarge(f"value of {len(value)} bytes, limit {DEFAULT_MAX_VALUE_BYTES}")
    return StoredWrite(write.slot, write.key, value, write.deleted, write.version)


def check_map_ranges(ranges: Sequence[MapRange]) -> tuple[MapRange, ...]:
    """BadRequest unless ranges are sorted, disjoint, inside the slots, with drone names."""
    check_ranges(tuple((first, last, epoch) for first, last, _drone, epoch in ranges))
    for first, last, drone, _epoch in ranges:
        if not drone:
            raise BadRequest(f"slot range {first}..{last} names no drone")
    return tuple(ranges)


def error_result(error: ServiceError) -> OpResult:
    return (str(error.code), error.message)


def storage_unavailable(error: StorageError) -> Unavailable:
    return Unavailable(str(error), detail={"retry_after_ms": STORAGE_RETRY_AFTER_MS})
