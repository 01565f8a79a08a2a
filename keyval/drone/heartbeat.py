"""Leader, registration and heartbeats: how the drone gets and keeps its grant.

The drone first finds its leader: while it has none it ballots every commander
(keyval.drone.vote: it votes for candidates and follows the commander that says it leads).
It registers with the leader, then heartbeats every `heartbeat_ms` with its load, the ranges it
has loaded and the echo of the leader's last reply time (`ack_ms`, the leader's lease). Each
HeartbeatReply's grant replaces the held grant and renews the lease from the heartbeat's SEND
time (slots.SlotTable); a provisional reply (a new leader that has not saved its map yet)
changes nothing. Registering reports the slots still loaded, so a new term can keep them.
A leader that does not know the incarnation (NOT_FOUND) makes the drone register again as new.
A leader that says it no longer leads (NOT_LEADER), or that has not answered for
`vote.LEADER_TIMEOUT_MS`, is dropped for good and the drone ballots again.
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
from keyval.drone.vote import BALLOT_PERIOD_MS, LEADER_TIMEOUT_MS, Reply, Vote, VoteFile, Voter
from keyval.messages import (
    Ballot,
    BallotReply,
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

# The load numbers (key count over every held slot, ...) cost a few ms on a loaded machine; the
# commander uses them for placement and status only, so once a second is fresh enough.
LOAD_REPORT_MS = 1000

# A ballot is answered from memory; a commander slower than this (paused, partitioned) is
# asked again next period. Several ballot periods, well under the leader timeout.
BALLOT_TIMEOUT_MS = 150


class Heartbeater:
    """Keeps this drone registered and its grant fresh."""

    def __init__(
        self,
        state: DroneState,
        reseeder: Reseeder,
        commanders: Sequence[Endpoint],
        dial: Dialer,
        address: str,
        vote_file: VoteFile | None = None,
    ) -> None:
        if not commanders:
            raise ValueError("a drone needs at least one commander address")
        self.state = state
        self.reseeder = reseeder
        self.links = [ServiceLink(dial, c.address, c.name) for c in commanders]
        self.address = address
        self.voter = Voter(state.name, vote_file)
        self._link_of: dict[str, int] = {}  # commander name -> index in links
        self._registered_with: tuple[str, int] | None = None  # (leader, term) we registered
        self._current = 0
        self.incarnation: int | None = None
        self.heartbeat_ms = 0
        self.lease_ms = 0
        self.map_version = 0
        self.heartbeats_sent = 0
        self._refreshing = False
        self._load: dict[str, int] = {}
        self._load_at = float("-inf")
        self.migrator = Migrator(state, reseeder, self)

    @property
    def link(self) -> ServiceLink:
        return self.links[self._current]

    async def run(self, nursery: trio.Nursery) -> None:
        """Register and heartbeat until cancelled. Reseeds run in `nursery`."""
        try:
            while True:
                if not self.voter.leader:
                    await self._find_leader()
                leading = (self.voter.leader, self.voter.term)
                if leading == self._registered_with or await self._register():
                    # Same leader, same term (we only lost it for a while): keep our
                    # incarnation; a NOT_FOUND answer sends us back to register.
                    self._registered_with = leading
                    await self._heartbeat_until_unknown(nursery)
                    if self.voter.leader:
                        self._registered_with = None
        finally:
            with trio.CancelScope(shield=True):
                for link in self.links:
                    await link.aclose()

    async def _find_leader(self) -> None:
        """Ballot every commander each period until one that leads becomes our leader."""
        while not self.voter.leader:
            period_end = trio.current_time() + BALLOT_PERIOD_MS / 1000
            async with trio.open_nursery() as nursery:
                for index in range(len(self.links)):
                    nursery.start_soon(self._ballot, index)
            if not self.voter.leader:
                await trio.sleep_until(period_end)
        self._current = self._link_of[self.voter.leader]
        log.info("following commander %s (term %d)", self.voter.leader, self.voter.term)

    async def _ballot(self, index: int) -> None:
        link = self.links[index]
        with trio.move_on_after(BALLOT_TIMEOUT_MS / 1000):
            for _ in range(2):  # a vote is carried by a second ballot at once
                voter = self.voter
                request = Ballot(
                    drone=self.state.name,
                    term=voter.term,
                    voted_for=voter.voted_for,
                    ack_ms=voter.ack_for(link.service),
                )
                try:
                    reply = await link.request(request, timeout=BALLOT_TIMEOUT_MS / 1000)
                except ServiceError as error:
                    if error.code is ErrorCode.BAD_REQUEST and not self.voter.leader:
                        self._link_of[link.service] = index
                        self.voter.follow_without_election(link.service)
                    log.debug("ballot to %s failed: %s", link.address, error)
                    return
                except WireError as error:
                    log.debug("ballot to %s failed: %s", link.address, error)
                    return
                if not isinstance(reply, BallotReply) or self.voter.leader:
                    return
                self._link_of[reply.commander] = index
                decision = self.voter.on_reply(
                    Reply(reply.commander, reply.role, reply.term, reply.sent_ms)
                )
                if not isinstance(decision, Vote):
                    return
                log.info("voted for %s in term %d", decision.commander, decision.term)

    async def _register(self) -> bool:
        """Register with the leader; False (leader dropped) if it cannot take us."""
        # What we still hold loaded (a leader change, not a restart): a new term that agrees
        # on the epochs lets us keep serving it without a reseed.
        request = Register(
            drone=self.state.name, address=self.address, held=self.state.table.ready_ranges()
        )
        deadline = trio.current_time() + LEADER_TIMEOUT_MS / 1000
        while trio.current_time() < deadline:
            try:
                reply = await self.link.request(request, timeout=COMMANDER_TIMEOUT_MS / 1000)
                if not isinstance(reply, Registered):
                    raise Internal(f"commander answered register with {reply.TYPE}")
                check_timing(reply.heartbeat_ms, reply.lease_ms)
            except (WireError, ValueError) as error:
                log.info("register with %s failed: %s", self.link.address, error)
                if isinstance(error, ServiceError) and error.code is ErrorCode.NOT_LEADER:
                    break
                await trio.sleep(REGISTER_RETRY_MS / 1000)
                continue
            self.incarnation = reply.incarnation
            self.heartbeat_ms, self.lease_ms = reply.heartbeat_ms, reply.lease_ms
            log.info("registered with %s as incarnation %d", self.link.address, self.incarnation)
            return True
        self.voter.leader_lost()
        return False

    async def _heartbeat_until_unknown(self, nursery: trio.Nursery) -> None:
        """Heartbeat every heartbeat_ms; return when the leader does not know us (register
        again) or is lost (the voter drops it: find a leader again)."""
        last_ok = self.state.now()
        while True:
            sent_at = self.state.now()
            try:
                await self.heartbeat_once(sent_at, nursery)
                last_ok = sent_at
            except ServiceError as error:
                if error.code is ErrorCode.NOT_FOUND:
                    log.info("commander does not know incarnation %s", self.incarnation)
                    return
                log.info("heartbeat to %s failed: %s", self.link.address, error.message)
                observe.current_metrics().lease_renewal_failures.inc()
                if error.code is ErrorCode.NOT_LEADER:
                    self.voter.leader_lost()
                    return
            if self.state.now() - last_ok > LEADER_TIMEOUT_MS / 1000:
                log.warning(
                    "leader %s silent for %d ms: dropping it", self.voter.leader, LEADER_TIMEOUT_MS
                )
                self.voter.leader_lost()
                return
            await trio.sleep_until(sent_at + self.heartbeat_ms / 1000)

    async def heartbeat_once(self, sent_at: float, nursery: trio.Nursery) -> None:
        if self.incarnation is None:
            raise Internal("heartbeat before registering")
        request = Heartbeat(
            drone=self.state.name,
            incarnation=self.incarnation,
            load=self._current_load(),
            ready=self.state.table.ready_ranges(),
            ack_ms=self.voter.ack_for(self.voter.leader),
        )
        self.heartbeats_sent += 1
        timeout_ms = min(self.lease_ms, LEADER_TIMEOUT_MS)
        reply = await self.link.request(request, timeout=timeout_ms / 1000)
        if not isinstance(reply, HeartbeatReply):
            raise Internal(f"commander answered a heartbeat with {reply.TYPE}")
        self.voter.on_heartbeat_reply(self.voter.leader, reply.sent_ms)
        self.take_reply(reply, sent_at, nursery)
        observe.current_metrics().lease_renewals.inc()

    def _current_load(self) -> dict[str, int]:
        now = self.state.now()
        if now - self._load_at >= LOAD_REPORT_MS / 1000:
            self._load, self._load_at = self.state.load(), now
        return self._load

    def take_reply(self, reply: HeartbeatReply, sent_at: float, nursery: trio.Nursery) -> None:
        """Apply a grant (from a heartbeat or a live move's long poll) sent at `sent_at`."""
        if reply.provisional:
            return  # the leader has no map saved under its term yet: not a grant, keep all
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
