"""Connections from the client to daemons: what a connection must offer, and how to dial one.

`Link` is the part of `keyval.net.Connection` the client uses; `Dialer` opens one to an
address for a service (principal) name. `TicketDialer` logs in with the ticket authority;
`PskDialer` uses a pre-shared key (tests and bootstrap only). `LinkPool` keeps one link per
address and shares it: keyval.net pipelines concurrent requests on one connection.
"""

from __future__ import annotations

from typing import Protocol

import trio

from auth.client import Credentials
from keyval import net
from keyval.nodeconfig import NodeOptions
from wire.channel import PskClientAuth
from wire.errors import Unavailable
from wire.messages import Message


class Link(Protocol):
    @property
    def is_closed(self) -> bool: ...

    async def request(self, msg: Message, *, timeout: float) -> Message: ...

    async def aclose(self) -> None: ...


class Dialer(Protocol):
    async def __call__(self, address: str, service: str, *, timeout: float) -> Link: ...


class TicketDialer:
    """Dial with tickets from the authority (auth.client.Credentials)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    @classmethod
    def from_identity(cls, identity: NodeOptions) -> TicketDialer:
        return cls(
            Credentials(identity.name, identity.key, identity.authority, identity.authority_key)
        )

    async def __call__(self, address: str, service: str, *, timeout: float) -> Link:
        with trio.fail_after(timeout):
            client_auth = await self._credentials.client_auth(service)
        return await net.open_connection(address, client_auth, timeout=timeout)


class PskDialer:
    """Dial with a pre-shared key: for tests and bootstrap, never for a deployed cluster."""

    def __init__(self, name: str, role: str, psk: bytes) -> None:
        self._name, self._role, self._psk = name, role, psk

    async def __call__(self, address: str, service: str, *, timeout: float) -> Link:
        auth = PskClientAuth(self._name, self._role, self._psk)
        return await net.open_connection(address, auth, timeout=timeout)


# Errors that mean "this connection attempt or connection failed", to be retried elsewhere or
# later. Everything else (authentication refused, a bug) is raised to the caller.
CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class LinkPool:
    """One shared link per address, dialled on first use, dropped when it fails."""

    def __init__(self, dialer: Dialer) -> None:
        self._dialer = dialer
        self._links: dict[str, Link] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._closed = False

    def open_link(self, address: str) -> Link | None:
        """The open link to `address`, if there is one (no dial, no wait): the hot path."""
        link = self._links.get(address)
        if link is None or self._closed or link.is_closed:
            return None
        return link

    async def get(self, address: str, service: str, *, timeout: float) -> Link:
        if self._closed:
            raise Unavailable("the client is closed")
        link = self._links.get(address)
        if link is not None and not link.is_closed:
            return link
        lock = self._locks.setdefault(address, trio.Lock())
        async with lock:  # one dial per address at a time; the others wait and share it
            link = self._links.get(address)
            if link is not None and link.is_closed:
                await self.drop(address, link)
                link = None
            if link is None:
                try:
                    link = await self._dialer(address, service, timeout=timeout)
                except CONNECTION_ERRORS as error:
                    raise Unavailable(
                        f"cannot connect to {service} at {address}: {error}",
                        detail={"address": address},
                    ) from error
                except trio.TooSlowError:
                    raise Unavailable(
                        f"connecting to {service} at {address} timed out",
                        detail={"address": address},
                    ) from None
                self._links[address] = link
            return link

    async def drop(self, address: str, link: Link) -> None:
        """Forget `link` (if it is still the one for `address`) and close it."""
        if self._links.get(address) is link:
            del self._links[address]
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await link.aclose()
            except CONNECTION_ERRORS:
                pass  # it was already broken; that is why we drop it

    async def aclose(self) -> None:
        self._closed = True
        links, self._links = list(self._links.items()), {}
        for address, link in links:
            self._links[address] = link
            await self.drop(address, link)

    def statistics(self) -> dict[str, int]:
        return {"links": len(self._links)}
