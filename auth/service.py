"""A daemon's own identity as a service: its ticket keys and the revocation list, kept fresh.

    identity = ServiceIdentity(credentials)
    await identity.start(nursery)            # logs in, fetches keys; refreshes in `nursery`
    await nursery.start(net.serve, listen, identity.server_auth, handler,
                        revoked=identity.revoked)

Revocation bound: the list is refreshed every `refresh_s` (default 2 s). `keyval.net.serve`
checks `revoked(peer)` before every request, so a disabled principal's next request after at
most refresh_s + AUTHORITY_TIMEOUT_S (a slow refresh) is answered UNAUTHORIZED and its
connection closed. If the authority is unreachable the list cannot change, and the bound
falls back to the ticket lifetime (docs/security.md).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from auth.client import AUTHORITY_TIMEOUT_S, Clock, Credentials
from auth.handshake import ServiceKeyring, TicketServerAuth
from auth.keys import KeyFileError
from auth.messages import ServiceState, ServiceStateRequest
from wire.channel import PeerInfo, ServerAuth
from wire.errors import Internal, LocalProtocolError, WireError

if TYPE_CHECKING:  # keyval imports auth: no runtime import of keyval here
    from keyval.net import Connection

logger = logging.getLogger(__name__)

# How often a service asks the authority for its keys and the revocation list. This is the
# revocation delay users see; one small request per service every 2 s costs the authority
# little (a thousand services: 500 requests/s).
REVOCATION_REFRESH_S = 2.0


class ServiceIdentity:
    def __init__(
        self,
        credentials: Credentials,
        *,
        refresh_s: float = REVOCATION_REFRESH_S,
        clock: Clock = time.time,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        self.credentials = credentials
        self.refresh_s = refresh_s
        self._clock = clock
        self._keyring: ServiceKeyring | None = None
        self._connection: Connection | None = None
        self.last_refresh_at: float | None = None
        self.refresh_failures = 0

    @property
    def name(self) -> str:
        return self.credentials.name

    async def start(self, nursery: trio.Nursery) -> None:
        """Log in and fetch the keys (raising if that fails), then refresh in `nursery`."""
        await self.refresh()
        nursery.start_soon(self._refresh_forever)

    async def refresh(self) -> None:
        """Fetch the ticket keys and revocation list once."""
        connection = self._connection
        if connection is None or connection.is_closed:
            connection = self._connection = await self.credentials.authority_connection()
        try:
            state = await connection.request(ServiceStateRequest(), timeout=AUTHORITY_TIMEOUT_S)
        except WireError:
            self._connection = None
            await connection.aclose()
            raise
        if not isinstance(state, ServiceState):
            raise Internal(f"the authority answered with {state.TYPE}, not service state")
        if self._keyring is None:
            role = self.credentials.role or ""
            self._keyring = ServiceKeyring(self.name, role, skew_s=state.skew_s)
        self._keyring.update(state.keys, state.revoked)
        self.last_refresh_at = self._clock()

    async def _refresh_forever(self) -> None:
        try:
            while True:
                await trio.sleep(self.refresh_s)
                try:
                    await self.refresh()
                except (WireError, KeyFileError) as error:
                    self.refresh_failures += 1
                    logger.warning("%s: cannot refresh from the authority: %s", self.name, error)
        finally:
            if self._connection is not None:
                with trio.CancelScope(shield=True):
                    await self._connection.aclose()

    def _require_keyring(self) -> ServiceKeyring:
        if self._keyring is None:
            raise LocalProtocolError("ServiceIdentity.start() has not finished")
        return self._keyring

    def server_auth(self) -> ServerAuth:
        """A fresh ServerAuth for one connection (pass the bound method as net.serve's factory)."""
        return TicketServerAuth(self._require_keyring())

    def revoked(self, peer: PeerInfo) -> bool:
        """True if `peer`'s principal is disabled (net.serve then cuts the connection)."""
        return self._require_keyring().is_revoked(peer.name)
