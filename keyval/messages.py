"""Messages of the data path: client <-> drone, drone <-> db, commander <-> drone/db/client.

Conventions: a version is a positive int, 0 means "absent"; keys travel as the user gave them
(str, bytes or int) between client and drone, and as canonical bytes (keyval.keys) between
drone and db; `op_id` is a client-chosen 16-byte id that makes a retried mutation apply once;
`ack` is "durable" (acknowledged once in the db, the default) or "memory" (acknowledged after
the in-memory apply, flushed behind).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from typing import Any

from keyval.grants import Grant
from wire import codec
from wire.messages import Key, Message, message

ACK_DURABLE = "durable"
ACK_MEMORY = "memory"
ACK_MODES = (ACK_DURABLE, ACK_MEMORY)

# ---------------------------------------------------------------- client -> drone


@message("kv.get")
class Get(Message):
    """Read one key."""

    key: Key


@message("kv.get_many")
class GetMany(Message):
    """Read several keys that live on this drone."""

    keys: list[Key]


@message("kv.put")
class Put(Message):
    """Write a key (`op_id` makes a retry apply once; `ack` durable or memory)."""

    key: Key
    value: Any
    op_id: bytes
    ack: str = ACK_DURABLE


@message("kv.delete")
class Delete(Message):
    """Delete a key (idempotent; `op_id` makes a retry apply once)."""

    key: Key
    op_id: bytes
    ack: str = ACK_DURABLE


@message("kv.cas")
class CompareAndSet(Message):
    """Write (or delete) `key` only if its version is `expected_version` (0: must be absent)."""

    key: Key
    expected_version: int
    value: Any
    op_id: bytes
    delete: bool = False
    ack: str = ACK_DURABLE


@message("kv.scan")
class Scan(Message):
    """Keys of one slot (or of every slot this drone holds, when `slot` is None) in key order.

    `prefix` selects keys that start with it (same type as the key); `start`/`end` bound a
    range (start inclusive, end exclusive); `after` resumes after a canonical key (paging)."""

    slot: int | None = None
    prefix: Key | None = None
    start: Key | None = None
    end: Key | None = None
    after: bytes | None = None
    limit: int = 1000


@message("kv.txn_commit")
class TxnCommit(Message):
    """Commit an optimistic transaction whose keys all live on this drone.

    `reads`: (key, version seen; 0 = absent); `writes`: (key, "put"|"del", value)."""

    reads: list[tuple[Key, int]]
    writes: list[tuple[Key, str, Any]]
    op_id: bytes
    ack: str = ACK_DURABLE


# ---------------------------------------------------------------- drone -> client


@message("kv.value")
class ValueReply(Message):
    """A read: found, value, version (0 when absent)."""

    found: bool
    value: Any = None
    version: int = 0


@message("kv.values")
class ValuesReply(Message):
    """Reads of several keys: (found, value, version) each, in request order."""

    items: list[tuple[bool, Any, int]]  # (found, value, version) per requested key


@message("kv.written")
class Written(Message):
    """A write's new version (0 for the delete of an absent key)."""

    version: int  # the new version; for a delete of an absent key, 0
    existed: bool = True


@message("kv.scan_page")
class ScanPage(Message):
    """Keys in order with values and versions; `after` continues the scan."""

    items: list[tuple[Key, Any, int]]  # (key, value, version)
    after: bytes | None = None  # pass back to continue; None when the scan is complete


@message("kv.committed")
class Committed(Message):
    """A transaction committed: the new version of each write, in order."""

    versions: list[int]  # per write, in order


# ---------------------------------------------------------------- drone -> db


@message("db.write")
class DbWrite(Message):
    """One key's new state in a 2PC vote: value or deletion, with its version."""

    slot: int
    key: bytes  # canonical key bytes
    value: Any
    deleted: bool
    version: int


# One op of a db.write_batch, as a flat array: its op id, then four items per write:
# [op_id, slot, key, version, value, slot, key, version, value, ...]. `key` is the canonical
# key bytes; `value` is the CBOR encoding of the new value as bytes (the db stores it as it
# is, never decoding it), or null for a deletion.
WireOp = list[Any]
WIRE_WRITE_ITEMS = 4


