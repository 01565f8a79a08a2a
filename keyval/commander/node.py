"""One commander process across terms: the election, and the term it leads (if any).

Every commander runs the election (keyval.commander.election). While it is not the acting
leader it answers ballots and status, and everything else with NOT_LEADER naming the leader it
knows. When it wins a vote it registers the term with the db (compare-and-set forward), loads
the persisted map and the grant key, and only then builds that term's `Commander` (state
machine + ticker) and acts. Heartbeats echo our reply times; a heartbeat is answered with a
grant only while the election says we hold a lease on a majority. When that lapses, or the db
fences us, the term's ticker is cancelled and its state dropped: a commander never resumes a
term it left, it can only win a newer one.
"""

from __future__ import annotations

import logging

import trio

from auth.roles import require_role
from keyval.commander.daemon import Commander, CommanderSettings
from keyval.commander.dblink import DbLink
from keyval.commander.election import (
    Election,
    ElectionInstruction,
    Role,
    SteppedDown,
    Won,
    inherited_lease_s,
)
from keyval.commander.state import CommanderState
from keyval.messages import (
    Ballot,
    BallotReply,
    ClusterStatus,
    DbGrantKey,
    DbGrantKeyReply,
    DbLoadMap,
    DbMap,
    DbRegisterTerm,
    DbTerm,
    Heartbeat,
    StatusRequest,
)
from keyval.observe import current_metrics
from keyval.timing import FAILURE_CHECK_MS, commander_expiry_ms
from wire.channel import PeerInfo
from wire.errors import Fenced, Internal, NotLeader, Unauthorized, WireError
from wire.messages import Message

logger = logging.getLogger("keyval.commander")


