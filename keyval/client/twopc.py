"""The coordinator of a transaction whose keys live on several drones (two-phase commit).

The client library is the coordinator; the commit point is a decision record in the db (see
keyval.drone.twopc and keyval.db.decisions, and docs/transactions.md). `commit_across`:

1. splits the read and write sets by owning drone and picks a fresh txid;
2. sends kv.txn_prepare to every participant at once, with what is left of the transaction's
   time bound; each participant validates, locks, votes to the db and answers only once the
   decision stands: kv.committed (the decision is durable) or CONFLICT (aborted);
3. if a participant cannot be reached, asks another to abort (kv.txn_abort: compare-and-set
   in the db), so the others are released at once; the answer is the decision that stands.

Outcomes: every participant committed, or one did and the others were cut off -> committed
(versions of writes on a drone that did not answer are reported as 0); aborted because a read
changed or a key was locked -> Conflict (safe to re-run: nothing was applied); aborted because
a slot moved or a drone was unreachable -> retried with a new txid and the fresh slot map
while the time bound lasts; no participant reachable to learn the decision -> CommitUnknown.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import trio

from keyval.client.errors import NoOwner
from keyval.client.policy import Attempts
from keyval.client.router import Router
from keyval.client.routing import Route
from keyval.keys import key_slot
from keyval.messages import Committed, TxnAbort, TxnOutcome, TxnPrepare
from wire.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Internal,
    Moved,
    ServiceError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from wire.messages import Key, Message

TXID_BYTES = 16  # random, like op ids: collisions between clients are out of reach

# Transactions are time-bounded like FoundationDB's (5 s): the participants hold locks at most
# this long past a client crash (plus the drone's VOTE_MARGIN_MS). Configurable per client.
DEFAULT_TIME_BOUND_MS = 5000

# The client waits for a participant's answer this much past the time bound: the db decides
# abort at the deadline, and a participant recovers within its own 1 s margin after it.
ANSWER_MARGIN_MS = 2000

# Tries of one prepare: a retry (same txid) covers a dropped connection; a drone that stays
# unreachable fails the attempt fast, so the others are released and the commit re-routed.
PREPARE_ATTEMPTS = 3

DECISION_COMMIT = "commit"
DECISION_ABORT = "abort"


# Answers by which a participant refused the request before voting: no commit is possible.
REFUSALS = (BadRequest, Unauthorized, Forbidden, TooLarge)


class CommitUnknown(Unavailable):
    """No participant could be asked whether the transaction committed. It committed on all of
    its drones or on none; read the keys to find out (FoundationDB's commit_unknown_result)."""


class TransactionTooOld(Timeout):
    """The transaction's time bound passed before it could commit; nothing was applied."""


@dataclasses.dataclass
class _Part:
    route: Route
    reads: list[tuple[Key, int]] = dataclasses.field(default_factory=list)
    writes: list[tuple[Key, str, Any]] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)  # in the whole write list


class _Retry(Exception):
    """An attempt aborted for a reason a new attempt may not meet (a move, a lost drone)."""


def split_now(
    router: Router, reads: Sequence[tuple[Key, int]], writes: Sequence[tuple[Key, str, Any]]
) -> dict[str, _Part] | None:
    """`split_by_drone` from the slot map in hand, with no await; None when the client has
    no map yet or a key's slot has no owner in it (the async path then fetches the map)."""
    table = router.table
    if table is None:
        return None
    parts: dict[str, _Part] = {}
    for key, version in reads:
        route = table.route(key_slot(key))
        if route is None:
            return None
        part = parts.get(route.drone)
        if part is None:
            part = parts[route.drone] = _Part(route)
        part.reads.append((key, version))
    for position, write in enumerate(writes):
        route = table.route(key_slot(write[0]))
        if route is None:
            return None
        part = parts.get(route.drone)
        if part is None:
            part = parts[route.drone] = _Part(route)
        part.writes.append(write)
        part.positions.append(position)
    return parts


async def split_by_drone(
    router: Router,
    reads: Sequence[tuple[Key, int]],
    writes: Sequence[tuple[Key, str, Any]],
    attempts: Attempts,
) -> dict[str, _Part]:
    parts: dict[str, _Part] = {}

    async def part_of(key: Key) -> _Part:
        route = await router.route(key_slot(key), attempts)
        return parts.setdefault(route.drone, _Part(route))

    for key, version in reads:
        (await part_of(key)).reads.append((key, version))
    for position, write in enumerate(writes):
        part = await part_of(write[0])
        part.writes.append(write)
        part.positions.append(position)
    return parts