def pack_op(op_id: bytes, writes: Iterable[tuple[int, bytes, int, bytes | None]]) -> WireOp:
    """One op of a db.write_batch from (slot, key, version, value CBOR or None) writes."""
    op: WireOp = [op_id]
    for write in writes:
        op.extend(write)
    return op


@message("db.write_batch")
class DbWriteBatch(Message):
    """A drone's group of ops, with the grants that cover every slot written.

    `ops` is one CBOR array, as bytes, of ops each written all together or not at all; an op
    is a flat array `[op_id, slot, key, version, value, ...]` (four items per write; `value`
    the new value's CBOR as bytes, null for a deletion). The db checks it field by field and
    answers a malformed op with BAD_REQUEST naming the op and the field."""

    grants: list[Grant]  # the grants that cover every slot written below
    ops: bytes

    @classmethod
    def of(cls, grants: list[Grant], ops: list[WireOp]) -> DbWriteBatch:
        return cls(grants, codec.encode(ops))


@message("db.batch_result")
class DbBatchResult(Message):
    """Per op of a write batch: ("ok", versions) or (error code, message)."""

    # Per op: ("ok", [versions]) or (error_code, message); a retried op_id answers its first result.
    results: list[tuple[str, Any]]


@message("db.read_slot")
class DbReadSlot(Message):
    """A drone reads one slot (page by page) under its grant, to reseed it."""

    grant: Grant
    slot: int
    after: bytes | None = None
    limit: int = 2000


@message("db.slot_page")
class DbSlotPage(Message):
    """One page of a slot: (canonical key, value, version) in key order."""

    items: list[tuple[bytes, Any, int]]  # (canonical key, value, version) in key order
    done: bool


@message("db.read_slots")
class DbReadSlots(Message):
    """A page of every live key of slots first..last in (slot, key) order, resuming strictly
    after (after_slot, after_key) when given. Every slot of the range is fenced by `grant`."""

    grant: Grant
    first: int
    last: int
    after_slot: int | None = None
    after_key: bytes | None = None
    limit_items: int = 5000
    limit_bytes: int = 768 * 1024


@message("db.slots_page")
class DbSlotsPage(Message):
    """Items in (slot, key) order as columns: `runs` is (slot, item count) per slot with items
    here, in slot order; `keys` (canonical), `values` (CBOR) and `versions` the items in order.
    `next` is the (slot, key) to resume after, None when the range is exhausted. Values stay
    encoded as stored: neither the db nor the drone decodes and re-encodes them (the drone
    checks them all at once and keeps them as they are)."""

    runs: list[tuple[int, int]]
    keys: list[bytes]
    values: list[bytes]
    versions: list[int]
    next: tuple[int, bytes] | None


# ---------------------------------------------------------------- commander -> db


@message("db.register_term")
class DbRegisterTerm(Message):
    """Compare-and-set the commander term forward. Equal term by the same commander is a retry."""

    commander: str
    term: int


@message("db.term")
class DbTerm(Message):
    """The registered commander term and who holds it."""

    term: int
    commander: str


@message("db.save_map")
class DbSaveMap(Message):
    """A commander saves the slot map under its registered term (fenced)."""

    term: int
    version: int
    ranges: list[tuple[int, int, str, int]]  # (first_slot, last_slot, drone, epoch)


@message("db.load_map")
class DbLoadMap(Message):
    """A commander loads the persisted slot map and the registered term."""

    pass


@message("db.map")
class DbMap(Message):
    """The persisted slot map and the term it was saved under."""

    term: int
    version: int
    ranges: list[tuple[int, int, str, int]]


@message("db.grant_key")
class DbGrantKey(Message):
    """A commander fetches the grant key (commander role only)."""

    pass


@message("db.grant_key_reply")
class DbGrantKeyReply(Message):
    """The 32-byte HMAC key grants are made with."""

    key: bytes


# ---------------------------------------------------------------- drone <-> commander


@message("cmd.register")
class Register(Message):
    """A drone joins (role drone; the principal name must equal the drone name)."""

    drone: str
    address: str  # host:port clients use to reach it
    capacity_keys: int = 0  # 0: unknown / unlimited
    # Slots this drone still holds loaded in memory, as READY ranges (first, last, epoch), e.g.
    # after its leader changed: a new commander term that resumes the persisted map keeps the
    # epoch of each slot it reports at exactly the persisted epoch (no reseed). Empty: none.
    held: list[tuple[int, int, int]] = field(default_factory=list)


