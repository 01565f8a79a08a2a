"""Everything one drone holds, shared by its request handlers and its background tasks."""

from __future__ import annotations

import dataclasses
import os

import trio

from auth.roles import check_key_permission
from keyval.drone.batcher import DbLink, WriteBatcher
from keyval.drone.opcache import OpCache
from keyval.drone.pending import PendingWrites
from keyval.drone.slots import SlotStatus, SlotTable
from keyval.keys import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, Key
from keyval.store import SlotStore
from wire.channel import PeerInfo
from wire.errors import Unauthorized, Unavailable

# How long a request for a slot still being reseeded waits for it before UNAVAILABLE. A slot
# streams in well under a second; clients retry after retry_after_ms anyway.
LOADING_WAIT_MS = 1000


def check_permission(peer: PeerInfo, key: Key) -> None:
    """Unauthorized unless `peer` may touch `key` (auth.roles; int keys match no prefix)."""
    if isinstance(key, int):
        if peer.permissions:
            raise Unauthorized(
                f"principal {peer.name!r} is limited to key prefixes; int key {key} has none",
                detail={"principal": peer.name, "prefixes": list(peer.permissions)},
            )
        return
    check_key_permission(peer, key)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES

    def __post_init__(self) -> None:
        if self.max_key_bytes <= 0 or self.max_value_bytes <= 0:
            raise ValueError("key and value limits must be positive")


class DroneState:
    """The slot table, the data, and the write machinery of one drone."""

    def __init__(self, name: str, db: DbLink, limits: Limits | None = None) -> None:
        self.name = name
        self.db = db  # the db link; 2PC participants vote and recover over it
        self.limits = limits or Limits()
        self.table = SlotTable(name)
        self.store = SlotStore()
        self.pending = PendingWrites()
        self.ops = OpCache()
        self.batcher = WriteBatcher(db, lambda: self.table.grant)
        self._loaded = trio.Event()  # set and replaced whenever a slot finishes loading
        self.requests_served = 0  # kv requests answered (for the ops/s in the heartbeat load)
        self._rate_mark: tuple[float, int] | None = None  # (time, requests_served) last load

    def now(self) -> float:
        return trio.current_time()

    def notify_loaded(self) -> None:
        self._loaded.set()
        self._loaded = trio.Event()

    async def wait_serving(self, slot: int) -> int:
        """The slot's epoch once it may be served; waits (bounded) while it loads."""
        if self.table.status_of(slot) is not SlotStatus.LOADING:  # the common case: no timer
            return self.table.check_serving(slot, self.now())
        with trio.move_on_after(LOADING_WAIT_MS / 1000):
            while self.table.status_of(slot) is SlotStatus.LOADING:
                await self._loaded.wait()
        return self.table.check_serving(slot, self.now())

    def check_slot_servable(self, slot: int, epoch: int) -> None:
        """Raise Unavailable/Moved unless `slot` is still servable under `epoch` right now.

        Called with no await between it and assigning versions, after any waiting."""
        current = self.table.check_serving(slot, self.now())
        if current != epoch:
            raise Unavailable(
                f"slot {slot} changed epoch while the request waited",
                detail={"retry_after_ms": self.table.retry_after_ms, "slot": slot},
            )

    def load(self) -> dict[str, int]:
        """Numbers for the heartbeat: keys, resident memory, requests per second since the
        previous call, and the batcher's statistics."""
        now, served = self.now(), self.requests_served
        ops_per_s = 0
        if self._rate_mark is not None and now > self._rate_mark[0]:
            ops_per_s = round((served - self._rate_mark[1]) / (now - self._rate_mark[0]))
        self._rate_mark = (now, served)
        return {
            "keys": self.store.key_count(),
            "bytes": resident_bytes(),
            "ops_per_s": ops_per_s,
            "slots": len(self.table.held_slots()),
            "pending_keys": len(self.pending),
            **self.batcher.statistics(),
        }


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