async def commit_across(
    router: Router,
    reads: Sequence[tuple[Key, int]],
    writes: Sequence[tuple[Key, str, Any]],
    deadline: float,
    parts: dict[str, _Part] | None = None,
) -> list[int] | None:
    """Commit across drones before `deadline` (trio clock): the versions of `writes` in order,
    or None when the keys now all live on one drone (the caller commits in one step).
    `parts`: the split the caller already made from the current map (`split_now`)."""
    attempts = router.start()
    while True:
        time_left_ms = int((deadline - trio.current_time()) * 1000)
        if time_left_ms <= 0:
            raise TransactionTooOld("the transaction's time bound passed before it committed")
        if parts is None:
            try:
                parts = await split_by_drone(router, reads, writes, attempts)
            except NoOwner:  # a map older than the slots' assignment (fetched at connect)
                await router.refresh(attempts, seen=router.refreshes)
                parts = await split_by_drone(router, reads, writes, attempts)
        if len(parts) < 2:
            return None
        try:
            return await _attempt(router, parts, len(writes), time_left_ms)
        except _Retry as retry:
            cause = retry.__cause__
            if isinstance(cause, Moved):
                await router.classify(cause, attempts, allow_ask=False)
            else:  # a drone unreachable: its slots may have moved on since the map was read
                await router.refresh(attempts, seen=router.refreshes)
            pause = attempts.next_pause_s(trio.current_time(), router.rng)
            if pause is None:
                raise Unavailable(f"cross-drone commit kept failing: {cause}") from cause
            await trio.sleep(pause)
            parts = None  # split again with the map as it is now


async def _attempt(
    router: Router, parts: dict[str, _Part], write_count: int, time_left_ms: int
) -> list[int]:
    txid = os.urandom(TXID_BYTES)
    participants = sorted(parts)
    answers: dict[str, Message | ServiceError] = {}
    decided: list[str] = []
    wait_s = (time_left_ms + ANSWER_MARGIN_MS) / 1000
    policy = dataclasses.replace(
        router.policy, request_timeout_s=wait_s, max_attempts=PREPARE_ATTEMPTS
    )

    async def prepare(drone: str, part: _Part) -> None:
        msg = TxnPrepare(
            txid=txid,
            participants=participants,
            reads=part.reads,
            writes=part.writes,
            time_left_ms=time_left_ms,
        )
        attempts = Attempts(policy=policy, deadline=trio.current_time() + wait_s)
        try:
            answers[drone] = await router.call_at(part.route, msg, attempts)
        except ServiceError as error:
            answers[drone] = error
            if not isinstance(error, Conflict):  # release the others now, learn the outcome
                outcome = await _abort(router, txid, [parts[d] for d in participants])
                if outcome:
                    decided.append(outcome)

    async with trio.open_nursery() as nursery:
        for drone in participants[1:]:
            nursery.start_soon(prepare, drone, parts[drone])
        await prepare(participants[0], parts[participants[0]])  # in this task: one spawn less
    return _outcome(parts, answers, decided, write_count)


def _outcome(
    parts: dict[str, _Part],
    answers: dict[str, Message | ServiceError],
    decided: list[str],
    write_count: int,
) -> list[int]:
    versions = [0] * write_count
    committed = DECISION_COMMIT in decided
    for drone, answer in answers.items():
        if isinstance(answer, Committed):
            committed = True
            if len(answer.versions) != len(parts[drone].writes):
                raise Internal(f"{drone} answered {len(answer.versions)} versions")
            for position, version in zip(parts[drone].positions, answer.versions, strict=True):
                versions[position] = version
        elif isinstance(answer, Message):
            raise Internal(f"{drone} answered kv.txn_prepare with {answer.TYPE}")
    if committed:
        return versions
    errors = [a for a in answers.values() if isinstance(a, ServiceError)]
    refusals = [e for e in errors if isinstance(e, (Conflict, *REFUSALS))]
    unreachable = [e for e in errors if not isinstance(e, (Conflict, *REFUSALS))]
    if unreachable and DECISION_ABORT in decided:
        # We aborted because a drone did not answer (the others then report Conflict):
        # nothing applied; re-route and try again.
        raise _Retry("aborted: a participant did not answer") from unreachable[0]
    if refusals:  # a participant voted no or refused: nothing committed
        # A refusal (bad input, permission) is the cause; the others' Conflict follows from it.
        refused = next((e for e in refusals if not isinstance(e, Conflict)), None)
        raise refused or refusals[0]
    raise CommitUnknown(
        "no participant could tell whether the transaction committed",
        detail={"errors": [e.message for e in errors]},
    ) from errors[0]


async def _abort(router: Router, txid: bytes, parts: list[_Part]) -> str:
    """Ask participants, one after another, to abort; the standing decision, "" if none could."""
    for part in parts:
        try:
            with trio.fail_after(ANSWER_MARGIN_MS / 1000):
                reply = await router.send(part.route, TxnAbort(txid=txid), router.start())
        except (ServiceError, trio.TooSlowError):
            continue
        if isinstance(reply, TxnOutcome) and reply.decision in (DECISION_COMMIT, DECISION_ABORT):
            return reply.decision
    return ""
