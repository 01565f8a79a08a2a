"""The trio client: `async with keyval.aconnect(config) as kv:`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from keyval.client.autobatch import RETRY_ALONE, GetBatcher
from keyval.client.checks import admit_ack, admit_key, admit_value, admit_version
from keyval.client.config import ClientSettings, load_settings
from keyval.client.errors import ClientClosed, DeadlineExceeded, NoOwner, TooManyConflicts
from keyval.client.links import Dialer, LinkPool, TicketDialer
from keyval.client.policy import Attempts, RetryPolicy
from keyval.client.router import RetryDecision, Router, merge_decisions
from keyval.client.routing import Route
from keyval.client.scanning import Item, ScanCursor
from keyval.client.twopc import DEFAULT_TIME_BOUND_MS
from keyval.client.txn import ABSENT, OP_ID_BYTES, AsyncTransaction, Entry
from keyval.keys import check_key_slot, key_slot
from keyval.messages import (
    CompareAndSet,
    Delete,
    Get,
    GetMany,
    Put,
    ValueReply,
    ValuesReply,
    Written,
)
from wire.errors import (
    Ask,
    Conflict,
    Internal,
    Moved,
    ServiceError,
    Timeout,
    TooLarge,
    Unavailable,
)
from wire.messages import Key, Message

T = TypeVar("T")

# Re-runs of a transaction function that keeps losing to conflicts before `transact` gives up
# (FoundationDB retries until its 5 s transaction timeout; a count is easier to reason about).
MAX_TRANSACTION_ATTEMPTS = 10

# Keys in one GetMany request: the drone's per-request bound (keyval.drone.reads.
# MAX_GET_MANY_KEYS); a larger get_many is split into requests of this size.
GET_MANY_KEYS_PER_REQUEST = 1000


@dataclasses.dataclass(slots=True)
class _GetManyRound:
    """The keys of one get_many round to try again, and why."""

    retry: list[Key] = dataclasses.field(default_factory=list)
    decisions: list[RetryDecision] = dataclasses.field(default_factory=list)
    last_error: ServiceError | None = None
    fatal: ServiceError | None = None  # an error no retry can cure: raised to the caller

    def failed(self, keys: list[Key], decision: RetryDecision, error: ServiceError) -> None:
        self.retry.extend(keys)
        self.decisions.append(decision)
        self.last_error = error


class AsyncClient:
    """A connection to a keyval cluster for one trio task tree. See the package docstring."""

    def __init__(self, router: Router, *, ack: str, autobatch: bool = True) -> None:
        self._router = router
        self.ack = admit_ack(ack)
        self._closed = False
        # Concurrent gets share GetMany requests (keyval.client.autobatch); None: off.
        self._batcher = GetBatcher(router) if autobatch else None
        self._gets_in_flight = 0

    @property
    def autobatch(self) -> bool:
        return self._batcher is not None

    def statistics(self) -> dict[str, int]:
        """Gets in flight and, with auto-batching, the batches and keys sent so far."""
        stats = {"gets_in_flight": self._gets_in_flight}
        if self._batcher is not None:
            stats.update(self._batcher.statistics())
        return stats

    @property
    def router(self) -> Router:
        return self._router

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this client is closed")

    def _ack(self, ack: str | None) -> str:
        return self.ack if ack is None else admit_ack(ack)

    async def _call(self, slot: int, msg: Message) -> Message:
        self._check_open()
        return await self._router.call(slot, msg)

    # ------------------------------------------------------------------ reads

    async def get(self, key: Key, default: Any = None) -> Any:
        entry = await self._start_get(key)
        return default if entry.version == 0 else entry.value

    async def get_entry(self, key: Key) -> Entry:
        """(value, version) of `key`; (None, 0) when it is absent.

        With auto-batching on (the default), a get issued while other gets of this client are
        in flight joins them in a GetMany to its drone (keyval.client.autobatch); a lone get
        is sent as it is."""
        return await self._start_get(key)

    def _start_get(self, key: Key) -> Awaitable[Entry]:
        """The get of `key`, to await (a plain function, so `get` awaits one frame less)."""
        data, slot = check_key_slot(key)
        self._check_open()
        table = self._router.table
        if self._batcher is None or self._gets_in_flight == 0 or table is None:
            return self._get_alone(key, slot, None)
        route = table.route(slot)
        if route is None:
            return self._get_alone(key, slot, None)
        return self._get_batched(route, key, len(data), slot)

    async def _get_batched(self, route: Route, key: Key, key_bytes: int, slot: int) -> Entry:
        assert self._batcher is not None  # _start_get checked
        deadline = trio.current_time() + self._router.policy.deadline_s
        self._gets_in_flight += 1
        try:
            entry = await self._batcher.get(route, key, key_bytes, deadline)
        finally:
            self._gets_in_flight -= 1
        if entry is RETRY_ALONE:  # the batch failed: this key's own get finds its own answer
            attempts = Attempts(self._router.policy, deadline=deadline)
            return await self._get_alone(key, slot, attempts)
        return cast(Entry, entry)

    async def _get_alone(self, key: Key, slot: int, attempts: Attempts | None) -> Entry:
        self._gets_in_flight += 1
        try:
            reply = _expect(await self._router.call(slot, Get(key=key), attempts), ValueReply)
        finally:
            self._gets_in_flight -= 1
        return Entry(reply.value, reply.version) if reply.found else ABSENT

    async def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The keys that exist, mapped to their values (absent keys are left out)."""
        entries = await self.get_many_entries(keys)
        return {key: entry.value for key, entry in entries.items() if entry.version != 0}

    async def get_many_entries(self, keys: Iterable[Key]) -> dict[Key, Entry]:
        """Every key mapped to its Entry; requests per owning drone (at most
        GET_MANY_KEYS_PER_REQUEST keys each), sent concurrently. Keys whose request failed
        (moved, unreachable drone, loading) are grouped again by the latest map and retried
        under one deadline for the whole call."""
        self._check_open()
        unique = {admit_key(key): key for key in keys}
        found: dict[Key, Entry] = {}
        pending = list(unique.values())
        attempts = self._router.start()
        while pending:
            round_ = _GetManyRound()
            groups = await self._group_by_drone(pending, attempts, round_)
            async with trio.open_nursery() as nursery:
                for route, group in groups:
                    nursery.start_soon(self._get_group, route, group, attempts, found, round_)
            if round_.fatal is not None:
                raise round_.fatal
            pending = round_.retry
            if pending and round_.last_error is not None:
                decision = merge_decisions(round_.decisions)
                await self._router.back_off(attempts, decision, round_.last_error)
        return {key: found[key] for key in unique.values()}

    async def _group_by_drone(
        self, keys: list[Key], attempts: Attempts, round_: _GetManyRound
    ) -> list[tuple[Route, list[Key]]]:
        """Keys by owning drone, in requests of at most GET_MANY_KEYS_PER_REQUEST keys; keys of
        slots the map gives no owner go to `round_` (after a map refresh) for the next round."""
        groups: dict[str, tuple[Route, list[Key]]] = {}
        for key in keys:
            try:
                route = await self._router.route(key_slot(key), attempts)
            except NoOwner as error:
                decision = await self._router.classify(error, attempts, allow_ask=False)
                round_.failed([key], decision, error)
                continue
            groups.setdefault(route.drone, (route, []))[1].append(key)
        return [
            (route, group[start : start + GET_MANY_KEYS_PER_REQUEST])
            for route, group in groups.values()
            for start in range(0, len(group), GET_MANY_KEYS_PER_REQUEST)
        ]

    async def _get_group(
        self,
        route: Route,
        keys: list[Key],
        attempts: Attempts,
        found: dict[Key, Entry],
        round_: _GetManyRound,
    ) -> None:
        """One GetMany try; keys that must be tried again go to `round_`, an error that
        ends the call is kept there (raised once every request of the round is done)."""
        try:
            await self._try_group(route, keys, attempts, found, round_)
        except ServiceError as error:
            if round_.fatal is None:
                round_.fatal = error

    async def _try_group(
        self,
        route: Route,
        keys: list[Key],
        attempts: Attempts,
        found: dict[Key, Entry],
        round_: _GetManyRound,
    ) -> None:
        try:
            reply = await self._router.send(route, GetMany(keys=keys), attempts)
        except DeadlineExceeded:
            raise
        except Ask:
            for key in keys:  # a slot is moving: ASK applies per key, so ask per key
                found[key] = await self.get_entry(key)
            return
        except TooLarge:
            if len(keys) == 1:
                raise
            half = len(keys) // 2  # the values do not fit one reply: ask for fewer at once
            await self._try_group(route, keys[:half], attempts, found, round_)
            await self._try_group(route, keys[half:], attempts, found, round_)
            return
        except (Moved, Unavailable, Timeout) as error:
            decision = await self._router.classify(error, attempts, allow_ask=False)
            round_.failed(keys, decision, error)  # regrouped with the latest map next round
            return
        values = _expect(reply, ValuesReply)
        if len(values.items) != len(keys):
            raise Internal(f"asked {len(keys)} keys, the drone answered {len(values.items)}")
        for key, (exists, value, version) in zip(keys, values.items, strict=True):
            found[key] = Entry(value, version) if exists else ABSENT

    async def scan(
        self,
        prefix: Key | None = None,
        *,
        start: Key | None = None,
        end: Key | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Item]:
        """(key, value, version) in key order; see keyval.client.scanning for what it promises."""
        self._check_open()
        cursor = ScanCursor(self._router, prefix=prefix, start=start, end=end, limit=limit)
        while (page := await cursor.next_page()) is not None:
            for item in page:
                yield item

    def scan_cursor(
        self,
        prefix: Key | None = None,
        *,
        start: Key | None = None,
        end: Key | None = None,
        limit: int | None = None,
    ) -> ScanCursor:
        """Page by page: `await cursor.next_page()` until it returns None."""
        self._check_open()
        return ScanCursor(self._router, prefix=prefix, start=start, end=end, limit=limit)

    # ------------------------------------------------------------------ writes

    async def put(self, key: Key, value: Any, *, ack: str | None = None) -> int:
        """Store `value`; returns the new version."""
        slot = check_key_slot(key)[1]
        admit_value(value)
        msg = Put(key=key, value=value, op_id=os.urandom(OP_ID_BYTES), ack=self._ack(ack))
        return _expect(await self._call(slot, msg), Written).version

    async def delete(self, key: Key, *, ack: str | None = None) -> bool:
        """Remove `key`; True if it existed."""
        slot = check_key_slot(key)[1]
        msg = Delete(key=key, op_id=os.urandom(OP_ID_BYTES), ack=self._ack(ack))
        return _expect(await self._call(slot, msg), Written).existed

    async def cas(
        self,
        key: Key,
        expected_version: int,
        value: Any,
        *,
        delete: bool = False,
        ack: str | None = None,
    ) -> int:
        """Write `value` (or delete, with delete=True) only if the key's version is
        `expected_version` (0: the key must be absent). Returns the new version; raises
        Conflict if the version differs."""
        slot = check_key_slot(key)[1]
        admit_version(expected_version)
        if not delete:
            admit_value(value)
        msg = CompareAndSet(
            key=key,
            expected_version=expected_version,
            value=None if delete else value,
            op_id=os.urandom(OP_ID_BYTES),
            delete=delete,
            ack=self._ack(ack),
        )
        return _expect(await self._call(slot, msg), Written).version

    # ------------------------------------------------------------------ transactions

    def transaction(
        self, *, ack: str | None = None, time_bound_ms: int = DEFAULT_TIME_BOUND_MS
    ) -> AsyncTransaction:
        """A transaction; it must commit within `time_bound_ms` of its first operation."""
        self._check_open()
        return AsyncTransaction(
            self._router,
            self._ack(ack),
            time_bound_ms=time_bound_ms,
            fetch_many=self.get_many_entries,
        )

    async def transact(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        max_attempts: int = MAX_TRANSACTION_ATTEMPTS,
        ack: str | None = None,
    ) -> T:
        """Run `await fn(tx)` in a transaction and commit; on Conflict run it again, with
        backoff, up to `max_attempts` times, then raise TooManyConflicts."""
        last: Conflict | None = None
        for attempt in range(1, max_attempts + 1):
            try:
                async with self.transaction(ack=ack) as tx:
                    result = await fn(tx)
                return result
            except Conflict as error:
                last = error
                if attempt < max_attempts:
                    rng = self._router.rng
                    await trio.sleep(self._router.policy.backoff_s(attempt, rng))
        raise TooManyConflicts(
            f"transaction lost {max_attempts} times to conflicts", detail={"attempts": max_attempts}
        ) from last

    # ------------------------------------------------------------------ life cycle

    async def aclose(self) -> None:
        self._closed = True
        await self._router.pool.aclose()


