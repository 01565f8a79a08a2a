"""Live slot moves, the drone's side (docs/design.md, "Live moves").

As the SOURCE (a heartbeat reply lists the slot in `release`): freeze the slot (requests get
UNAVAILABLE with a few ms retry hint), wait until every write already handed a version for it
is durable in the db, then send Released. Once the commander has taken that, the slot is never
served again under that epoch: its data is dropped and requests get MOVED to the new owner.

As the TARGET (a heartbeat reply lists the slot in `importing`): long-poll the commander with
AwaitGrant; its answer carries the grant with the slot under the new epoch as soon as the map
is saved, and the slot is reseeded from the db (which holds every durable write) and served.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from keyval.drone.reseed import Reseeder
from keyval.drone.state import DroneState
from keyval.messages import AwaitGrant, HeartbeatReply, Released, SlotMoved
from wire.errors import ErrorCode, Internal, ServiceError, WireError

if TYPE_CHECKING:
    from keyval.drone.heartbeat import Heartbeater

log = logging.getLogger("keyval.drone")

# How long the source waits for the slot's pending writes to become durable before it gives up
# the release (and serves the slot again): a db batch takes milliseconds.
DRAIN_TIMEOUT_MS = 2000

# Request timeouts for the move's long polls: past the commander's own bound (1 s).
MOVE_REQUEST_TIMEOUT_MS = 3000

# Error codes on Released that mean "the commander did not take it": serve the slot again.
REFUSED_CODES = (ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND)


class Migrator:
    """Carries out the `release` and `importing` lists of heartbeat replies."""

    def __init__(self, state: DroneState, reseeder: Reseeder, heartbeater: Heartbeater) -> None:
        self.state = state
        self.reseeder = reseeder
        self.heartbeater = heartbeater
        self._releasing: set[int] = set()
        self._awaiting: set[int] = set()
        self.handover_ms: list[float] = []  # freeze -> commander's answer, per release

    def on_reply(self, reply: HeartbeatReply, nursery: trio.Nursery) -> None:
        for slot in reply.release:
            if slot not in self._releasing:
                epoch = self.state.table.begin_release(slot)
                if epoch is not None:
                    self._releasing.add(slot)
                    nursery.start_soon(self._release, slot, epoch)
        waiting = [slot for slot in reply.importing if slot not in self._awaiting]
        if waiting:
            self._awaiting.update(waiting)
            nursery.start_soon(self._await_grant, waiting, nursery)

    async def _release(self, slot: int, epoch: int) -> None:
        frozen_at = self.state.now()
        try:
            if not await self._drain(slot):
                log.warning("slot %d: pending writes did not drain; not releasing", slot)
                self.state.table.cancel_release(slot, epoch)
                return
            incarnation = self.heartbeater.incarnation
            if incarnation is None:
                raise Internal("release before registering")
            request = Released(self.state.name, incarnation, slot, epoch)
            try:
                reply = await self.heartbeater.link.request(
                    request, timeout=MOVE_REQUEST_TIMEOUT_MS / 1000
                )
            except ServiceError as error:
                if error.code in REFUSED_CODES:
                    log.info("slot %d: release refused: %s", slot, error.message)
                    self.state.table.cancel_release(slot, epoch)
                    return
                raise
            if not isinstance(reply, SlotMoved):
                raise Internal(f"commander answered Released with {reply.TYPE}")
            self._hand_over(slot, epoch, reply)
            self.handover_ms.append((self.state.now() - frozen_at) * 1000)
        except WireError as error:
            # The commander may have taken it: stay frozen; the next grant settles it (a new
            # epoch for this slot clears the freeze, or the lease lapses).
            log.warning("slot %d: release outcome unknown: %s", slot, error)
        finally:
            self._releasing.discard(slot)

    async def _drain(self, slot: int) -> bool:
        """Wait until no write of `slot` is pending (every acknowledged write is in the db)."""
        with trio.move_on_after(DRAIN_TIMEOUT_MS / 1000):
            while keys := self.state.pending.keys_in_slot(slot):
                await self.state.pending.wait_clear(keys)
            return True
        return False

    def _hand_over(self, slot: int, epoch: int, moved: SlotMoved) -> None:
        if self.state.table.finish_release(slot, epoch):
            self.state.store.drop_slot(slot)
        if moved.owner and moved.owner != self.state.name:
            self.state.table.note_owner(slot, moved.owner, moved.address, moved.epoch)

    async def _await_grant(self, slots: list[int], nursery: trio.Nursery) -> None:
        try:
            incarnation = self.heartbeater.incarnation
            if incarnation is None:
                return
            sent_at = self.state.now()
            reply = await self.heartbeater.link.request(
                AwaitGrant(self.state.name, incarnation, slots),
                timeout=MOVE_REQUEST_TIMEOUT_MS / 1000,
            )
            if not isinstance(reply, HeartbeatReply):
                raise Internal(f"commander answered AwaitGrant with {reply.TYPE}")
            self.heartbeater.take_reply(reply, sent_at, nursery)
        except WireError as error:
            log.info("waiting for moved slots %s failed: %s", slots[:8], error)
        finally:
            self._awaiting.difference_update(slots)
