"""The blocking client: `with keyval.connect(config) as kv:`.

Each `connect()` starts one trio loop in a background thread that owns an `AsyncClient`; the
methods call into it with `trio.from_thread.run` and the loop's TrioToken and wait for the
answer. One client may be shared by threads (calls are queued onto its loop), but the usual
pattern is one per thread. `close()` (or leaving the `with` block) stops the loop and joins it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio

from keyval.client.aio import MAX_TRANSACTION_ATTEMPTS, AsyncClient, aconnect
from keyval.client.config import ClientSettings
from keyval.client.errors import ClientClosed, TooManyConflicts
from keyval.client.links import Dialer
from keyval.client.policy import RetryPolicy
from keyval.client.scanning import Item
from keyval.client.txn import AsyncTransaction, Entry
from wire.errors import Conflict
from wire.messages import Key

T = TypeVar("T")

# How long close() waits for the loop thread to finish shutting its connections.
CLOSE_JOIN_S = 5.0


class _Loop:
    """A trio loop in a daemon thread, running `aconnect(...)` until told to stop."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._client: AsyncClient | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="keyval-client", daemon=True)

    def start(self) -> AsyncClient:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        assert self._client is not None  # set before _ready when there is no error
        return self._client

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # handed to the thread that called connect()
            self._error = error
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._opener() as client:
            self._client = client
            self._ready.set()
            await self._stop.wait()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None or self._stop is None or self._stop.is_set():
            raise ClientClosed("this client is closed")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise ClientClosed("this client is closed") from None

    def stop(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass  # the loop already ended
        self._thread.join(CLOSE_JOIN_S)


class Transaction:
    """The blocking face of an AsyncTransaction: `with kv.transaction() as tx:`."""

    def __init__(self, loop: _Loop, inner: AsyncTransaction) -> None:
        self._loop, self._inner = loop, inner

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._loop.run(self._inner.__aexit__, kind, error, traceback)

    @property
    def versions(self) -> list[int]:
        return self._inner.versions

    def get(self, key: Key, default: Any = None) -> Any:
        return self._loop.run(self._inner.get, key, default)

    def get_entry(self, key: Key) -> Entry:
        result: Entry = self._loop.run(self._inner.get_entry, key)
        return result

    def put(self, key: Key, value: Any) -> None:
        self._loop.run(self._inner.put, key, value)

    def delete(self, key: Key) -> None:
        self._loop.run(self._inner.delete, key)

    def commit(self) -> list[int]:
        result: list[int] = self._loop.run(self._inner.commit)
        return result


class Client:
    """Blocking client; every method mirrors AsyncClient's."""

    def __init__(self, loop: _Loop, inner: AsyncClient) -> None:
        self._loop, self._inner = loop, inner

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.stop()

    @property
    def ack(self) -> str:
        return self._inner.ack

    def get(self, key: Key, default: Any = None) -> Any:
        return self._loop.run(self._inner.get, key, default)

    def get_entry(self, key: Key) -> Entry:
        result: Entry = self._loop.run(self._inner.get_entry, key)
        return result

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        result: dict[Key, Any] = self._loop.run(self._inner.get_many, list(keys))
        return result

    def get_many_entries(self, keys: Iterable[Key]) -> dict[Key, Entry]:
        result: dict[Key, Entry] = self._loop.run(self._inner.get_many_entries, list(keys))
        return result

    def put(self, key: Key, value: Any, *, ack: str | None = None) -> int:
        result: int = self._loop.run(partial(self._inner.put, ack=ack), key, value)
        return result

    def delete(self, key: Key, *, ack: str | None = None) -> bool:
        result: bool = self._loop.run(partial(self._inner.delete, ack=ack), key)
        return result

    def cas(
        self,
        key: Key,
        expected_version: int,
        value: Any,
        *,
        delete: bool = False,
        ack: str | None = None,
    ) -> int:
        call = partial(self._inner.cas, delete=delete, ack=ack)
        result: int = self._loop.run(call, key, expected_version, value)
        return result

    def scan(
        self,
        prefix: Key | None = None,
        *,
        start: Key | None = None,
        end: Key | None = None,
        limit: int | None = None,
    ) -> Iterator[Item]:
        # Building a cursor only checks arguments; its pages are fetched on the loop.
        cursor = self._inner.scan_cursor(prefix, start=start, end=end, limit=limit)
        while (page := self._loop.run(cursor.next_page)) is not None:
            yield from page

    def transaction(self, *, ack: str | None = None) -> Transaction:
        # Opening a transaction sends nothing; its operations run on the loop.
        return Transaction(self._loop, self._inner.transaction(ack=ack))

    def transact(
        self,
        fn: Callable[[Transaction], T],
        *,
        max_attempts: int = MAX_TRANSACTION_ATTEMPTS,
        ack: str | None = None,
    ) -> T:
        """Run `fn(tx)` in a transaction and commit; re-run on Conflict with backoff, up to
        `max_attempts` times, then raise TooManyConflicts. `fn` runs in the calling thread."""
        last: Conflict | None = None
        router = self._inner.router
        for attempt in range(1, max_attempts + 1):
            try:
                with self.transaction(ack=ack) as tx:
                    result = fn(tx)
                return result
            except Conflict as error:
                last = error
                if attempt < max_attempts:
                    time.sleep(router.policy.backoff_s(attempt, router.rng))
        raise TooManyConflicts(
            f"transaction lost {max_attempts} times to conflicts", detail={"attempts": max_attempts}
        ) from last


def connect(
    config: str | Path | ClientSettings | None = None,
    *,
    dialer: Dialer | None = None,
    policy: RetryPolicy | None = None,
) -> Client:
    """`with connect(path) as kv:` — path of a client config, else $KEYVAL_CONFIG."""
    loop = _Loop(lambda: aconnect(config, dialer=dialer, policy=policy))
    return Client(loop, loop.start())