def _expect(reply: Message, kind: type[T]) -> T:
    if not isinstance(reply, kind):
        raise Internal(f"unexpected reply {reply.TYPE}")
    return reply


def client_from_settings(
    settings: ClientSettings,
    dialer: Dialer,
    *,
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
) -> AsyncClient:
    policy = policy or RetryPolicy(deadline_s=settings.deadline_s)
    router = Router(
        commanders=settings.commanders,
        pool=LinkPool(dialer),
        policy=policy,
        rng=rng or random.Random(),
    )
    return AsyncClient(router, ack=settings.ack, autobatch=settings.autobatch)


def ticket_dialer(settings: ClientSettings) -> Dialer:
    """Log in as the config's principal (auth.client.Credentials)."""
    if settings.identity is None:
        raise ValueError("settings without an identity need an explicit dialer")
    return TicketDialer.from_identity(settings.identity)


@contextlib.asynccontextmanager
async def aconnect(
    config: str | Path | ClientSettings | None = None,
    *,
    dialer: Dialer | None = None,
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
    autobatch: bool | None = None,
) -> AsyncIterator[AsyncClient]:
    """`async with aconnect(path) as kv:` — path of a client config, else $KEYVAL_CONFIG.

    `dialer` replaces ticket login (tests use a pre-shared key); `rng` drives the backoff
    jitter (seed it for a reproducible run); `autobatch` overrides the config's (on unless
    the config says `autobatch = false`)."""
    settings = config if isinstance(config, ClientSettings) else load_settings(config)
    if autobatch is not None:
        settings = dataclasses.replace(settings, autobatch=autobatch)
    dialer = dialer or ticket_dialer(settings)
    client = client_from_settings(settings, dialer, policy=policy, rng=rng)
    try:
        await client.router.refresh(client.router.start(), seen=0)  # fail early if unreachable
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
