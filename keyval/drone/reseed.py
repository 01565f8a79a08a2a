"""Reseed: stream newly granted slots from the db before serving them.

A grant's new slots are loaded in contiguous runs with the bulk read db.read_slots: one page
carries the items of many slots in (slot, key) order, so a failover's thousands of small
slots take a few round trips instead of one each. The db fences every slot of the range with
the drone's current grant. Each slot is installed, and served, as soon as a page has passed
it (the page's resume point lies in a later slot, or the range is exhausted), and only if it
is still granted under the epoch it was loaded for. Until then requests for the slot wait or
get UNAVAILABLE. A live move's target reloads its one slot the same way (a run of one).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from keyval import observe
from keyval.drone.batcher import DbLink
from keyval.drone.slots import Drop, Instruction, Reseed
from keyval.drone.state import DroneState
from keyval.messages import DbReadSlots, DbSlotsPage
from wire import codec
from wire.errors import DecodeError, Fenced, Internal, ServiceError

log = logging.getLogger("keyval.drone")

# A (slot, epoch) the grant handed over, to load.
SlotEpoch = tuple[int, int]

# Items and key+value bytes per db.read_slots page: a couple of thousand small items amortize
# the round trip, yet decoding and checking a page stays a few ms of event-loop time (the
# drone's heartbeats must not wait behind it: measured with 5000-item pages on a loaded 2-core
# machine, a 100k-key reseed delayed heartbeats past the lease and the survivor was declared
# failed too). The bytes stay under the db's own page cap (768 KiB) so a page fits one 1 MiB
# frame with its envelope.
RESEED_PAGE_ITEMS = 2000
RESEED_PAGE_BYTES = 512 * 1024

# Keys installed between two checkpoints: building a slot's index costs about a microsecond a
# key, so other tasks (heartbeats, gets) wait at most a millisecond or so for a reseed.
INSTALL_KEYS_PER_CHECKPOINT = 1000

# Slots one run spans: within the db's MAX_READ_SLOTS_SPAN (2048), and small enough that a
# failover's slots split into several runs that stream concurrently.
MAX_RUN_SLOTS = 1024

# Pages one run may take: 16384 pages of 5000 keys is 80 M keys, far past one drone's share.
MAX_RESEED_PAGES = 16384

# How long one page may take before the run is abandoned and retried (while still granted).
RESEED_PAGE_TIMEOUT_MS = 10_000

# Runs streamed at once: a few keep the db reading the next page while the drone installs
# the last one (db and drone are separate processes), yet bound the memory held aside and the
# db's load during a rebalance.
MAX_CONCURRENT_RESEEDS = 4

# Pause before retrying a failed read: the db may be restarting or the grant being replaced.
RESEED_RETRY_MS = 200

# Fenced slots set aside in a row (each costs a db round trip) before the run pauses for
# RESEED_RETRY_MS: one stale slot is a slot moved on, but a row of them means this drone's
# grant is behind the map (the next heartbeat brings the new one and drops them). Measured
# while the cluster flapped: without the pause a 1024-slot run asked the db once per slot.
MAX_SET_ASIDE_IN_A_ROW = 4


def plan_runs(reseeds: Iterable[Reseed]) -> list[list[SlotEpoch]]:
    """The slots to load as runs of consecutive slots, each at most MAX_RUN_SLOTS long."""
    runs: list[list[SlotEpoch]] = []
    for reseed in sorted(reseeds, key=lambda r: r.slot):
        if runs and runs[-1][-1][0] + 1 == reseed.slot and len(runs[-1]) < MAX_RUN_SLOTS:
            runs[-1].append((reseed.slot, reseed.epoch))
        else:
            runs.append([(reseed.slot, reseed.epoch)])
    return runs


def first_contiguous(slots: list[SlotEpoch]) -> list[SlotEpoch]:
    """The leading part of sorted `slots` whose slot numbers are consecutive."""
    end = 1
    while end < len(slots) and slots[end][0] == slots[end - 1][0] + 1:
        end += 1
    return slots[:end]


class Reseeder:
    """Carries out the slot table's instructions: reseed (bounded concurrency) and drop."""

    def __init__(self, state: DroneState, link: DbLink) -> None:
        self.state = state
        self.link = link
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_RESEEDS)
        # Where an install lets other tasks run (tests count the calls).
        self.checkpoint: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint

    def set_link(self, link: DbLink) -> None:
        self.link = link

    def carry_out(self, instructions: list[Instruction], nursery: trio.Nursery) -> None:
        reseeds: list[Reseed] = []
        for instruction in instructions:
            if isinstance(instruction, Drop):
                self.state.store.drop_slot(instruction.slot)
            elif isinstance(instruction, Reseed):
                reseeds.append(instruction)
        runs = plan_runs(reseeds)
        if runs:
            log.info("reseeding %d slots in %d runs", len(reseeds), len(runs))
        for run in runs:
            nursery.start_soon(self.reseed_run, run)

    async def reseed(self, instruction: Reseed) -> None:
        """Load one slot (a run of one)."""
        await self.reseed_run([(instruction.slot, instruction.epoch)])

    async def reseed_run(self, run: list[SlotEpoch]) -> None:
        """Load `run`'s slots, retrying those still granted under the same epoch until each
        is installed. A slot the db fences is set aside so the rest of the run goes on."""
        metrics = observe.current_metrics()
        started_at = trio.current_time()
        todo = list(run)
        loaded: set[int] = set()
        set_aside: set[int] = set()  # fenced: retried after a pause (a new grant may drop it)
        fenced_in_a_row = 0
        while True:
            todo = [
                (slot, epoch)
                for slot, epoch in todo
                if slot not in loaded and self.state.table.epoch_of(slot) == epoch
            ]
            ready = [entry for entry in todo if entry[0] not in set_aside]
            if not todo:
                log.info(
                    "reseeded %d of slots %d..%d in %.0f ms",
                    len(loaded),
                    run[0][0],
                    run[-1][0],
                    (trio.current_time() - started_at) * 1000,
                )
                return
            if not ready or fenced_in_a_row >= MAX_SET_ASIDE_IN_A_ROW:
                await trio.sleep(RESEED_RETRY_MS / 1000)
                set_aside.clear()
                fenced_in_a_row = 0
                continue
            part = first_contiguous(ready)
            try:
                async with self._limiter:
                    metrics.reseeds_in_progress.inc(len(part))
                    try:
                        await self._load(part, loaded)
                    finally:
                        metrics.reseeds_in_progress.dec(len(part))
                fenced_in_a_row = 0
            except ServiceError as error:
                metrics.reseed_failures.inc()
                log.warning(
                    "reseed of slots %d..%d failed: %s; retrying",
                    part[0][0],
                    part[-1][0],
                    error.message,
                )
                stale = error.detail.get("slot") if isinstance(error, Fenced) else None
                if isinstance(stale, int) and any(slot == stale for slot, _ in part):
                    set_aside.add(stale)
                    fenced_in_a_row += 1
                else:
                    await trio.sleep(RESEED_RETRY_MS / 1000)

    async def _load(self, part: list[SlotEpoch], loaded: set[int]) -> None:
        """Page through the consecutive slots of `part`, installing each slot once a page has
        passed it. Returns early (the caller re-plans) when a slot is no longer wanted."""
        epochs = dict(part)
        last = part[-1][0]
        next_slot = part[0][0]  # the lowest slot not installed yet
        after: tuple[int, bytes] | None = None
        held: dict[int, _Held] = {}  # a slot's items so far, while it spans pages
        for _ in range(MAX_RESEED_PAGES):
            if any(self.state.table.epoch_of(s) != epochs[s] for s in range(next_slot, last + 1)):
                return
            page = await self._read_page(next_slot, last, after)
            start = 0
            for slot, count in page.runs:
                part_of_slot = held.setdefault(slot, _Held())
                part_of_slot.add(page, start, start + count)
                start += count
            passed = last if page.next is None else page.next[0] - 1
            await self._install_all(range(next_slot, passed + 1), epochs, held, loaded)
            next_slot = passed + 1
            if page.next is None:
                return
            after = page.next
        raise Internal(f"slots {part[0][0]}..{last} take more than {MAX_RESEED_PAGES} pages")

    async def _install_all(
        self, slots: range, epochs: dict[int, int], held: dict[int, _Held], loaded: set[int]
    ) -> None:
        """Install `slots` (a page passed them), with a checkpoint every
        INSTALL_KEYS_PER_CHECKPOINT keys; waiting gets wake once per batch, not once per slot."""
        batch_keys = 0
        for slot in slots:
            items = held.pop(slot, _EMPTY)
            if self.install(slot, epochs[slot], items):
                batch_keys += len(items.keys) + 1
            loaded.add(slot)
            if batch_keys >= INSTALL_KEYS_PER_CHECKPOINT:
                self.state.notify_loaded()
                batch_keys = 0
                await self.checkpoint()
        if batch_keys:
            self.state.notify_loaded()

    async def _read_page(
        self, first: int, last: int, after: tuple[int, bytes] | None
    ) -> DbSlotsPage:
        grant = self.state.table.grant
        if grant is None:
            raise Internal("no grant to reseed with")
        request = DbReadSlots(
            grant=grant,
            first=first,
            last=last,
            after_slot=None if after is None else after[0],
            after_key=None if after is None else after[1],
            limit_items=RESEED_PAGE_ITEMS,
            limit_bytes=RESEED_PAGE_BYTES,
        )
        reply = await self.link.request(request, timeout=RESEED_PAGE_TIMEOUT_MS / 1000)
        if not isinstance(reply, DbSlotsPage):
            raise Internal(f"db answered a slot-range read with {type(reply).__name__}")
        check_page(reply, first, last)
        return reply

    def install(self, slot: int, epoch: int, items: _Held) -> bool:
        """Install a loaded slot if it is still wanted (the caller wakes waiting requests)."""
        if self.state.table.epoch_of(slot) != epoch:
            return False
        self.state.store.install_slot_encoded(slot, items.keys, items.values, items.versions)
        self.state.table.mark_loaded(slot, epoch)
        metrics = observe.current_metrics()
        metrics.reseeds.inc()
        metrics.reseed_keys.inc(len(items.keys))
        return True


