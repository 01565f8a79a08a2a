"""Optimistic transactions: reads record versions, writes are buffered, commit validates.

`TxnBuffer` is the pure bookkeeping (no I/O): the read set, the buffered writes in order, and
read-your-writes lookups. `AsyncTransaction` adds the network: reads go to the key's owner,
commit sends one `kv.txn_commit` when one drone owns every key, and runs two-phase commit
(keyval.client.twopc) when they live on several drones, read-only transactions included.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import trio

from keyval.client.checks import admit_key, admit_value
from keyval.client.errors import DeadlineExceeded, TransactionFinished
from keyval.client.policy import Attempts
from keyval.client.router import RETRYABLE_ERRORS, RetryableError, Router
from keyval.client.routing import Route
from keyval.client.twopc import (
    DEFAULT_TIME_BOUND_MS,
    TransactionTooOld,
    commit_across,
    split_now,
)
from keyval.keys import key_slot
from keyval.messages import Committed, Get, TxnCommit, ValueReply
from wire.errors import Conflict, Internal, TooLarge, WireError
from wire.messages import Key, Message

T = TypeVar("T")

OP_ID_BYTES = 16  # 128 random bits: a collision between two clients' op ids is not a concern

# Keys one transaction may touch: its commit is one message and must fit a frame; FoundationDB
# caps a transaction at 10 MB, and a commit here is one request of at most 1 MiB anyway.
MAX_TRANSACTION_KEYS = 1000

WRITE_PUT = "put"
WRITE_DELETE = "del"


class Entry(NamedTuple):
    value: Any  # None when absent
    version: int  # 0 when absent


ABSENT = Entry(None, 0)

# Reads several keys at once (AsyncClient.get_many_entries): key -> Entry for every key asked.
FetchMany = Callable[[list[Key]], Awaitable[dict[Key, Entry]]]


class TxnBuffer:
    """Read set and write buffer of one transaction, keyed by canonical key."""

    def __init__(self) -> None:
        self._reads: dict[bytes, tuple[Key, Entry]] = {}
        self._writes: dict[bytes, tuple[Key, str, Any]] = {}

    def lookup(self, canonical: bytes) -> Entry | None:
        """What this transaction already knows of a key: its own write, else its earlier read."""
        write = self._writes.get(canonical)
        if write is not None:
            _, op, value = write
            return Entry(value, -1) if op == WRITE_PUT else ABSENT
        read = self._reads.get(canonical)
        return read[1] if read is not None else None

    def record_read(self, canonical: bytes, key: Key, entry: Entry) -> None:
        self._check_room(canonical)
        self._reads.setdefault(canonical, (key, entry))

    def put(self, canonical: bytes, key: Key, value: Any) -> None:
        self._check_room(canonical)
        self._writes[canonical] = (key, WRITE_PUT, value)

    def delete(self, canonical: bytes, key: Key) -> None:
        self._check_room(canonical)
        self._writes[canonical] = (key, WRITE_DELETE, None)

    def _check_room(self, canonical: bytes) -> None:
        if canonical in self._reads or canonical in self._writes:
            return
        if len(self.keys()) >= MAX_TRANSACTION_KEYS:
            raise TooLarge(f"a transaction touches at most {MAX_TRANSACTION_KEYS} keys")

    def keys(self) -> dict[bytes, Key]:
        """Every key read or written, canonical -> key."""
        found = {c: key for c, (key, _) in self._reads.items()}
        found.update((c, key) for c, (key, _, _) in self._writes.items())
        return found

    @property
    def empty(self) -> bool:
        return not self._reads and not self._writes

    @property
    def read_only(self) -> bool:
        return not self._writes

    def commit_message(self, op_id: bytes, ack: str) -> TxnCommit:
        return TxnCommit(
            reads=[(key, entry.version) for key, entry in self._reads.values()],
            writes=list(self._writes.values()),
            op_id=op_id,
            ack=ack,
        )


class _State(enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"
    FAILED = "failed"


class AsyncTransaction:
    """`async with client.transaction() as tx:` — commits when the block ends without error."""

    def __init__(
        self,
        router: Router,
        ack: str,
        *,
        time_bound_ms: int = DEFAULT_TIME_BOUND_MS,
        fetch_many: FetchMany | None = None,
    ) -> None:
        if time_bound_ms <= 0:
            raise ValueError("time_bound_ms must be positive")
        self._router = router
        self._fetch_many = fetch_many
        self._ack = ack
        self._buffer = TxnBuffer()
        self._state = _State.OPEN
        # The bound runs from the first operation (on the trio loop: the blocking client builds
        # transactions in its own thread); the commit must be decided before it ends.
        self._time_bound_s = time_bound_ms / 1000
        self._deadline: float | None = None
        self.versions: list[int] = []  # after commit: the new version of each write, in order

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            await self.commit()
        else:
            self._state = _State.FAILED  # nothing was sent; dropping the buffer is the abort

    def _check_open(self) -> float:
        """Raise unless open; the deadline of the transaction's time bound (trio clock)."""
        if self._state is not _State.OPEN:
            raise TransactionFinished(f"this transaction is already {self._state.value}")
        if self._deadline is None:
            self._deadline = trio.current_time() + self._time_bound_s
        return self._deadline

    async def get(self, key: Key, default: Any = None) -> Any:
        entry = await self.get_entry(key)
        return default if entry.version == 0 else entry.value

    async def get_entry(self, key: Key) -> Entry:
        """(value, version) as this transaction sees it; version -1 marks its own unsaved write."""
        self._check_open()
        canonical = admit_key(key)
        known = self._buffer.lookup(canonical)
        if known is not None:
            return known
        reply = await self._router.call(key_slot(key), Get(key=key))
        if not isinstance(reply, ValueReply):
            raise Internal(f"a drone answered kv.get with {reply.TYPE}")
        entry = Entry(reply.value, reply.version) if reply.found else ABSENT
        self._buffer.record_read(canonical, key, entry)
        return entry

    async def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The keys that exist, mapped to their values; one request per drone, concurrently."""
        entries = await self.get_many_entries(keys)
        return {key: entry.value for key, entry in entries.items() if entry.version != 0}

    async def get_many_entries(self, keys: Iterable[Key]) -> dict[Key, Entry]:
        """Every key mapped to its Entry as this transaction sees it (reads are recorded)."""
        self._check_open()
        wanted = {admit_key(key): key for key in keys}
        found: dict[Key, Entry] = {}
        missing: dict[bytes, Key] = {}
        for canonical, key in wanted.items():
            known = self._buffer.lookup(canonical)
            if known is None:
                missing[canonical] = key
            else:
                found[key] = known
        if missing and self._fetch_many is None:
            for key in missing.values():
                found[key] = await self.get_entry(key)
        elif missing and self._fetch_many is not None:
            fetched = await _single_error(self._fetch_many(list(missing.values())))
            for canonical, key in missing.items():
                self._buffer.record_read(canonical, key, fetched[key])
                found[key] = fetched[key]
        return {key: found[key] for key in wanted.values()}

    async def put(self, key: Key, value: Any) -> None:
        self._check_open()
        canonical = admit_key(key)
        admit_value(value)
        self._buffer.put(canonical, key, value)

    async def delete(self, key: Key) -> None:
        self._check_open()
        canonical = admit_key(key)
        self._buffer.delete(canonical, key)

    async def commit(self) -> list[int]:
        """Validate the reads and apply the writes on the owning drone(s); Conflict if not.

        One owning drone: one kv.txn_commit. Several: two-phase commit, always durable."""
        deadline = self._check_open()
        if self._buffer.empty:
            self._state = _State.COMMITTED
            return []
        request = self._buffer.commit_message(os.urandom(OP_ID_BYTES), self._ack)
        try:
            if trio.current_time() >= deadline:
                raise TransactionTooOld("the transaction's time bound passed before it committed")
            # One split by drone from the map in hand (no await) serves both paths.
            parts = split_now(self._router, request.reads, request.writes)
            if parts is not None and len(parts) == 1:
                (part,) = parts.values()
                versions = await self._commit_on_one(request, part.route)
            else:
                across = await commit_across(
                    self._router, request.reads, request.writes, deadline, parts
                )
                versions = await self._commit_on_one(request) if across is None else across
        except BaseException:
            if self._state is _State.OPEN:
                self._state = _State.FAILED
            raise
        self._state = _State.COMMITTED
        self.versions = versions
        return self.versions

    async def _commit_on_one(self, request: TxnCommit, first: Route | None = None) -> list[int]:
        """One kv.txn_commit; `first`: the owner the current map names (tried once directly,
        with no closure or retry loop: the happy path), else routed from the map."""
        failed: RetryableError | None = None
        attempts = self._router.start()
        if first is not None:
            try:
                return _versions(await self._router.send(first, request, attempts))
            except DeadlineExceeded:
                raise
            except RETRYABLE_ERRORS as error:
                failed = error
        keys = [key for key, _ in request.reads] + [key for key, _, _ in request.writes]
        ask: list[Route | None] = [None]

        async def once(attempts: Attempts) -> list[int]:
            target, ask[0] = ask[0], None
            if target is None:
                target = await self._commit_route(keys, attempts)
            return _versions(await self._router.send(target, request, attempts))

        return await self._router.retrying(
            attempts,
            once,
            on_ask=lambda route: ask.__setitem__(0, route),
            failed=failed,
        )

    async def _commit_route(self, keys: list[Key], attempts: Attempts) -> Route:
        routes = {}
        for key in keys:
            route = await self._router.route(key_slot(key), attempts)
            routes[route.drone] = route
        if len(routes) > 1:  # a slot moved meanwhile: fail this try; the caller re-runs
            raise Conflict(
                "the transaction's keys moved onto several drones while it committed",
                detail={"drones": sorted(routes)},
            )
        return next(iter(routes.values()))


def _versions(reply: Message) -> list[int]:
    if not isinstance(reply, Committed):
        raise Internal(f"a drone answered kv.txn_commit with {reply.TYPE}")
    return list(reply.versions)


async def _single_error(call: Awaitable[T]) -> T:
    """Await `call`; a group of wire errors from its concurrent requests (one per drone)
    becomes its first error, the way a single-key read reports one."""
    try:
        return await call
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if leaves and all(isinstance(leaf, WireError) for leaf in leaves):
            raise leaves[0] from group
        raise


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


async def pause_before_rerun(router: Router, attempt: int) -> None:
    """Backoff between re-runs of a transaction function after a conflict."""
    await trio.sleep(router.policy.backoff_s(attempt, router.rng))
