"""The commander daemon: a thin trio shell around `CommanderState`.

Start-up: log in, learn the electorate (the authority's enabled drones) and the newest term
(the db), then serve. `node.CommanderNode` runs the election and, for each term this commander
wins and registers with the db, a `Commander`: it serves drones (register, heartbeat), clients
(slot map) and admins (drain, move). A ticker task feeds the state machine the time, runs the
saves it asks for and reports them back; grants come only from maps the db has confirmed. If
the db refuses a save as Fenced, a newer commander has registered: this term ends.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from dataclasses import dataclass

import trio

from auth.client import Credentials
from auth.messages import ElectorateReply, ElectorateRequest
from auth.roles import require_role
from auth.service import ServiceIdentity
from keyval import net, observe
from keyval.commander.dblink import DbLink
from keyval.commander.election import Election
from keyval.commander.state import CommanderState, DroneFailed, Phase, SaveMap
from keyval.grants import Grant, sign_grant
from keyval.messages import (
    AwaitGrant,
    ClusterStatus,
    DbLoadMap,
    DbMap,
    Drain,
    DroneStatus,
    GetMap,
    Heartbeat,
    HeartbeatReply,
    MapChange,
    MoveSlot,
    Rebalance,
    Register,
    Registered,
    Released,
    SlotMap,
    SlotMoved,
)
from keyval.nodeconfig import NodeOptions, write_ready_file
from keyval.timing import FAILURE_CHECK_MS, HEARTBEAT_MS, LEASE_MS, check_timing
from wire.channel import PeerInfo
from wire.errors import BadRequest, Fenced, Internal, Unauthorized, WireError
from wire.messages import Message

logger = logging.getLogger("keyval.commander")

DEFAULT_DB_NAME = "db"  # the db's principal name in a local cluster

# After a failed map save (db down), wait this long before the next try: a few failure-check
# periods, so a dead db is not hammered but a brief outage costs little.
SAVE_RETRY_S = 0.1

# Start-up waits this long at most for the db (login, term, map, key) before giving up with a
# clear error; a cluster launcher starts the db first, so it is normally there at once.
START_TIMEOUT_S = 30.0
START_RETRY_S = 0.2

# How often a commander re-reads the electorate from the authority, so a drone added (or
# disabled) while it runs gains (or loses) its vote within this bound.
ELECTORATE_REFRESH_S = 2.0

# A tick this much later than planned (FAILURE_CHECK_MS) means this process itself did not run:
# a loaded machine (the CPU went to other processes), a GC pause, SIGSTOP. Heartbeats that came
# meanwhile wait unread in the sockets, and a failure check right away would blame the drones
# for our stall. Measured on the 2-core machine next to CPU hogs: stalls of 300-700 ms declared
# all drones failed at once (docs/design.md, "Under CPU load").
STALL_GAP_MS = 100

# After such a stall, failures are not declared for this long: a heartbeat period and a half,
# so every live drone's queued or next heartbeat is read first. Declaring a failure later than
# the lease allows is always safe (the drone stopped serving by itself); only sooner is not.
STALL_GRACE_MS = 150

# A live move's long polls (AwaitGrant, Released) are answered after at most this long even if
# the move is not done: well under the drones' request timeout, so a poll never looks lost.
MOVE_POLL_MAX_S = 1.0

# Pushing a failed drone's slots to the survivors: while some drone is this close to being
# declared failed (its last heartbeat is over lease - window ago), heartbeats of the others are
# held until the next map save and answered with the new grant at once, instead of at their
# next heartbeat (0-100 ms later). A healthy drone is never that silent (it heartbeats every
# 100 ms), so normally nothing is held. Window: a heartbeat period, so every survivor's last
# heartbeat before the verdict is caught.
FAILURE_NEAR_MS = 100

# A held heartbeat is answered after at most this long even when no map was saved (the silent
# drone came back, or the save is slow): the drone counts its lease from its send, so the wait
# only delays its renewal. Together with the drone's own delays it must stay well inside the
# drones' leader timeout (300 ms), or holding would make drones drop a busy leader.
HEARTBEAT_HOLD_MAX_MS = 100

# Only a drone that heartbeats on time is held: one whose previous heartbeat came more than
# this long before is itself late (a loaded machine), and holding it could push it past the
# leader timeout; it gets its answer at once.
HOLD_ONLY_AFTER_GAP_MS = 200


@dataclass(frozen=True, slots=True)
class CommanderSettings:
    db: str
    db_name: str = DEFAULT_DB_NAME
    expect_drones: int = 1
    heartbeat_ms: int = HEARTBEAT_MS
    lease_ms: int = LEASE_MS

    @classmethod
    def from_options(cls, options: NodeOptions) -> CommanderSettings:
        """Read and check the commander keys of `options.extra`; raise ValueError."""
        db = options.get("db")
        if not isinstance(db, str) or not db:
            raise ValueError("missing --db HOST:PORT (the database interface)")
        net.parse_address(db)
        settings = cls(
            db=db,
            db_name=str(options.get("db_name") or DEFAULT_DB_NAME),
            expect_drones=int(options.get("expect_drones") or 1),
            heartbeat_ms=int(options.get("heartbeat_ms") or HEARTBEAT_MS),
            lease_ms=int(options.get("lease_ms") or LEASE_MS),
        )
        if settings.expect_drones < 1:
            raise ValueError("--expect-drones must be at least 1")
        check_timing(settings.heartbeat_ms, settings.lease_ms)
        return settings


class Commander:
    """Request handling and the ticker around one term's state machine."""

    def __init__(self, state: CommanderState, grant_key: bytes, db: DbLink) -> None:
        self.state = state
        self.grant_key = grant_key
        self.db = db
        self._wake = trio.Event()
        self._map_changed = trio.Event()  # set (and replaced) after every save and failure
        self._failure_near = False  # hold heartbeats for the next save (FAILURE_NEAR_MS)
        self._issued_ms = 0

    def now(self) -> float:
        return trio.current_time()

    async def handle(self, peer: PeerInfo, msg: Message) -> Message:
        if isinstance(msg, Heartbeat):
            return await self._heartbeat(peer, msg)
        if isinstance(msg, Register):
            return self._register(peer, msg)
        if isinstance(msg, GetMap):
            return self.slot_map()
        if isinstance(msg, Drain):
            require_role(peer, "admin", action="drain")
            return self._changed(self.state.drain(msg.drone, self.now()))
        if isinstance(msg, MoveSlot):
            require_role(peer, "admin", action="move")
            return self._changed(self.state.move(msg.slot, msg.drone, self.now()))
        if isinstance(msg, Rebalance):
            require_role(peer, "admin", action="rebalance")
            return self._changed(self.state.rebalance(self.now()))
        if isinstance(msg, AwaitGrant):
            return await self._await_grant(peer, msg)
        if isinstance(msg, Released):
            return await self._released(peer, msg)
        raise BadRequest(f"the commander does not handle {msg.TYPE}")

    def _register(self, peer: PeerInfo, msg: Register) -> Message:
        _require_drone(peer, msg.drone)
        record = self.state.register(
            msg.drone, msg.address, msg.capacity_keys, self.now(), held=msg.held
        )
        logger.info(
            "drone %s registered at %s (incarnation %d, holding %d slots)",
            msg.drone,
            msg.address,
            record.incarnation,
            len(record.held),
        )
        self._wake.set()
        return Registered(record.incarnation, self.state.heartbeat_ms, self.state.lease_ms)

    async def _heartbeat(self, peer: PeerInfo, msg: Heartbeat) -> Message:
        _require_drone(peer, msg.drone)
        received_at = self.now()
        record = self.state.drones.get(msg.drone)
        heard_before = record.last_heartbeat_at if record is not None else -math.inf
        ranges = self.state.heartbeat(msg.drone, msg.incarnation, msg.load, received_at)
        if self._failure_near and received_at - heard_before <= HOLD_ONLY_AFTER_GAP_MS / 1000:
            version = self.state.saved_version
            deadline = received_at + HEARTBEAT_HOLD_MAX_MS / 1000
            while self.state.saved_version == version:
                if not await self._wait_map_change(deadline):
                    break
            if self.state.saved_version != version:
                ranges = self.state.renew_grant(msg.drone, msg.incarnation, self.now())
        return self._grant_reply(msg.drone, ranges)

    def _grant_reply(self, drone: str, ranges: list[tuple[int, int, int]]) -> HeartbeatReply:
        grant = Grant(drone, self.state.term, tuple(ranges), self._next_issued_ms())
        release, importing = self.state.moves_for(drone)
        return HeartbeatReply(
            sign_grant(grant, self.grant_key),
            self.state.saved_version,
            release=release,
            importing=importing,
            sent_ms=math.floor(self.now() * 1000),  # echoed back: our lease on the drones
            provisional=not self.state.granting,
        )

    async def _wait_map_change(self, deadline: float) -> bool:
        """Wait for the next save or failure; False once `deadline` passed."""
        event = self._map_changed
        with trio.move_on_at(deadline):
            await event.wait()
            return True
        return False

    async def _await_grant(self, peer: PeerInfo, msg: AwaitGrant) -> Message:
        """A live move's target long-polls: answer with its grant once its slots arrived."""
        _require_drone(peer, msg.drone)
        deadline = self.now() + MOVE_POLL_MAX_S
        self.state.target_waiting(msg.drone, msg.incarnation, msg.slots)
        self._wake.set()
        while True:
            still = [
                slot
                for slot in msg.slots
                if (
                    slot in self.state.migrations
                    and self.state.migrations[slot].target == msg.drone
                )
                or (
                    self.state.working.owners[slot] == msg.drone
                    and self.state.saved.owners[slot] != msg.drone
                )
            ]
            if not still or not await self._wait_map_change(deadline):
                break
        record = self.state.drones.get(msg.drone)
        load = record.load if record is not None else {}
        ranges = self.state.heartbeat(msg.drone, msg.incarnation, load, self.now())
        return self._grant_reply(msg.drone, ranges)

    async def _released(self, peer: PeerInfo, msg: Released) -> Message:
        """A live move's source froze and drained the slot: move it, answer once saved."""
        _require_drone(peer, msg.drone)
        version = self.state.released(msg.drone, msg.incarnation, msg.slot, msg.epoch, self.now())
        self._wake.set()
        deadline = self.now() + MOVE_POLL_MAX_S
        while self.state.saved_version < version:
            if not await self._wait_map_change(deadline):
                break
        owner = self.state.saved.owners[msg.slot]
        return SlotMoved(
            slot=msg.slot,
            epoch=self.state.saved.epochs[msg.slot],
            owner=owner,
            address=self.state.addresses().get(owner, ""),
            version=self.state.saved_version,
        )

    def _signal_map_change(self) -> None:
        self._map_changed.set()
        self._map_changed = trio.Event()

    def _next_issued_ms(self) -> int:
        """Strictly rising per commander, so a drone can tell a newer grant from an older."""
        self._issued_ms = max(self._issued_ms + 1, math.floor(self.now() * 1000))
        return self._issued_ms

    def _changed(self, version: int) -> Message:
        self._wake.set()
        return MapChange(version)

    def status(self) -> ClusterStatus:
        now = self.now()
        counts: dict[str, int] = {}
        for first, last, owner, _epoch in self.state.map_ranges():
            counts[owner] = counts.get(owner, 0) + last - first + 1
        drones = [
            DroneStatus(
                name=record.name,
                address=record.address,
                incarnation=record.incarnation,
                last_heartbeat_ms_ago=max(0, round((now - record.last_heartbeat_at) * 1000)),
                draining=record.draining,
                slots=counts.get(record.name, 0),
                load=dict(record.load),
            )
            for record in sorted(self.state.drones.values(), key=lambda r: r.name)
        ]
        return ClusterStatus(
            term=self.state.term,
            leader=self.state.name,
            phase=self.state.phase.value,
            map_version=self.state.saved_version,
            drones=drones,
        )

    def slot_map(self) -> SlotMap:
        return SlotMap(
            term=self.state.term,
            version=self.state.saved_version,
            ranges=self.state.map_ranges(),
            drones=self.state.addresses(),
            leader=self.state.name,
        )

    async def run_ticker(self) -> None:
        """Feed time to the state machine; run saves one at a time. Raises Fenced if deposed."""
        guard = StallGuard(self.now())
        while True:
            with trio.move_on_after(FAILURE_CHECK_MS / 1000):
                await self._wake.wait()
            self._wake = trio.Event()
            resuming = self.state.phase is Phase.RESUMING
            now = self.now()
            detect = guard.may_detect(now)
            instructions = self.state.tick(now, detect_failures=detect)
            self._failure_near = self.state.failure_near(now, FAILURE_NEAR_MS / 1000)
            if resuming and self.state.phase is not Phase.RESUMING:
                logger.info(
                    "term %d resumed the persisted map: %d slots kept their epoch (owner still "
                    "held them), the rest move to a new epoch",
                    self.state.term,
                    self.state.resume_kept,
                )
            for instruction in instructions:
                if isinstance(instruction, DroneFailed):
                    logger.warning("drone %s failed: its lease expired", instruction.drone)
                    observe.current_metrics().drone_failures.inc()
                    self._signal_map_change()
                elif isinstance(instruction, SaveMap):
                    await self._save(instruction)
            guard.ran(self.now())

    async def _save(self, save: SaveMap) -> None:
        try:
            await self.db.save_map(self.state.term, save.version, save.ranges)
        except Fenced:
            logger.error("term %d fenced by the db: a newer commander leads", self.state.term)
            raise
        except WireError as error:
            logger.warning("saving map version %d failed: %s", save.version, error)
            self.state.save_failed(save.version)
            await trio.sleep(SAVE_RETRY_S)
            return
        self.state.map_saved(save.version, self.now())
        self._signal_map_change()
        logger.info("map version %d saved (%d ranges)", save.version, len(save.ranges))