@message("cmd.registered")
class Registered(Message):
    """The drone's incarnation and the heartbeat period and lease it must keep."""

    incarnation: int
    heartbeat_ms: int
    lease_ms: int


@message("cmd.heartbeat")
class Heartbeat(Message):
    """A drone renews its lease: its load and the ranges it serves."""

    drone: str
    incarnation: int
    load: dict[str, Any]  # keys, bytes, ops_per_s, ...
    ready: list[tuple[int, int, int]]  # ranges (first, last, epoch) loaded and serving
    # The `sent_ms` of the last reply this drone got from this commander (its leader), echoed:
    # the leader's lease on a majority (keyval.commander.election). 0: none.
    ack_ms: int = 0


@message("cmd.heartbeat_reply")
class HeartbeatReply(Message):
    """The drone's whole grant now, the map version, and live-move instructions."""

    grant: Grant  # everything this drone should hold now (may be empty)
    map_version: int
    # Live moves: slots to hand over (freeze, drain, send Released) ...
    release: list[int] = field(default_factory=list)
    # ... and slots coming to this drone (send AwaitGrant to get them at once).
    importing: list[int] = field(default_factory=list)
    sent_ms: int = 0  # the commander's clock when it answered (the drone echoes it: ack_ms)
    # True while the commander has no map saved under its term yet: `grant` is empty and is not
    # a grant at all. The drone keeps its slots as they are (and renews nothing) until a real one.
    provisional: bool = False


@message("cmd.await_grant")
class AwaitGrant(Message):
    """A live move's target: answer (a HeartbeatReply) once none of `slots` is still moving
    to this drone, or after a bounded wait."""

    drone: str
    incarnation: int
    slots: list[int]


@message("cmd.released")
class Released(Message):
    """A live move's source: `slot` (held under `epoch`) is frozen and its writes durable."""

    drone: str
    incarnation: int
    slot: int
    epoch: int


@message("cmd.slot_moved")
class SlotMoved(Message):
    """Answer to Released: the map carrying the move is saved."""

    slot: int
    epoch: int
    owner: str
    address: str
    version: int


# ---------------------------------------------------------------- anyone -> commander


@message("cmd.get_map")
class GetMap(Message):
    """Ask for the slot map (any role)."""

    known_version: int = 0


@message("cmd.map")
class SlotMap(Message):
    """The slot map as ranges (first, last, drone, epoch), drone addresses, version, term,
    leader."""

    term: int
    version: int
    ranges: list[tuple[int, int, str, int]]  # (first, last, drone, epoch); gaps have no owner
    drones: dict[str, str]  # drone name -> address
    leader: str = ""


# ---------------------------------------------------------------- admin -> commander


@message("cmd.drain")
class Drain(Message):
    """Move every slot off `drone` (maintenance). Admin role only."""

    drone: str


@message("cmd.move")
class MoveSlot(Message):
    """Give `slot` to `drone` (a handover: the old owner's lease ends first). Admin role only."""

    slot: int
    drone: str


@message("cmd.rebalance")
class Rebalance(Message):
    """Move slots so every live, non-draining drone holds its fair share. Admin role only."""


@message("cmd.map_change")
class MapChange(Message):
    """The map version that carries the requested change (saved, or about to be)."""

    version: int


# ---------------------------------------------------------------- admin -> commander: status


@message("cmd.status")
class StatusRequest(Message):
    """What the commander knows of the cluster's health (keyval admin status). Read-only."""

    # False: only the acting leader answers (others: NOT_LEADER). True: any commander answers
    # with its own election view (role, term, leader it knows): "each commander's view".
    local: bool = False


@message("cmd.drone_status")
class DroneStatus(Message):
    """One drone as the commander sees it: address, incarnation, last heartbeat, slots, load."""

    name: str
    address: str
    incarnation: int
    last_heartbeat_ms_ago: int  # since the commander received this drone's last heartbeat
    draining: bool
    slots: int  # slots the saved map gives this drone
    load: dict[str, Any]  # the drone's last heartbeat load: keys, bytes, ops_per_s, ...


