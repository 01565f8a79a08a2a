"""Pending writes: per key, how many assigned-but-not-yet-durable writes are in flight.

Plain puts and deletes do not wait for them: each takes the next version and the db applies
batches in order. A compare-and-set or transaction must validate against the state its writes
will follow, so it first waits (bounded) until none of its keys has a pending write. Validation
and marking its own writes pending then happen without an await in between, which makes
OCC validation and ordering atomic on the single trio thread.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from wire.errors import Unavailable

# How long a cas/txn waits for earlier writes to its keys to become durable. A db batch takes
# milliseconds; seconds means the db is struggling, and the client should back off and retry.
PENDING_WAIT_MS = 2000

# What the client is told to wait before retrying after such a timeout.
PENDING_RETRY_AFTER_MS = 200


class _Pending:
    __slots__ = ("count", "resolved")

    def __init__(self) -> None:
        self.count = 0
        self.resolved: trio.Event | None = None  # made when a cas/txn first waits on the key


class PendingWrites:
    """Counts of in-flight writes per (slot, canonical key)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[int, bytes], _Pending] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def is_pending(self, slot: int, key: bytes) -> bool:
        return (slot, key) in self._keys

    def keys_in_slot(self, slot: int) -> list[tuple[int, bytes]]:
        """Keys of `slot` with a pending write (a live move drains them before handing over)."""
        return [key for key in self._keys if key[0] == slot]

    def add(self, keys: Iterable[tuple[int, bytes]]) -> None:
        for key in keys:
            entry = self._keys.get(key)
            if entry is None:
                entry = self._keys[key] = _Pending()
            entry.count += 1

    def resolve(self, keys: Iterable[tuple[int, bytes]]) -> None:
        """The writes added for `keys` are durable or failed."""
        for key in keys:
            entry = self._keys.get(key)
            if entry is None:
                raise RuntimeError(f"resolving a write that was never pending: {key!r}")
            entry.count -= 1
            if entry.count == 0:
                del self._keys[key]
                if entry.resolved is not None:
                    entry.resolved.set()

    async def wait_clear(self, keys: Iterable[tuple[int, bytes]]) -> None:
        """Return once none of `keys` has a pending write; Unavailable after PENDING_WAIT_MS."""
        wanted = list(keys)
        with trio.move_on_after(PENDING_WAIT_MS / 1000):
            while True:
                busy = next((self._keys[k] for k in wanted if k in self._keys), None)
                if busy is None:
                    return
                if busy.resolved is None:
                    busy.resolved = trio.Event()
                await busy.resolved.wait()
        raise Unavailable(
            "earlier writes to these keys are not yet durable",
            detail={"retry_after_ms": PENDING_RETRY_AFTER_MS},
        )
