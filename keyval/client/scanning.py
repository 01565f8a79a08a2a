"""Scans: one slot's owner when a `{tag}` prefix pins the slot, else every drone, merged.

A scan over every drone sends `kv.scan` with slot=None to each drone in the map, pages each
with its `after` cursor and merges the streams in canonical key order. It is not a snapshot:
keys written or moved while it runs may or may not appear (as in Redis Cluster's SCAN); a key
seen from two drones during a move is reported once, with the higher version.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import trio

from keyval.client.errors import NoOwner
from keyval.client.router import Router
from keyval.client.routing import Route, prefix_slot
from keyval.keys import NUM_SLOTS, canonical_key
from keyval.messages import Scan, ScanPage
from wire.errors import BadRequest, Unavailable
from wire.messages import Key

# Items asked of a drone per page: the drone's own default, well inside a 1 MiB frame for
# small values (a drone may return fewer when values are large).
SCAN_PAGE_ITEMS = 1000

Item = tuple[Key, Any, int]  # (key, value, version)


def check_scan_arguments(
    prefix: Key | None, start: Key | None, end: Key | None, limit: int | None
) -> None:
    for name, bound in (("prefix", prefix), ("start", start), ("end", end)):
        if bound is not None:
            canonical_key(bound)  # raises BadRequest on a wrong type
            if name == "prefix" and isinstance(bound, int):
                raise BadRequest("a scan prefix is str or bytes, not int")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise BadRequest(f"scan limit must be a positive int, not {limit!r}")


@dataclasses.dataclass(slots=True)
class _Stream:
    """One drone's part of a scan over every drone."""

    route: Route
    buffer: collections.deque[tuple[bytes, Item]] = dataclasses.field(
        default_factory=collections.deque
    )
    after: bytes | None = None
    done: bool = False


class ScanCursor:
    """Yields pages of (key, value, version) in key order; `next_page()` is None at the end."""

    def __init__(
        self,
        router: Router,
        *,
        prefix: Key | None = None,
        start: Key | None = None,
        end: Key | None = None,
        limit: int | None = None,
    ) -> None:
        check_scan_arguments(prefix, start, end, limit)
        self._router = router
        self._prefix, self._start, self._end = prefix, start, end
        self._remaining = limit
        self._slot = prefix_slot(prefix) if prefix is not None else None
        self._after: bytes | None = None
        self._single_done = False
        self._streams: list[_Stream] | None = None

    def _page_items(self) -> int:
        if self._remaining is None:
            return SCAN_PAGE_ITEMS
        return min(SCAN_PAGE_ITEMS, self._remaining)

    def _request(self, slot: int | None, after: bytes | None) -> Scan:
        return Scan(
            slot=slot,
            prefix=self._prefix,
            start=self._start,
            end=self._end,
            after=after,
            limit=self._page_items(),
        )

    async def next_page(self) -> list[Item] | None:
        if self._remaining == 0:
            return None
        page = await (self._next_single() if self._slot is not None else self._next_merged())
        if page is None:
            return None
        if self._remaining is not None:
            page = page[: self._remaining]
            self._remaining -= len(page)
        return page

    async def _next_single(self) -> list[Item] | None:
        assert self._slot is not None
        while not self._single_done:
            reply = await self._router.call(self._slot, self._request(self._slot, self._after))
            page = _as_page(reply)
            self._after = page.after
            self._single_done = page.after is None
            if page.items:
                return list(page.items)
        return None

    async def _next_merged(self) -> list[Item] | None:
        if self._streams is None:
            self._streams = [_Stream(route) for route in await self._all_drones()]
        await self._fill(self._streams)
        page: list[Item] = []
        limit = self._page_items()
        while len(page) < limit:
            live = [s for s in self._streams if s.buffer]
            if not live or any(not s.buffer and not s.done for s in self._streams):
                break  # a stream must be refilled before we know what comes next
            low = min(s.buffer[0][0] for s in live)
            heads = [s.buffer.popleft()[1] for s in live if s.buffer[0][0] == low]
            page.append(max(heads, key=lambda item: item[2]))
        if not page and all(s.done and not s.buffer for s in self._streams):
            return None
        return page

    async def _all_drones(self) -> list[Route]:
        attempts = self._router.start()
        table = await self._router.current_table(attempts)
        if any(table.route(slot) is None for slot in range(NUM_SLOTS)):
            await self._router.refresh(attempts, seen=self._router.refreshes)
            table = await self._router.current_table(attempts)
        unowned = sum(1 for slot in range(NUM_SLOTS) if table.route(slot) is None)
        if unowned:
            raise NoOwner(
                f"{unowned} slots have no owner yet; a scan over all keys would miss them",
                detail={"unowned_slots": unowned},
            )
        routes = {table.route(slot) for slot in range(NUM_SLOTS)}
        by_drone = {route.drone: route for route in routes if route is not None}
        return [by_drone[name] for name in sorted(by_drone)]

    async def _fill(self, streams: list[_Stream]) -> None:
        empty = [s for s in streams if not s.buffer and not s.done]
        if not empty:
            return
        async with trio.open_nursery() as nursery:
            for stream in empty:
                nursery.start_soon(self._fetch, stream)

    async def _fetch(self, stream: _Stream) -> None:
        while not stream.buffer and not stream.done:
            request = self._request(None, stream.after)
            reply = await self._router.call_at(stream.route, request, self._router.start())
            page = _as_page(reply)
            stream.buffer.extend((canonical_key(item[0]), item) for item in page.items)
            stream.after = page.after
            stream.done = page.after is None


def _as_page(reply: object) -> ScanPage:
    if not isinstance(reply, ScanPage):
        raise Unavailable(f"a drone answered a scan with {type(reply).__name__}")
    return reply