@message("cmd.status_reply")
class ClusterStatus(Message):
    """Cluster status: term, leader, map version, every drone's status, commanders' views."""

    term: int
    leader: str  # the answering commander's name (it leads: only the leader answers)
    phase: str  # "waiting" | "resuming" | "running" (keyval.commander.state.Phase values)
    map_version: int  # the saved map's version
    drones: list[DroneStatus]  # every registered drone, live or draining, by name
    commander: str = ""  # the answering commander (a standby answers with its own view)
    role: str = "leader"  # its election role: "leader" | "candidate" | "follower"
    votes: int = 0  # votes it holds in `term` (candidate or leader)
    electorate: int = 0  # enabled drones the authority knows (a majority of them elects)


# ---------------------------------------------------------------- drone <-> commander: election


@message("cmd.ballot")
class Ballot(Message):
    """A leaderless drone's report to a commander: the newest term it knows and whom it voted
    for in it ("" nobody). Naming this commander in its candidate term is the vote itself."""

    drone: str
    term: int
    voted_for: str
    ack_ms: int = 0  # the last sent_ms this commander gave the drone, if it supports it


@message("cmd.ballot_reply")
class BallotReply(Message):
    """A commander's answer to a ballot: its term, role and the leader it knows."""

    commander: str
    role: str  # "leader" | "candidate" | "follower"
    term: int  # its term (the highest it has seen)
    leader: str  # who leads that term, when known ("" otherwise)
    votes: int  # votes it holds in `term`
    sent_ms: int  # its clock when it answered


# ---------------------------------------------------------------- cross-drone transactions (2PC)
#
# The client sends kv.txn_prepare to every participant drone; each validates and locks its keys,
# then votes to the db (db.txn_vote) and waits. The db commits the decision record and every
# participant's writes in one transaction once all have voted (or records abort at the deadline),
# and answers each voter. See docs/transactions.md.


@message("kv.txn_prepare")
class TxnPrepare(Message):
    """This drone's part of a transaction across `participants` (drone names, sorted).

    `txid` (16 random bytes) names the transaction everywhere; `time_left_ms` is what remains of
    the transaction's time bound. Answered with kv.committed (versions of this drone's writes)
    once the decision is durable, or CONFLICT when it aborted."""

    txid: bytes
    participants: list[str]
    reads: list[tuple[Key, int]]
    writes: list[tuple[Key, str, Any]]
    time_left_ms: int


@message("kv.txn_abort")
class TxnAbort(Message):
    """Abort `txid` unless it is already decided; answered with the decision that stands."""

    txid: bytes


@message("kv.txn_outcome")
class TxnOutcome(Message):
    """The outcome of a two-phase-commit transaction at this participant."""

    decision: str  # "commit" | "abort"


@message("db.txn_vote")
class DbTxnVote(Message):
    """A participant's yes vote: its keys are locked and its reads valid. `writes` are its
    writes with the versions it assigned; `grant` covers their slots. Answered with the
    decision once it is durable (commit) or taken (abort, after `wait_ms` without all votes)."""

    txid: bytes
    participants: list[str]
    grant: Grant | None
    writes: list[DbWrite]
    wait_ms: int


@message("db.decide")
class DbDecide(Message):
    """Record `decision` for `txid` unless one exists (compare-and-set); answers what stands."""

    txid: bytes
    decision: str


@message("db.get_decision")
class DbGetDecision(Message):
    """Ask for a transaction's decision without deciding it."""

    txid: bytes


@message("db.decision")
class DbDecision(Message):
    """The decision that stands for a two-phase-commit transaction: commit or abort."""

    decision: str  # "commit" | "abort" | "" (none recorded)


@message("db.txn_vote_op")
class DbTxnVoteOp(Message):
    """db.txn_vote with the writes as one op of a db.write_batch (`pack_op`: the txid, then
    slot, key, version and the value's CBOR as bytes, null for a deletion, per write), the
    whole op CBOR-encoded as `op`. The db checks it field by field as it checks a write batch
    and stores the values as they come, never decoding them. What drones send since it was
    added; db.txn_vote stays served. Answered like db.txn_vote."""

    txid: bytes
    participants: list[str]
    grant: Grant | None
    op: bytes
    wait_ms: int