class StallGuard:
    """Tells the ticker whether failures may be declared now: not within STALL_GRACE_MS of a
    tick that came more than STALL_GAP_MS late (this process was not running)."""

    def __init__(self, now: float) -> None:
        self._last_s = now
        self._quiet_until_s = now
        self.stalls = 0

    def may_detect(self, now: float) -> bool:
        planned_s = self._last_s + FAILURE_CHECK_MS / 1000
        if now - planned_s > STALL_GAP_MS / 1000:
            self.stalls += 1
            self._quiet_until_s = max(self._quiet_until_s, now + STALL_GRACE_MS / 1000)
            logger.info(
                "event loop stalled for %.0f ms: no failure declared for %d ms",
                (now - planned_s) * 1000,
                STALL_GRACE_MS,
            )
        return now >= self._quiet_until_s

    def ran(self, now: float) -> None:
        """The tick's work (a map save included) ended at `now`: the next tick is due
        FAILURE_CHECK_MS after it."""
        self._last_s = now


def _require_drone(peer: PeerInfo, drone: str) -> None:
    require_role(peer, "drone", action="registering or heartbeating as a drone")
    if peer.name != drone:
        raise Unauthorized(
            f"principal {peer.name!r} cannot speak for drone {drone!r}: the names must match",
            detail={"principal": peer.name, "drone": drone},
        )


