"""The db's 2PC decisions: votes, the commit point with its writes, abort by CAS, bad input."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest
import trio

from keyval.db.decisions import MAX_PARTICIPANTS, MAX_VOTE_WAIT_MS
from keyval.db.service import Database
from keyval.keys import canonical_key, key_slot
from keyval.messages import (
    DbDecide,
    DbDecision,
    DbGetDecision,
    DbReadSlot,
    DbSlotPage,
    DbTxnVote,
    DbTxnVoteOp,
    DbWrite,
    pack_op,
)
from tests.db.conftest import CLIENT, DRONE, OTHER_DRONE, grant_key, make_grant
from tests.twopc.harness import AUTOJUMP_S, CLOCK_SLACK_S
from wire import codec
from wire.errors import BadRequest, TooLarge, Unauthorized

ALL = ((0, 16383, 1),)
PARTICIPANTS = ["drone-1", "drone-2"]


def write(key: str, value: object, version: int) -> DbWrite:
    return DbWrite(key_slot(key), canonical_key(key), value, False, version)


async def stored(database: Database, key: str) -> tuple[object, int] | None:
    grant = make_grant(await grant_key(database), ALL)
    page = await database.handle(DRONE, DbReadSlot(grant, key_slot(key)))
    assert isinstance(page, DbSlotPage)
    return next(((v, ver) for k, v, ver in page.items if k == canonical_key(key)), None)


async def vote(database: Database, txid: bytes, drone: str, key: str, wait_ms: int = 5000) -> str:
    peer = DRONE if drone == "drone-1" else OTHER_DRONE
    grant = make_grant(await grant_key(database), ALL, drone=drone)
    msg = DbTxnVote(txid, PARTICIPANTS, grant, [write(key, drone, 7)], wait_ms)
    reply = await database.handle(peer, msg)
    assert isinstance(reply, DbDecision)
    return reply.decision


async def after_a_first_vote(
    database: Database, txid: bytes, last: Callable[[], Awaitable[str]]
) -> list[str]:
    """drone-1 votes (writing x) in the background; once it waits, `last` votes: both answers."""
    decisions: list[str] = []
    async with trio.open_nursery() as nursery:

        async def first() -> None:
            decisions.append(await vote(database, txid, "drone-1", "x"))

        nursery.start_soon(first)
        await trio.sleep(0.1)
        assert await stored(database, "x") is None  # nothing before every vote is in
        decisions.append(await last())
    return decisions


async def test_the_last_vote_commits_every_write_at_once(database: Database) -> None:
    txid = os.urandom(16)
    decisions = await after_a_first_vote(
        database, txid, lambda: vote(database, txid, "drone-2", "y")
    )
    assert decisions == ["commit", "commit"]
    assert await stored(database, "x") == ("drone-1", 7)
    assert await stored(database, "y") == ("drone-2", 7)
    reply = await database.handle(DRONE, DbGetDecision(txid))
    assert isinstance(reply, DbDecision) and reply.decision == "commit"
    # An abort asked for afterwards (a late recovery) finds the commit standing.
    reply = await database.handle(OTHER_DRONE, DbDecide(txid, "abort"))
    assert isinstance(reply, DbDecision) and reply.decision == "commit"


async def test_a_missing_vote_aborts_at_the_deadline(
    database: Database, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = AUTOJUMP_S  # SQLite works in a thread: see the harness
    txid = os.urandom(16)
    started = trio.current_time()
    assert await vote(database, txid, "drone-1", "x", wait_ms=2000) == "abort"
    assert 2.0 <= trio.current_time() - started < 2.0 + CLOCK_SLACK_S
    assert await stored(database, "x") is None
    # The straggler's vote finds the abort (by the record or by its own deadline).
    assert await vote(database, txid, "drone-2", "y", wait_ms=100) == "abort"
    assert await stored(database, "y") is None


async def test_an_abort_closes_an_open_ballot_at_once(database: Database) -> None:
    txid = os.urandom(16)
    async with trio.open_nursery() as nursery:

        async def first() -> None:
            assert await vote(database, txid, "drone-1", "x", wait_ms=60_000) == "abort"

        nursery.start_soon(first)
        await trio.sleep(0.1)
        reply = await database.handle(OTHER_DRONE, DbDecide(txid, "abort"))
        assert isinstance(reply, DbDecision) and reply.decision == "abort"
    assert await stored(database, "x") is None


async def test_a_stale_grant_turns_the_commit_into_abort(database: Database) -> None:
    key = await grant_key(database)
    newer = make_grant(key, ((0, 16383, 2),), drone="drone-2")
    await database.handle(OTHER_DRONE, DbReadSlot(newer, key_slot("x")))  # raises x's fence
    txid = os.urandom(16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vote, database, txid, "drone-1", "x")  # epoch 1: now stale
        await trio.sleep(0.1)
        nursery.start_soon(vote, database, txid, "drone-2", "y")
    reply = await database.handle(DRONE, DbGetDecision(txid))
    assert isinstance(reply, DbDecision) and reply.decision == "abort"
    assert await stored(database, "y") is None


async def test_disagreeing_participant_lists_abort(database: Database) -> None:
    txid = os.urandom(16)
    grant = make_grant(await grant_key(database), ALL, drone="drone-2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vote, database, txid, "drone-1", "x")
        await trio.sleep(0.1)
        other = DbTxnVote(txid, ["drone-2", "drone-3"], grant, [write("y", 1, 7)], 5000)
        reply = await database.handle(OTHER_DRONE, other)
        assert isinstance(reply, DbDecision) and reply.decision == "abort"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"txid": b""}, BadRequest),
        ({"txid": b"x" * 65}, BadRequest),
        ({"participants": ["drone-1"]}, BadRequest),
        ({"participants": ["drone-2", "drone-1"]}, BadRequest),
        ({"participants": ["drone-1", "drone-1"]}, BadRequest),
        ({"participants": ["drone-2", "drone-3"]}, BadRequest),
        ({"participants": [f"d{i:03}" for i in range(MAX_PARTICIPANTS + 1)]}, BadRequest),
        ({"wait_ms": 0}, BadRequest),
        ({"wait_ms": MAX_VOTE_WAIT_MS + 1}, BadRequest),
        ({"grant": None}, BadRequest),
        ({"writes": [DbWrite(1, canonical_key("x"), 1, False, 7)]}, BadRequest),
        ({"forged": True}, Unauthorized),
    ],
)
async def test_bad_votes_are_refused(
    database: Database, change: dict[str, object], error: type[Exception]
) -> None:
    change = dict(change)  # the parameter is shared between the backends' runs
    grant = make_grant(await grant_key(database), ALL)
    if change.pop("forged", False):
        grant = make_grant(b"k" * 32, ALL)
    fields: dict[str, object] = {
        "txid": os.urandom(16),
        "participants": PARTICIPANTS,
        "grant": grant,
        "writes": [write("x", 1, 7)],
        "wait_ms": 1000,
    }
    fields.update(change)
    with pytest.raises(error):
        await database.handle(DRONE, DbTxnVote(**fields))  # type: ignore[arg-type]


async def test_only_drones_decide_and_only_abort(database: Database) -> None:
    txid = os.urandom(16)
    with pytest.raises(BadRequest):
        await database.handle(DRONE, DbDecide(txid, "commit"))  # commit takes every vote
    with pytest.raises(BadRequest):
        await database.handle(DRONE, DbDecide(b"", "abort"))
    for request in (DbDecide(txid, "abort"), DbGetDecision(txid)):
        with pytest.raises(Unauthorized):
            await database.handle(CLIENT, request)
    reply = await database.handle(DRONE, DbGetDecision(txid))
    assert isinstance(reply, DbDecision) and reply.decision == ""


def vote_op(
    txid: bytes, grant: object, writes: list[tuple[str, object | None, int]], wait_ms: int = 5000
) -> DbTxnVoteOp:
    """A db.txn_vote_op writing (key, value or None for a deletion, version) each."""
    op = pack_op(
        txid,
        [
            (key_slot(k), canonical_key(k), v, None if value is None else codec.encode(value))
            for k, value, v in writes
        ],
    )
    return DbTxnVoteOp(txid, PARTICIPANTS, grant, codec.encode(op), wait_ms)  # type: ignore[arg-type]


async def test_a_vote_op_commits_with_a_vote_of_the_older_form(database: Database) -> None:
    grant = make_grant(await grant_key(database), ALL, drone="drone-2")
    txid = os.urandom(16)

    async def last() -> str:
        msg = vote_op(txid, grant, [("y", {"n": [1, 2]}, 9), ("z", None, 9)])
        reply = await database.handle(OTHER_DRONE, msg)
        assert isinstance(reply, DbDecision)
        return reply.decision

    assert await after_a_first_vote(database, txid, last) == ["commit", "commit"]
    assert await stored(database, "x") == ("drone-1", 7)
    assert await stored(database, "y") == ({"n": [1, 2]}, 9)
    assert await stored(database, "z") is None  # a deletion stores no value


async def test_a_vote_op_with_no_writes_needs_no_grant(database: Database) -> None:
    txid = os.urandom(16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vote, database, txid, "drone-1", "x")
        await trio.sleep(0.1)
        reply = await database.handle(OTHER_DRONE, vote_op(txid, None, []))
        assert isinstance(reply, DbDecision) and reply.decision == "commit"
    assert await stored(database, "x") == ("drone-1", 7)


def _op_bytes(*items: object) -> bytes:
    return codec.encode(list(items))


TXID = b"t" * 16
X_SLOT, X_KEY = key_slot("x"), canonical_key("x")


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (b"\xff", BadRequest),  # not CBOR
        (codec.encode({"op": 1}), BadRequest),  # not an array
        (_op_bytes(), BadRequest),  # no op id
        (_op_bytes(b"u" * 16, X_SLOT, X_KEY, 7, codec.encode(1)), BadRequest),  # not the txid
        (_op_bytes(TXID, X_SLOT, X_KEY, 7), BadRequest),  # three items for a write
        (_op_bytes(TXID, X_SLOT + 1, X_KEY, 7, codec.encode(1)), BadRequest),  # wrong slot
        (_op_bytes(TXID, X_SLOT, X_KEY, 0, codec.encode(1)), BadRequest),  # version 0
        (_op_bytes(TXID, X_SLOT, X_KEY, 7, b"\xff"), BadRequest),  # value not CBOR
        (_op_bytes(TXID, X_SLOT, X_KEY, 7, "text"), BadRequest),  # value not bytes
        (_op_bytes(TXID, X_SLOT, b"k" * 100_000, 7, codec.encode(1)), TooLarge),
    ],
)
async def test_bad_vote_ops_are_refused(
    database: Database, op: bytes, error: type[Exception]
) -> None:
    grant = make_grant(await grant_key(database), ALL)
    msg = DbTxnVoteOp(TXID, PARTICIPANTS, grant, op, 1000)
    with pytest.raises(error):
        await database.handle(DRONE, msg)
    reply = await database.handle(DRONE, DbGetDecision(TXID))
    assert isinstance(reply, DbDecision) and reply.decision == ""  # nothing was counted


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"participants": ["drone-2", "drone-3"]}, BadRequest),
        ({"grant": None}, BadRequest),
        ({"forged": True}, Unauthorized),
    ],
)
async def test_vote_ops_are_checked_like_votes(
    database: Database, change: dict[str, object], error: type[Exception]
) -> None:
    change = dict(change)
    grant = make_grant(await grant_key(database), ALL)
    if change.pop("forged", False):
        grant = make_grant(b"k" * 32, ALL)
    msg = vote_op(TXID, change.get("grant", grant), [("x", 1, 7)], wait_ms=1000)
    if "participants" in change:
        msg = DbTxnVoteOp(msg.txid, change["participants"], msg.grant, msg.op, 1000)  # type: ignore[arg-type]
    with pytest.raises(error):
        await database.handle(DRONE, msg)