class CommanderNode:
    def __init__(self, election: Election, db: DbLink, settings: CommanderSettings) -> None:
        self.election = election
        self.db = db
        self.settings = settings
        self.commander: Commander | None = None  # the term we act in, if any
        self._term_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        self.terms_led = 0

    @property
    def name(self) -> str:
        return self.election.name

    def now(self) -> float:
        return trio.current_time()

    def acting(self, now: float) -> bool:
        return self.commander is not None and self.election.has_lease(now)

    # ------------------------------------------------------------ requests

    async def handle(self, peer: PeerInfo, msg: Message) -> Message:
        if isinstance(msg, Ballot):
            return self._ballot(peer, msg)
        if isinstance(msg, StatusRequest) and (msg.local or self.acting(self.now())):
            return self.status()
        commander = self.commander
        now = self.now()
        if isinstance(msg, Heartbeat) and peer.name == msg.drone:
            self.election.follower_ack(msg.drone, msg.ack_ms, now)
        if commander is None or not self.acting(now):
            raise NotLeader(
                f"{self.name} does not lead (term {self.election.term})",
                detail={"leader": self.election.leader, "term": self.election.term},
            )
        reply = await commander.handle(peer, msg)
        if isinstance(msg, Heartbeat) and not self.acting(self.now()):
            # Held for a map save (daemon.FAILURE_NEAR_MS) while our lease on the drones lapsed:
            # a deposed leader hands out no grant.
            raise NotLeader(
                f"{self.name} no longer leads (term {self.election.term})",
                detail={"leader": self.election.leader, "term": self.election.term},
            )
        return reply

    def _ballot(self, peer: PeerInfo, msg: Ballot) -> BallotReply:
        require_role(peer, "drone", action="voting")
        if peer.name != msg.drone:
            raise Unauthorized(f"principal {peer.name!r} cannot vote for drone {msg.drone!r}")
        view, instructions = self.election.ballot(
            msg.drone, msg.term, msg.voted_for, msg.ack_ms, self.now()
        )
        self._carry_out(instructions)
        return BallotReply(
            commander=view.commander,
            role=str(view.role),
            term=view.term,
            leader=view.leader,
            votes=view.votes,
            sent_ms=view.sent_ms,
        )

    def status(self) -> ClusterStatus:
        election = self.election
        common = {
            "commander": self.name,
            "role": str(election.role),
            "votes": len(election.votes),
            "electorate": len(election.electorate),
        }
        if self.commander is not None:
            status = self.commander.status()
            return ClusterStatus(
                term=status.term,
                leader=status.leader,
                phase=status.phase,
                map_version=status.map_version,
                drones=status.drones,
                **common,  # type: ignore[arg-type]
            )
        return ClusterStatus(
            term=election.term,
            leader=election.leader,
            phase="standby",
            map_version=0,
            drones=[],
            **common,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------ the election loop

    def _carry_out(self, instructions: list[ElectionInstruction]) -> None:
        for instruction in instructions:
            if isinstance(instruction, Won):
                current_metrics().elections_won.inc()
                logger.info("%s won the vote of term %d", self.name, instruction.term)
                self._wake.set()
            elif isinstance(instruction, SteppedDown):
                current_metrics().step_downs.inc()
                logger.warning(
                    "%s steps down from term %d: %s",
                    self.name,
                    instruction.term,
                    instruction.reason,
                )
                self._leave_term()

    def _leave_term(self) -> None:
        if self._term_scope is not None:
            self._term_scope.cancel()
        self._term_scope = None
        self.commander = None

    async def run(self) -> None:
        """Tick the election; lead each term we win, until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_after(FAILURE_CHECK_MS / 1000):
                    await self._wake.wait()
                self._wake = trio.Event()
                self._carry_out(self.election.tick(self.now()))
                election = self.election
                if election.role is Role.LEADER and not election.acting:
                    await self._take_office(nursery, election.term)

    async def _take_office(self, nursery: trio.Nursery, term: int) -> None:
        """Register `term` in the db, load the map, then act. A failure leaves the election to
        retry (db down) or step down (fenced, lease lapsed)."""
        won_at = self.now()
        try:
            stored = await self.db.request(DbRegisterTerm(self.name, term))
            if not isinstance(stored, DbTerm):
                raise Internal(f"the db answered register_term with {stored.TYPE}")
            loaded = await self.db.request(DbLoadMap())
            key = await self.db.request(DbGrantKey())
            if not isinstance(loaded, DbMap) or not isinstance(key, DbGrantKeyReply):
                raise Internal("the db answered load_map or grant_key with the wrong message")
        except Fenced as error:
            newest, commander = error.detail.get("term"), error.detail.get("commander")
            logger.warning("term %d refused by the db: %s", term, error.message)
            self._carry_out(
                self.election.fenced(
                    newest if type(newest) is int else term,
                    commander if isinstance(commander, str) else "",
                    self.now(),
                )
            )
            return
        except WireError as error:
            logger.warning("taking office in term %d failed: %s; retrying", term, error)
            await trio.sleep(FAILURE_CHECK_MS / 1000)
            return
        if self.election.role is not Role.LEADER or self.election.term != term:
            return  # deposed while we were asking the db
        settings = self.settings
        state = CommanderState(
            name=self.name,
            term=term,
            now=won_at,
            persisted_version=loaded.version,
            persisted_ranges=list(loaded.ranges),
            expect_drones=settings.expect_drones,
            heartbeat_ms=settings.heartbeat_ms,
            lease_ms=settings.lease_ms,
            inherited_lease_s=inherited_lease_s(commander_expiry_ms(settings.lease_ms) / 1000),
        )
        commander = Commander(state, key.key, self.db)
        self.election.registered(term)
        self.commander = commander
        self.terms_led += 1
        scope = trio.CancelScope()
        self._term_scope = scope
        nursery.start_soon(self._lead, commander, scope)
        logger.info(
            "%s leads term %d (map version %d, %d drones vote)",
            self.name,
            term,
            loaded.version,
            len(self.election.electorate),
        )

    async def _lead(self, commander: Commander, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await commander.run_ticker()
            except Fenced as error:
                newest = error.detail.get("term")
                who = error.detail.get("commander")
                self._carry_out(
                    self.election.fenced(
                        newest if type(newest) is int else commander.state.term + 1,
                        who if isinstance(who, str) else "",
                        self.now(),
                    )
                )