async def _fetch_electorate(credentials: Credentials) -> frozenset[str]:
    """The enabled drones the authority knows."""
    connection = await credentials.authority_connection()
    try:
        reply = await connection.request(ElectorateRequest(), timeout=START_RETRY_S * 5)
    finally:
        await connection.aclose()
    if not isinstance(reply, ElectorateReply):
        raise Internal(f"the authority answered with {reply.TYPE}")
    return frozenset(reply.drones)


async def _refresh_electorate(credentials: Credentials, election: Election) -> None:
    """Keep `election.electorate` equal to the authority's enabled drones."""
    while True:
        await trio.sleep(ELECTORATE_REFRESH_S)
        try:
            drones = await _fetch_electorate(credentials)
        except (WireError, OSError) as error:
            logger.info("cannot refresh the electorate: %s", error)
            continue
        if drones and drones != election.electorate:
            logger.info("electorate now %d drones (was %d)", len(drones), len(election.electorate))
            election.electorate = drones


async def _start_election(credentials: Credentials, db: DbLink, name: str) -> Election:
    """Ask the authority for the electorate and the db for the newest term, retrying while
    either is not reachable yet."""
    with trio.fail_after(START_TIMEOUT_S):
        while True:
            try:
                drones = await _fetch_electorate(credentials)
                loaded = await db.request(DbLoadMap())
                if not isinstance(loaded, DbMap):
                    raise Internal(f"the db answered load_map with {loaded.TYPE}")
            except (WireError, OSError) as error:
                logger.warning("authority or db not ready: %s; retrying", error)
                await trio.sleep(START_RETRY_S)
                continue
            if not drones:
                logger.warning("the authority knows no enabled drone yet; retrying")
                await trio.sleep(START_RETRY_S)
                continue
            election = Election(name, drones, random.Random())
            election.observe_term(loaded.term, "")
            return election


