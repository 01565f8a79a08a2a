"""Reseed: stream a newly granted slot from the db before serving it.

The drone pages through DbReadSlot with its current grant (the db fences a stale one), builds
the slot's ordered map aside, and installs it only if the slot is still granted under the same
epoch when the last page arrives. Until then requests for the slot wait or get UNAVAILABLE.
"""

from __future__ import annotations

import logging

import trio

from keyval import observe
from keyval.drone.batcher import DbLink
from keyval.drone.slots import Drop, Instruction, Reseed
from keyval.drone.state import DroneState
from keyval.messages import DbReadSlot, DbSlotPage
from keyval.store import Item
from wire.errors import Internal, ServiceError

log = logging.getLogger("keyval.drone")

# Keys per DbReadSlot page: large enough to stream fast, small enough for one frame of
# small values (the db also caps a page by bytes).
RESEED_PAGE_KEYS = 2000

# Pages one slot may take: 16384 pages of 2000 keys is 32 M keys, far past one slot's share.
MAX_RESEED_PAGES = 16384

# How long one page may take before the reseed is abandoned (and retried on a later grant).
RESEED_PAGE_TIMEOUT_MS = 10_000

# Slots streamed at once: bounds memory held aside and load on the db during a rebalance.
# A failover hands a survivor thousands of (mostly small) slots, one db round trip each; 32 in
# flight keep the db busy instead of waiting on round trips (4 took > 10 s for 5461 slots on
# a loaded 2-core machine).
MAX_CONCURRENT_RESEEDS = 32

# Pause before retrying a failed reseed: the db may be restarting or the grant being replaced.
RESEED_RETRY_MS = 200


async def read_slot(link: DbLink, state: DroneState, slot: int) -> list[Item]:
    """Every (key, value, version) of `slot` in the db, read under the current grant."""
    items: list[Item] = []
    after: bytes | None = None
    for _ in range(MAX_RESEED_PAGES):
        grant = state.table.grant
        if grant is None:
            raise Internal("no grant to reseed with")
        reply = await link.request(
            DbReadSlot(grant=grant, slot=slot, after=after, limit=RESEED_PAGE_KEYS),
            timeout=RESEED_PAGE_TIMEOUT_MS / 1000,
        )
        if not isinstance(reply, DbSlotPage):
            raise Internal(f"db answered a slot read with {type(reply).__name__}")
        items.extend(reply.items)
        if reply.done or not reply.items:
            return items
        after = reply.items[-1][0]
    raise Internal(f"slot {slot} has more than {MAX_RESEED_PAGES} pages")


class Reseeder:
    """Carries out the slot table's instructions: reseed (bounded concurrency) and drop."""

    def __init__(self, state: DroneState, link: DbLink) -> None:
        self.state = state
        self.link = link
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_RESEEDS)

    def set_link(self, link: DbLink) -> None:
        self.link = link

    def carry_out(self, instructions: list[Instruction], nursery: trio.Nursery) -> None:
        for instruction in instructions:
            if isinstance(instruction, Drop):
                self.state.store.drop_slot(instruction.slot)
            elif isinstance(instruction, Reseed):
                nursery.start_soon(self.reseed, instruction)

    async def reseed(self, instruction: Reseed) -> None:
        """Load the slot, retrying while it stays granted under the same epoch."""
        slot, epoch = instruction.slot, instruction.epoch
        metrics = observe.current_metrics()
        while self.state.table.epoch_of(slot) == epoch:
            try:
                async with self._limiter:
                    if self.state.table.epoch_of(slot) != epoch:
                        return
                    with metrics.reseeds_in_progress.track_inprogress():
                        items = await read_slot(self.link, self.state, slot)
            except ServiceError as error:
                metrics.reseed_failures.inc()
                log.warning("reseed of slot %d failed: %s; retrying", slot, error.message)
                await trio.sleep(RESEED_RETRY_MS / 1000)
                continue
            if self.install(slot, epoch, items):
                metrics.reseeds.inc()
                metrics.reseed_keys.inc(len(items))
            return

    def install(self, slot: int, epoch: int, items: list[Item]) -> bool:
        """Install a loaded slot if it is still wanted; wake requests waiting for it."""
        if self.state.table.epoch_of(slot) != epoch:
            return False
        self.state.store.install_slot(slot, items)
        self.state.table.mark_loaded(slot, epoch)
        self.state.notify_loaded()
        return True
