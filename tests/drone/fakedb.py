"""A small in-test stand-in for the db daemon (keyval.dbserver is not written yet).

It obeys the same messages and the rules the drone relies on: the grant key only for role
commander; grants checked by MAC and by the authenticated drone; fences per slot (newest term
and epoch seen); op ids answered with their first result; slot reads in key order, paged.
Replace with keyval.dbserver.run_db once it lands.
"""

from __future__ import annotations

import os
from typing import Any

from keyval.grants import Grant, check_fence, verify_grant
from keyval.messages import (
    DbBatchResult,
    DbGrantKey,
    DbGrantKeyReply,
    DbOp,
    DbReadSlot,
    DbSlotPage,
    DbWriteBatch,
)
from wire.channel import PeerInfo
from wire.errors import BadRequest, ServiceError, Unauthorized
from wire.messages import Message


class FakeDb:
    def __init__(self) -> None:
        self.grant_key = os.urandom(32)
        self.rows: dict[
            tuple[int, bytes], tuple[Any, int, bool]
        ] = {}  # -> (value, version, deleted)
        self.fences: dict[int, tuple[int, int]] = {}  # slot -> (term, epoch)
        self.results: dict[bytes, tuple[str, Any]] = {}
        self.batches: list[DbWriteBatch] = []
        self.refuse_next = 0  # refuse this many batches with a connection-level error
        self.slot_reads = 0

    def _check(self, grant: Grant, slot: int, peer: PeerInfo) -> None:
        verify_grant(grant, self.grant_key, drone=peer.name)
        term, epoch = self.fences.get(slot, (0, 0))
        epoch_now = check_fence(grant, slot, term, epoch)
        self.fences[slot] = (max(term, grant.term), max(epoch, epoch_now))

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message:
        if isinstance(msg, DbGrantKey):
            if peer.role != "commander":
                raise Unauthorized("the grant key is for commanders only")
            return DbGrantKeyReply(key=self.grant_key)
        if peer.role != "drone":
            raise Unauthorized("drones only")
        if isinstance(msg, DbWriteBatch):
            self.batches.append(msg)
            if self.refuse_next:
                self.refuse_next -= 1
                raise BadRequest("refused by the test")
            return DbBatchResult(results=[self._op(msg.grants, op, peer) for op in msg.ops])
        if isinstance(msg, DbReadSlot):
            self.slot_reads += 1
            self._check(msg.grant, msg.slot, peer)
            rows = sorted(
                (key, value, version)
                for (slot, key), (value, version, deleted) in self.rows.items()
                if slot == msg.slot and not deleted and (msg.after is None or key > msg.after)
            )
            page = rows[: msg.limit]
            return DbSlotPage(items=page, done=len(page) == len(rows))
        raise BadRequest(f"fake db does not answer {msg.TYPE}")

    def _op(self, grants: list[Grant], op: DbOp, peer: PeerInfo) -> tuple[str, Any]:
        if op.op_id in self.results:
            return self.results[op.op_id]
        try:
            for write in op.writes:
                grant = next(g for g in grants if g.epoch_of(write.slot) is not None)
                self._check(grant, write.slot, peer)
        except StopIteration:
            return ("FENCED", "no grant covers the slot")
        except ServiceError as error:
            return (str(error.code), error.message)
        for write in op.writes:
            self.rows[(write.slot, write.key)] = (write.value, write.version, write.deleted)
        result: tuple[str, Any] = ("ok", [write.version for write in op.writes])
        self.results[op.op_id] = result
        return result