async def run_commander(
    options: NodeOptions, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve as commander until cancelled: stand in elections, lead the terms won."""
    from keyval.commander.node import CommanderNode  # node builds on this module

    settings = CommanderSettings.from_options(options)
    if options.data is not None:
        options.data.mkdir(parents=True, exist_ok=True)
    credentials = Credentials(options.name, options.key, options.authority, options.authority_key)
    db = DbLink(credentials, settings.db, settings.db_name)
    try:
        async with trio.open_nursery() as nursery:
            metrics = await observe.start_node(nursery, options.name, "commander", options.metrics)
            identity = ServiceIdentity(credentials)
            await identity.start(nursery)
            election = await _start_election(credentials, db, options.name)
            node = CommanderNode(election, db, settings)

            def live_drones() -> int:
                return len(node.commander.state.drones) if node.commander else 0

            def map_version() -> int:
                return node.commander.state.saved_version if node.commander else 0

            metrics.drones_live.set_function(live_drones)
            metrics.map_version.set_function(map_version)
            metrics.commander_term.set_function(lambda: election.term)
            bound = await nursery.start(
                functools.partial(net.serve, revoked=identity.revoked),
                options.listen,
                identity.server_auth,
                node.handle,
            )
            nursery.start_soon(node.run)
            nursery.start_soon(_refresh_electorate, credentials, election)
            logger.info(
                "commander %s serving on %s; %d drones vote",
                options.name,
                bound,
                len(election.electorate),
            )
            write_ready_file(options.ready_file, bound)
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            await db.aclose()
