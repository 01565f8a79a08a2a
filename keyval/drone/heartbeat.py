"""Registration and heartbeats: how the drone gets and keeps its grant.

The drone registers with a commander (trying each address in turn), then heartbeats every
`heartbeat_ms` with its load and the ranges it has loaded. Each HeartbeatReply's grant
replaces the held grant and renews the lease from the heartbeat's SEND time (slots.SlotTable).
A commander that does not know the incarnation (NOT_FOUND: it restarted or a new one leads)
makes the drone register again as new. Any other failure moves on to the next commander
address with the same incarnation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from keyval import observe
from keyval.client.config import Endpoint
from keyval.drone.links import Dialer, ServiceLink
from keyval.drone.migrate import Migrator
from keyval.drone.reseed import Reseeder
from keyval.drone.state import DroneState
from keyval.messages import (
    GetMap,
    Heartbeat,
    HeartbeatReply,
    Register,
    Registered,
    SlotMap,
)
from keyval.timing import check_timing
from wire.errors import ErrorCode, Internal, ServiceError, WireError

log = logging.getLogger("keyval.drone")

# Pause after every commander address failed, before trying the list again.
REGISTER_RETRY_MS = 100

# A register or get_map request: the commander answers from memory.
COMMANDER_TIMEOUT_MS = 2000


class Heartbeater:
    """Keeps this drone registered and its grant fresh."""

    def __init__(
        self,
        state: DroneState,
        reseeder: Reseeder,
        commanders: Sequence[Endpoint],
        dial: Dialer,
        address: str,
    ) -> None:
        if not commanders:
            raise ValueError("a drone needs at least one commander address")
        self.state = state
        self.reseeder = reseeder
        self.links = [ServiceLink(dial, c.address, c.name) for c in commanders]
        self.address = address
        self._current = 0
        self.incarnation: int | None = None
        self.heartbeat_ms = 0
        self.lease_ms = 0
        self.map_version = 0
        self.heartbeats_sent = 0
        self._refreshing = False
        self.migrator = Migrator(state, reseeder, self)

    @property
    def link(self) -> ServiceLink:
        return self.links[self._current]

    def _next_commander(self) -> None:
        self._current = (self._current + 1) % len(self.links)

    async def run(self, nursery: trio.Nursery) -> None:
        """Register and heartbeat until cancelled. Reseeds run in `nursery`."""
        try:
            while True:
                await self._register()
                await self._heartbeat_until_unknown(nursery)
        finally:
            with trio.CancelScope(shield=True):
                for link in self.links:
                    await link.aclose()

    async def _register(self) -> None:
        request = Register(drone=self.state.name, address=self.address)
        while True:
            for _ in self.links:
                try:
                    reply = await self.link.request(request, timeout=COMMANDER_TIMEOUT_MS / 1000)
                    if not isinstance(reply, Registered):
                        raise Internal(f"commander answered register with {reply.TYPE}")
                    check_timing(reply.heartbeat_ms, reply.lease_ms)
                except (WireError, ValueError) as error:
                    log.info("register with %s failed: %s", self.link.address, error)
                    self._next_commander()
                    continue
                self.incarnation = reply.incarnation
                self.heartbeat_ms, self.lease_ms = reply.heartbeat_ms, reply.lease_ms
                log.info(
                    "registered with %s as incarnation %d", self.link.address, self.incarnation
                )
                return
            await trio.sleep(REGISTER_RETRY_MS / 1000)

    async def _heartbeat_until_unknown(self, nursery: trio.Nursery) -> None:
        """Heartbeat every heartbeat_ms; return when the commander does not know us."""
        while True:
            sent_at = self.state.now()
            try:
                await self.heartbeat_once(sent_at, nursery)
            except ServiceError as error:
                if error.code is ErrorCode.NOT_FOUND:
                    log.info("commander does not know incarnation %s", self.incarnation)
                    return
                log.info("heartbeat to %s failed: %s", self.link.address, error.message)
                observe.current_metrics().lease_renewal_failures.inc()
                self._next_commander()
            await trio.sleep_until(sent_at + self.heartbeat_ms / 1000)

    async def heartbeat_once(self, sent_at: float, nursery: trio.Nursery) -> None:
        if self.incarnation is None:
            raise Internal("heartbeat before registering")
        request = Heartbeat(
            drone=self.state.name,
            incarnation=self.incarnation,
            load=self.state.load(),
            ready=self.state.table.ready_ranges(),
        )
        self.heartbeats_sent += 1
        reply = await self.link.request(request, timeout=self.lease_ms / 1000)
        if not isinstance(reply, HeartbeatReply):
            raise Internal(f"commander answered a heartbeat with {reply.TYPE}")
        self.take_reply(reply, sent_at, nursery)
        observe.current_metrics().lease_renewals.inc()

    def take_reply(self, reply: HeartbeatReply, sent_at: float, nursery: trio.Nursery) -> None:
        """Apply a grant (from a heartbeat or a live move's long poll) sent at `sent_at`."""
        instructions = self.state.table.apply_grant(
            reply.grant, sent_at=sent_at, lease_ms=self.lease_ms
        )
        self.reseeder.carry_out(instructions, nursery)
        self.migrator.on_reply(reply, nursery)
        if reply.map_version != self.map_version and not self._refreshing:
            # In the background: a slow map fetch must never delay the next heartbeat (a
            # missed lease costs the drone every slot).
            self._refreshing = True
            nursery.start_soon(self._refresh_owners, reply.map_version)

    async def _refresh_owners(self, version: int) -> None:
        """Learn who owns the slots this drone does not, for MOVED replies (best effort)."""
        try:
            reply = await self.link.request(GetMap(), timeout=COMMANDER_TIMEOUT_MS / 1000)
        except ServiceError as error:
            log.info("cannot fetch the slot map: %s", error.message)
            return
        finally:
            self._refreshing = False
        if not isinstance(reply, SlotMap):
            return
        for first, last, drone, epoch in reply.ranges:
            if drone == self.state.name:
                continue
            address = reply.drones.get(drone, "")
            for slot in range(first, last + 1):
                self.state.table.note_owner(slot, drone, address, epoch)
        self.map_version = version
