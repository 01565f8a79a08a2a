"""Sending one request to the right place: slot map, redirects, retries, deadline.

`Router` owns the cached slot map (fetched from the commanders, following NOT_LEADER), the
link pool, and the retry loop every call goes through:

- MOVED: take the redirect's owner for that slot (or refresh the whole map) and retry.
- ASK: retry this one request at detail["address"], without changing the map.
- UNAVAILABLE, TIMEOUT, a lost connection: pause (exponential backoff with jitter, at least
  the server's retry_after_ms) and retry, until the call's deadline or attempt limit.
- A drone that cannot be reached (UNAVAILABLE without retry_after_ms: refused, reset or lost
  connection; or TIMEOUT): its link is dropped and the slot map re-fetched (at most once per
  UNREACHABLE_REFRESH_INTERVAL_S), so after a failover the next try finds the slot's new
  owner; while the map still names the dead drone, pauses stay short.
- anything else (CONFLICT, BAD_REQUEST, FORBIDDEN, ...): raised to the caller at once.

Mutations carry a client-chosen op_id that every retry reuses, so a retry applies once.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from keyval.client.config import Endpoint
from keyval.client.errors import DeadlineExceeded, NoOwner
from keyval.client.links import CONNECTION_ERRORS, Link, LinkPool
from keyval.client.policy import Attempts, RetryPolicy
from keyval.client.routing import Route, SlotTable
from keyval.messages import GetMap, SlotMap
from wire.errors import (
    Ask,
    LocalProtocolError,
    Moved,
    NotLeader,
    ServiceError,
    Timeout,
    Unavailable,
)
from wire.messages import Message

logger = logging.getLogger("keyval.client")

T = TypeVar("T")

# Commanders asked in one map refresh before pausing: NOT_LEADER hops included. A leader hint
# can at worst send us round the configured list once more.
MAX_COMMANDER_HOPS_PER_ROUND = 8

# What a try may fail with and still be retried (redirects, and a peer not reachable or not
# ready); anything else goes to the caller at once.
RetryableError = Moved | Ask | Unavailable | Timeout
RETRYABLE_ERRORS = (Moved, Ask, Unavailable, Timeout)

# What a request on a link may fail with other than the server's answer: a lost or broken
# connection, or a slow one (`Router._link_failure` says what each means to the caller).
LINK_ERRORS = (*CONNECTION_ERRORS, LocalProtocolError, trio.TooSlowError, Unavailable)

# Map re-fetches caused by unreachable drones, at most one per this interval (per client): a
# commander's heartbeat interval (100 ms), so a failover shows within one refresh, while a dead
# drone hammered by many tasks costs the commander at most 10 map requests a second.
UNREACHABLE_REFRESH_INTERVAL_S = 0.1

# Longest pause after an unreachable drone while the map still names it: about two refresh
# intervals, so the retry sees the map the commander saves once the drone's lease has lapsed
# (the plain backoff would grow to DEFAULT_MAX_DELAY_S).
UNREACHABLE_MAX_PAUSE_S = 0.2


@dataclasses.dataclass(slots=True)
class RetryDecision:
    """What to do after a failed try."""

    pause_floor_s: float = 0.0
    pause_cap_s: float | None = None  # shorten the backoff (waiting for a map change)
    ask: Route | None = None  # ASK: the next try goes here
    immediate: bool = False  # the map changed: retry at once (still counted)


class Router:
    def __init__(
        self,
        *,
        commanders: tuple[Endpoint, ...],
        pool: LinkPool,
        policy: RetryPolicy,
        rng: random.Random,
    ) -> None:
        if not commanders:
            raise ValueError("at least one commander is needed")
        self.policy = policy
        self.pool = pool
        self._commanders = commanders
        self._rng = rng
        self._leader: Endpoint | None = None
        self._table: SlotTable | None = None
        self._refresh_lock = trio.Lock()
        self._refreshes = 0
        self._last_fetch_at = float("-inf")  # trio clock, start of the latest map fetch

    # ------------------------------------------------------------------ the slot map

    @property
    def table(self) -> SlotTable | None:
        return self._table

    async def current_table(self, attempts: Attempts) -> SlotTable:
        if self._table is None:
            await self.refresh(attempts, seen=0)
        assert self._table is not None  # refresh sets it or raises
        return self._table

    async def refresh(self, attempts: Attempts, *, seen: int) -> None:
        """Fetch the map unless a refresh finished since the caller saw refresh number `seen`."""
        async with self._refresh_lock:
            if self._refreshes != seen and self._table is not None:
                return  # another task refreshed while we waited; use its map
            self._last_fetch_at = trio.current_time()
            reply = await self.retrying(attempts, self._fetch_map_once, reroute=False)
            self._take_map(reply)

    async def refresh_after_unreachable(self, attempts: Attempts) -> bool:
        """One map fetch (no retries) unless one started within the last
        UNREACHABLE_REFRESH_INTERVAL_S; True if the map changed. A failing commander is
        only logged: the caller goes on retrying the drone."""
        async with self._refresh_lock:
            now = trio.current_time()
            if now - self._last_fetch_at < UNREACHABLE_REFRESH_INTERVAL_S:
                return False
            self._last_fetch_at = now
            before = self._table
            try:
                reply = await self._fetch_map_once(attempts)
            except (Unavailable, Timeout) as error:
                logger.debug("map refresh after an unreachable drone failed: %s", error)
                return False
            self._take_map(reply)
            return before is None or (before.version, before.term) != (reply.version, reply.term)

    def _take_map(self, reply: SlotMap) -> None:
        self._table = SlotTable.from_map(reply)
        self._refreshes += 1
        logger.debug("slot map version %d term %d", reply.version, reply.term)

    @property
    def refreshes(self) -> int:
        return self._refreshes

    async def _fetch_map_once(self, attempts: Attempts) -> SlotMap:
        order = ([self._leader] if self._leader else []) + list(self._commanders)
        last_error: ServiceError = Unavailable("no commander answered")
        hops = 0
        while order and hops < MAX_COMMANDER_HOPS_PER_ROUND:
            endpoint = order.pop(0)
            hops += 1
            try:
                reply = await self.send(
                    Route(endpoint.name, endpoint.address, 0), GetMap(), attempts
                )
            except NotLeader as error:
                last_error = Unavailable(f"commander {endpoint.name} does not lead: {error}")
                hint = self._leader_from(error.detail)
                if hint is not None and hint != endpoint:
                    order.insert(0, hint)
                continue
            except (Unavailable, Timeout) as error:
                last_error = error
                continue
            if not isinstance(reply, SlotMap):
                raise Unavailable(f"commander answered get_map with {reply.TYPE}")
            self._leader = endpoint
            return reply
        self._leader = None
        raise last_error

    def _leader_from(self, detail: dict[str, Any]) -> Endpoint | None:
        """The commander a NOT_LEADER names: by principal name or by address."""
        leader, address = detail.get("leader"), detail.get("address")
        for endpoint in self._commanders:
            if leader in (endpoint.name, endpoint.address) or address == endpoint.address:
                return endpoint
        if isinstance(leader, str) and leader and isinstance(address, str) and address:
            return Endpoint(name=leader, address=address)
        return None

    # ------------------------------------------------------------------ one request

    async def send(self, route: Route, msg: Message, attempts: Attempts) -> Message:
        timeout = attempts.request_timeout_s(trio.current_time())
        if timeout <= 0:
            raise DeadlineExceeded("the call's deadline passed")
        link = await self.pool.get(route.address, route.drone, timeout=timeout)
        try:
            return await link.request(msg, timeout=timeout)
        except LINK_ERRORS as error:
            failure = await self._link_failure(route, link, error, timeout)
            raise failure from failure.__cause__

    async def _link_failure(
        self, route: Route, link: Link, error: BaseException, timeout: float
    ) -> Unavailable | Timeout:
        """What a request on `link` that failed with one of LINK_ERRORS means to the caller
        (its `__cause__` set where there is one); a lost or unusable connection is dropped."""
        if isinstance(error, Unavailable):
            if "retry_after_ms" not in error.detail:  # the connection, not the server
                await self.pool.drop(route.address, link)
            return error
        if isinstance(error, trio.TooSlowError):
            return Timeout(f"{route.drone} did not answer within {timeout:.3f} s")
        # A connection error, or a LocalProtocolError: the channel failed (the peer died
        # mid-frame) before the connection noticed, and keyval.net let the request reach the
        # dead channel. Either way a lost connection to us.
        await self.pool.drop(route.address, link)
        how = "unusable" if isinstance(error, LocalProtocolError) else "lost"
        lost = Unavailable(f"connection to {route.drone} {how}: {error}")
        lost.__cause__ = error
        return lost

    async def route(self, slot: int, attempts: Attempts) -> Route:
        table = await self.current_table(attempts)
        route = table.route(slot)
        if route is None:
            raise NoOwner(f"no drone owns slot {slot} yet", detail={"slot": slot})
        return route

    async def call(self, slot: int, msg: Message, attempts: Attempts | None = None) -> Message:
        """Send `msg` to the owner of `slot`, with every redirect and retry the policy allows."""
        failed: RetryableError | None = None
        table = self._table
        route = None if table is None else table.route(slot)
        if route is not None and attempts is None:
            # The common case: a new call whose first try goes to the owner the map names on
            # a link already open. No Attempts, no closures, no retry loop, one clock read
            # (for the deadline of a retry); a fresh call's first try may take the whole
            # request timeout, as `send` would allow it.
            link = self.pool.open_link(route.address)
            if link is not None:
                policy = self.policy
                started = trio.current_time()
                timeout = min(policy.request_timeout_s, policy.deadline_s)
                try:
                    return await link.request(msg, timeout=timeout)
                except DeadlineExceeded:
                    raise
                except LINK_ERRORS as error:
                    failed = await self._link_failure(route, link, error, timeout)
                except RETRYABLE_ERRORS as error:
                    failed = error
                attempts = Attempts.start(policy, started)
        attempts = attempts or self.start()
        if route is not None and failed is None:  # one try at the owner the map names
            first = await self._first_try(route, msg, attempts)
            if isinstance(first, Message):
                return first
            failed = first
        ask: list[Route | None] = [None]

        async def once(attempts: Attempts) -> Message:
            target, ask[0] = ask[0], None
            target = target or await self.route(slot, attempts)
            return await self.send(target, msg, attempts)

        return await self.retrying(
            attempts, once, on_ask=lambda route: ask.__setitem__(0, route), failed=failed
        )

    async def call_at(self, route: Route, msg: Message, attempts: Attempts) -> Message:
        """Send `msg` to one drone (no slot): retries UNAVAILABLE/TIMEOUT, not redirects.
        The first try goes straight out (no closure, no retry loop: the happy path)."""
        first = await self._first_try(route, msg, attempts)
        if isinstance(first, Message):
            return first

        async def once(attempts: Attempts) -> Message:
            return await self.send(route, msg, attempts)

        return await self.retrying(attempts, once, redirects=False, failed=first)

    async def _first_try(
        self, route: Route, msg: Message, attempts: Attempts
    ) -> Message | RetryableError:
        """One try at `route`: the reply, or the error to retry after (any other raises)."""
        try:
            return await self.send(route, msg, attempts)
        except DeadlineExceeded:
            raise
        except RETRYABLE_ERRORS as error:
            return error

    @property
    def rng(self) -> random.Random:
        return self._rng

    def start(self) -> Attempts:
        return Attempts.start(self.policy, trio.current_time())

    # ------------------------------------------------------------------ the retry loop

    async def retrying(
        self,
        attempts: Attempts,
        once: Callable[[Attempts], Awaitable[T]],
        *,
        on_ask: Callable[[Route], None] | None = None,
        redirects: bool = True,
        reroute: bool = True,
        failed: RetryableError | None = None,
    ) -> T:
        """Run `once` until it succeeds, retrying as the module docstring says. With
        `redirects=False`, MOVED and ASK are raised to the caller (who must re-route). With
        `reroute=False` (the map fetch itself), an unreachable peer does not refresh the map.
        `failed`: the error of a first try the caller already made (it counts as one)."""
        while True:
            if failed is None:
                try:
                    return await once(attempts)
                except DeadlineExceeded:
                    raise
                except RETRYABLE_ERRORS as error:
                    failed = error
            if isinstance(failed, (Moved, Ask)):
                if not redirects:
                    raise failed
                decision = await self.classify(failed, attempts, allow_ask=on_ask is not None)
                if decision.ask is not None and on_ask is not None:
                    on_ask(decision.ask)
            else:
                decision = await self.classify(failed, attempts, allow_ask=False, reroute=reroute)
            last: ServiceError = failed
            failed = None
            await self.back_off(attempts, decision, last)

    async def back_off(
        self, attempts: Attempts, decision: RetryDecision, last: ServiceError
    ) -> None:
        """Count a failed try and pause as `decision` says; DeadlineExceeded (from `last`)
        when the call may not try again."""
        now = trio.current_time()
        pause = attempts.next_pause_s(now, self._rng, floor_s=decision.pause_floor_s)
        if pause is None:
            raise DeadlineExceeded(
                f"gave up after {attempts.count} attempts: {last.message}",
                detail={"attempts": attempts.count, "last_code": str(last.code)},
            ) from last
        if decision.pause_cap_s is not None:
            pause = min(pause, decision.pause_cap_s)
        if not (decision.immediate or decision.ask is not None):
            await trio.sleep(pause)

    async def classify(
        self, error: ServiceError, attempts: Attempts, *, allow_ask: bool, reroute: bool = True
    ) -> RetryDecision:
        """How to retry after `error` (a MOVED/ASK/UNAVAILABLE/TIMEOUT); raise if we cannot.
        `reroute`: an unreachable peer re-fetches the slot map (see the module docstring)."""
        if isinstance(error, NoOwner):
            await self.refresh(attempts, seen=self._refreshes)
            return RetryDecision()
        if isinstance(error, Moved):
            if self._table is not None and self._table.apply_moved(error.detail):
                return RetryDecision(immediate=True)
            seen = self._refreshes
            await self.refresh(attempts, seen=seen)
            return RetryDecision()
        if isinstance(error, Ask):
            address = error.detail.get("address")
            if not allow_ask or not isinstance(address, str) or not address:
                raise error
            owner = error.detail.get("owner")
            if not isinstance(owner, str) or not owner:
                owner = self._name_of(address)
            return RetryDecision(ask=Route(drone=owner, address=address, epoch=0))
        if reroute and is_unreachable(error):
            if await self.refresh_after_unreachable(attempts):
                return RetryDecision(immediate=True)
            return RetryDecision(pause_cap_s=UNREACHABLE_MAX_PAUSE_S)
        retry_after_ms = error.detail.get("retry_after_ms", 0)
        floor_s = retry_after_ms / 1000 if type(retry_after_ms) in (int, float) else 0.0
        return RetryDecision(pause_floor_s=max(0.0, floor_s))

    def _name_of(self, address: str) -> str:
        if self._table is not None:
            for name, known in self._table.drones().items():
                if known == address:
                    return name
        return ""


def is_unreachable(error: ServiceError) -> bool:
    """Did `error` come from not reaching the peer (rather than from the peer answering)?

    A server that is up but cannot serve yet (loading, frozen, db down) answers UNAVAILABLE
    with a retry_after_ms hint; without one, the connection failed or was lost."""
    if isinstance(error, DeadlineExceeded):
        return False  # our own deadline, not the peer's
    if isinstance(error, Timeout):
        return True
    return isinstance(error, Unavailable) and "retry_after_ms" not in error.detail


def merge_decisions(decisions: list[RetryDecision]) -> RetryDecision:
    """One decision for several failed requests retried together (get_many): at once if any
    saw the map change, else the longest floor and the shortest cap any asked for."""
    if any(decision.immediate for decision in decisions):
        return RetryDecision(immediate=True)
    caps = [d.pause_cap_s for d in decisions if d.pause_cap_s is not None]
    return RetryDecision(
        pause_floor_s=max((d.pause_floor_s for d in decisions), default=0.0),
        pause_cap_s=min(caps) if caps else None,
    )