class _Held:
    """A slot's items gathered from the pages read so far (columns, values still CBOR)."""

    __slots__ = ("keys", "values", "versions")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.versions: list[int] = []

    def add(self, page: DbSlotsPage, start: int, end: int) -> None:
        if not self.keys and start == 0 and end == len(page.keys):
            self.keys, self.values, self.versions = page.keys, page.values, page.versions
            return  # the whole page is this slot's: no copies
        self.keys += page.keys[start:end]
        self.values += page.values[start:end]
        self.versions += page.versions[start:end]


_EMPTY = _Held()  # a slot the page passed without items (never added to)


def check_page(page: DbSlotsPage, first: int, last: int) -> None:
    """Internal (the read is retried) unless `page` is a well-formed answer for first..last:
    runs of rising slots inside the range that add up to the items, every value CBOR that
    codec.decode would accept, and a resume point inside the range."""
    count = len(page.keys)
    if len(page.values) != count or len(page.versions) != count:
        raise Internal("db sent a slot page whose keys, values and versions differ in length")
    previous = first - 1
    total = 0
    for slot, items in page.runs:
        if not previous < slot <= last or items < 1:
            raise Internal(f"db sent slot {slot} ({items} items) for a read of {first}..{last}")
        previous = slot
        total += items
    if total != count:
        raise Internal(f"db sent runs of {total} items with {count} keys")
    if page.next is not None and not first <= page.next[0] <= last:
        raise Internal(f"db resumes at slot {page.next[0]}, outside {first}..{last}")
    try:
        codec.check_each(page.values)
    except DecodeError as error:
        raise Internal(f"db sent an undecodable value: {error.message}") from None
