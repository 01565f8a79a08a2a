"""An in-memory network for the auth tests: keyval.net over trio memory streams."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from keyval import net
from wire.channel import ClientAuth, ServerAuth
from wire.errors import Unavailable


class MemoryNet:
    def __init__(self, nursery: trio.Nursery, clock: Callable[[], float]) -> None:
        self._nursery = nursery
        self._clock = clock
        self._servers: dict[str, tuple[Callable[[], ServerAuth], net.Handler, net.Revoked]] = {}

    def serve(
        self,
        address: str,
        auth_factory: Callable[[], ServerAuth],
        handler: net.Handler,
        revoked: net.Revoked,
    ) -> None:
        self._servers[address] = (auth_factory, handler, revoked)

    async def connect(self, address: str, auth: ClientAuth) -> net.Connection:
        if address not in self._servers:
            raise Unavailable(f"nothing listens on {address}")
        auth_factory, handler, revoked = self._servers[address]
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self._nursery.start_soon(
            lambda: net.serve_stream(
                server_stream, auth_factory(), handler, revoked=revoked, clock=self._clock
            )
        )
        return await net.Connection.from_stream(client_stream, auth)
