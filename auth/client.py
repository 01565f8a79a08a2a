"""A principal's credentials: log in, cache the TGT and service tickets, renew before expiry.

    creds = Credentials("alice", Path("alice.key"), "127.0.0.1:6230", authority_key_hex)
    conn = await keyval.net.open_connection(drone_address, await creds.client_auth("drone-1"))

Safe to call from many tasks: one lock serialises talking to the authority, and every caller
after the first finds the ticket cached.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from auth import keys
from auth.datadir import authority_id_for
from auth.handshake import AuthorityClientAuth, TicketClientAuth
from auth.login import finish_login, start_login
from auth.messages import LoginReply, TicketReply, TicketRequest
from auth.tickets import AUTHORITY_SERVICE
from wire.channel import ClientAuth
from wire.errors import Internal

# Renew a TGT or ticket once this fraction of its life has passed, so one in use never expires
# mid-request and a slow authority has the remaining fifth of the lifetime to answer.
RENEW_AT_FRACTION = 0.8
# Talking to the authority: a login is one round trip after the handshake.
AUTHORITY_TIMEOUT_S = 10.0

if TYPE_CHECKING:  # keyval imports auth.client: import keyval.net only when used
    from keyval.net import Connection

Connect = Callable[[str, ClientAuth], Awaitable["Connection"]]
Clock = Callable[[], float]


async def _tcp_connect(address: str, auth: ClientAuth) -> Connection:
    from keyval.net import open_connection  # here, not at the top: keyval imports auth.client

    return await open_connection(address, auth, timeout=AUTHORITY_TIMEOUT_S)


@dataclasses.dataclass(frozen=True, slots=True)
class _Held:
    """A ticket (or TGT) with its session key and when to renew it."""

    ticket: bytes
    session_key: bytes
    expires_at: float
    renew_at: float
    service_role: str


class Credentials:
    def __init__(
        self,
        name: str,
        key_path: Path,
        authority_address: str,
        authority_public_key: str,
        *,
        clock: Clock = time.time,
        connect: Connect = _tcp_connect,
    ) -> None:
        self.name = name
        self.key_path = Path(key_path)
        self.authority_address = authority_address
        self._authority_key = keys.public_key_from_hex(authority_public_key)
        self.authority_id = authority_id_for(keys.public_key_bytes(self._authority_key))
        self._clock = clock
        self._connect = connect
        self._lock = trio.Lock()
        self._tgt: _Held | None = None
        self._tickets: dict[str, _Held] = {}
        self.role: str | None = None  # known after the first login

    async def client_auth(self, service_name: str) -> ClientAuth:
        """Authentication for a connection to `service_name` ("auth" for the authority)."""
        async with self._lock:
            tgt = await self._fresh_tgt()
            if service_name == AUTHORITY_SERVICE:
                return AuthorityClientAuth(
                    self._authority_key, tgt=tgt.ticket, session_key=tgt.session_key
                )
            held = self._tickets.get(service_name)
            if held is None or self._clock() >= held.renew_at:
                held = await self._request_ticket(tgt, service_name)
                self._tickets[service_name] = held
            return TicketClientAuth(service_name, held.service_role, held.ticket, held.session_key)

    def forget(self, service_name: str) -> None:
        """Drop a cached ticket (e.g. after a service refused it); the next call gets a new one."""
        if service_name == AUTHORITY_SERVICE:
            self._tgt = None
        self._tickets.pop(service_name, None)

    async def authority_connection(self) -> Connection:
        """A connection to the authority authenticated with this principal's TGT."""
        return await self._connect(
            self.authority_address, await self.client_auth(AUTHORITY_SERVICE)
        )

    async def _fresh_tgt(self) -> _Held:
        if self._tgt is None or self._clock() >= self._tgt.renew_at:
            self._tgt = await self._login()
            self._tickets.clear()  # tickets are bounded by the TGT; start over with the new one
        return self._tgt

    async def _login(self) -> _Held:
        private_key = keys.load_private_key(self.key_path)
        now = self._clock()
        pending = start_login(self.name, self.authority_id, private_key, now)
        connection = await self._connect(
            self.authority_address, AuthorityClientAuth(self._authority_key)
        )
        async with connection:
            reply = await connection.request(pending.request, timeout=AUTHORITY_TIMEOUT_S)
        if not isinstance(reply, LoginReply):
            raise Internal(f"the authority answered a login with {reply.TYPE}")
        session_key = finish_login(pending, reply)
        self.role = reply.role
        return _held(reply.tgt, session_key, now, reply.expires_at, reply.role)

    async def _request_ticket(self, tgt: _Held, service_name: str) -> _Held:
        auth = AuthorityClientAuth(self._authority_key, tgt=tgt.ticket, session_key=tgt.session_key)
        now = self._clock()
        connection = await self._connect(self.authority_address, auth)
        async with connection:
            reply = await connection.request(
                TicketRequest(service=service_name), timeout=AUTHORITY_TIMEOUT_S
            )
        if not isinstance(reply, TicketReply):
            raise Internal(f"the authority answered a ticket request with {reply.TYPE}")
        return _held(reply.ticket, reply.session_key, now, reply.expires_at, reply.service_role)


def _held(ticket: bytes, session_key: bytes, now: float, expires_at: float, role: str) -> _Held:
    renew_at = now + (expires_at - now) * RENEW_AT_FRACTION
    return _Held(ticket, session_key, expires_at, renew_at, role)
