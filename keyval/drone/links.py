"""The drone's outgoing connections: one to the db, one to the commander it heartbeats.

A `Dialer` opens an authenticated connection to an address for a service (principal) name:
with tickets from the authority in the daemon, with a pre-shared key in tests. `ServiceLink`
keeps one connection and redials after it breaks; any failure to reach the peer is
UNAVAILABLE to the caller, who retries on its own schedule.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from wire.errors import ErrorCode, ServiceError, Unavailable, WireError
from wire.messages import Message

log = logging.getLogger("keyval.drone")

# Connect plus handshake; a peer slower than this is treated as down for now.
CONNECT_TIMEOUT_MS = 5000


class Link(Protocol):
    async def request(self, msg: Message, *, timeout: float) -> Message: ...

    async def aclose(self) -> None: ...


class Dialer(Protocol):
    async def __call__(self, address: str, service: str, *, timeout: float) -> Link: ...


class ServiceLink:
    """Requests to one service at one address, over a connection redialled when it breaks."""

    def __init__(self, dial: Dialer, address: str, service: str) -> None:
        self.dial = dial
        self.address = address
        self.service = service
        self._connection: Link | None = None
        self._lock = trio.Lock()

    async def _connect(self) -> Link:
        async with self._lock:
            if self._connection is None:
                try:
                    self._connection = await self.dial(
                        self.address, self.service, timeout=CONNECT_TIMEOUT_MS / 1000
                    )
                except (WireError, OSError) as error:
                    raise Unavailable(
                        f"cannot reach {self.service} at {self.address}: {error}"
                    ) from None
            return self._connection

    async def request(self, msg: Message, *, timeout: float) -> Message:
        connection = await self._connect()
        try:
            return await connection.request(msg, timeout=timeout)
        except ServiceError as error:
            if error.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                await self._drop(connection)
            raise
        except (WireError, OSError) as error:
            await self._drop(connection)
            raise Unavailable(f"connection to {self.service} failed: {error}") from None

    async def _drop(self, connection: Link) -> None:
        if self._connection is connection:
            self._connection = None
        with trio.CancelScope(shield=True):
            await connection.aclose()

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._drop(self._connection)
