"""The commander's link to the db: one authenticated connection, reopened when lost, and the
three start-up steps (register a term, load the map, fetch the grant key)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

from auth.client import Credentials
from keyval import net
from keyval.commander.slotmap import MapRange
from keyval.messages import (
    DbGrantKey,
    DbGrantKeyReply,
    DbLoadMap,
    DbMap,
    DbRegisterTerm,
    DbSaveMap,
    DbTerm,
)
from wire.errors import Fenced, Internal, Timeout, Unavailable
from wire.messages import Message

logger = logging.getLogger("keyval.commander")

M = TypeVar("M", bound=Message)

# One db request (a map save is one small transaction); past this the db is treated as down
# for that attempt and the caller retries. Well under the lease so a slow db shows quickly.
DB_REQUEST_TIMEOUT_S = 5.0

# Terms tried at start-up. Each refusal tells us the newest term, so a second try normally
# wins; more are for several commanders starting at once.
MAX_TERM_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class Resumed:
    term: int
    map_version: int
    ranges: list[MapRange]
    grant_key: bytes


class DbLink:
    def __init__(self, credentials: Credentials, address: str, service_name: str) -> None:
        self.credentials = credentials
        self.address = address
        self.service_name = service_name
        self._connection: net.Connection | None = None

    async def request(self, msg: Message) -> Message:
        """Send one request; on a lost link drop the connection (the next call reconnects)."""
        connection = self._connection
        if connection is None or connection.is_closed:
            auth = await self.credentials.client_auth(self.service_name)
            connection = await net.open_connection(self.address, auth, timeout=DB_REQUEST_TIMEOUT_S)
            self._connection = connection
        try:
            return await connection.request(msg, timeout=DB_REQUEST_TIMEOUT_S)
        except (Unavailable, Timeout):
            self._connection = None
            await connection.aclose()
            raise

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None

    async def start(self, commander: str) -> Resumed:
        """Register a term above every earlier one, then load the map and the grant key."""
        loaded = _expect(await self.request(DbLoadMap()), DbMap)
        term = loaded.term + 1
        for _ in range(MAX_TERM_ATTEMPTS):
            newest = await self._try_term(commander, term)
            if newest is None:
                break
            term = newest + 1
        else:
            raise Fenced(f"could not register a commander term in {MAX_TERM_ATTEMPTS} tries")
        loaded = _expect(await self.request(DbLoadMap()), DbMap)
        key = _expect(await self.request(DbGrantKey()), DbGrantKeyReply).key
        logger.info(
            "%s: registered term %d; map version %d with %d ranges",
            commander,
            term,
            loaded.version,
            len(loaded.ranges),
        )
        return Resumed(term, loaded.version, list(loaded.ranges), key)

    async def _try_term(self, commander: str, term: int) -> int | None:
        """None if `term` is now ours; else the newest registered term that beat it (the db
        answers either Fenced with the newest term, or the stored record)."""
        try:
            stored = _expect(await self.request(DbRegisterTerm(commander, term)), DbTerm)
        except Fenced as error:
            newest = error.detail.get("term")
            if type(newest) is not int:
                raise
            return max(newest, term)
        if stored.term == term and stored.commander == commander:
            return None
        return max(stored.term, term)

    async def save_map(self, term: int, version: int, ranges: list[MapRange]) -> None:
        await self.request(DbSaveMap(term=term, version=version, ranges=ranges))


def _expect(reply: Message, kind: type[M]) -> M:
    if not isinstance(reply, kind):
        raise Internal(f"the db answered with {reply.TYPE}, expected {kind.TYPE}")
    return reply
