"""The admin tool's connections: the commanders, the ticket authority, and a data client.

One `AdminRemote` lives as long as a REPL (or one one-shot command) and reuses its links.
It knows nothing of commands; keyval.admin.actions asks it for messages.
"""

from __future__ import annotations

import contextlib
import random
from typing import TypeVar

import trio

from auth.client import Credentials
from keyval.admin.errors import AdminError
from keyval.client.aio import AsyncClient, client_from_settings
from keyval.client.config import ClientSettings, Endpoint
from keyval.client.links import Dialer, LinkPool
from keyval.client.policy import RetryPolicy
from keyval.messages import ClusterStatus, SlotMap, StatusRequest
from keyval.messages import GetMap as GetMapRequest
from wire.errors import BadRequest, Internal, NotLeader, ServiceError, Unavailable
from wire.messages import Message

T = TypeVar("T")

# One admin request (a map read, a move) including the connection set-up and login: an
# operator waits for it, so it fails with a clear error rather than hanging.
REQUEST_TIMEOUT_S = 10.0


class AdminRemote:
    def __init__(
        self,
        settings: ClientSettings,
        dialer: Dialer,
        *,
        credentials: Credentials | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.timeout_s = timeout_s
        self._dialer = dialer
        self._pool = LinkPool(dialer)
        self._leader: str | None = None  # name of the commander that answered last
        self._reachable: dict[str, bool] = {}
        self._client: AsyncClient | None = None
        self._client_stack = contextlib.AsyncExitStack()

    @property
    def reachable(self) -> dict[str, bool]:
        """Commander name -> whether the last attempt to reach it worked (absent: not tried)."""
        return dict(self._reachable)

    # ------------------------------------------------------------ the commanders

    def _ordered(self) -> list[Endpoint]:
        endpoints = list(self.settings.commanders)
        endpoints.sort(key=lambda endpoint: endpoint.name != self._leader)
        return endpoints

    async def commander_request(self, msg: Message) -> Message:
        """Send `msg` to the leading commander: the last one that answered first, then the
        others in config order. Errors other than "unreachable" or "not the leader" come back
        as the commander raised them (Unauthorized, NotFound, BadRequest, ...)."""
        failures: list[str] = []
        for endpoint in self._ordered():
            try:
                reply = await self._request_at(endpoint, msg)
            except (Unavailable, trio.TooSlowError) as error:
                self._reachable[endpoint.name] = False
                failures.append(f"{endpoint.name} at {endpoint.address}: {_text(error)}")
                continue
            except NotLeader as error:
                self._reachable[endpoint.name] = True
                failures.append(f"{endpoint.name} does not lead: {error.message}")
                continue
            self._reachable[endpoint.name] = True
            self._leader = endpoint.name
            return reply
        raise Unavailable("no commander answered: " + "; ".join(failures))

    async def _request_at(self, endpoint: Endpoint, msg: Message) -> Message:
        with trio.fail_after(self.timeout_s):
            link = await self._pool.get(endpoint.address, endpoint.name, timeout=self.timeout_s)
            try:
                return await link.request(msg, timeout=self.timeout_s)
            except Unavailable:
                await self._pool.drop(endpoint.address, link)
                raise

    async def get_map(self) -> SlotMap:
        return _expect(await self.commander_request(GetMapRequest()), SlotMap)

    async def status(self) -> ClusterStatus | None:
        """The commander's cmd.status, or None if this commander does not answer it yet."""
        try:
            reply = await self.commander_request(StatusRequest())
        except BadRequest as error:
            # A commander without a cmd.status handler refuses it as BAD_REQUEST naming the
            # type; any other BAD_REQUEST is a real error.
            if StatusRequest.TYPE in error.message:
                return None
            raise
        return _expect(reply, ClusterStatus)

    async def views(self) -> dict[str, str]:
        """Each reachable commander's own election view, asked directly (cmd.status local)."""
        views: dict[str, str] = {}
        for endpoint in self.settings.commanders:
            try:
                reply = await self._request_at(endpoint, StatusRequest(local=True))
            except (ServiceError, trio.TooSlowError):
                continue
            if isinstance(reply, ClusterStatus) and reply.commander:
                views[endpoint.name] = (
                    f"{reply.role} term {reply.term}, leader {reply.leader or '?'}, "
                    f"{reply.votes}/{reply.electorate} votes"
                )
        return views

    # ------------------------------------------------------------ the authority

    async def authority_request(self, msg: Message) -> Message:
        if self.credentials is None:
            raise AdminError("this config names no ticket authority identity")
        with trio.fail_after(self.timeout_s):
            connection = await self.credentials.authority_connection()
            async with connection:
                return await connection.request(msg, timeout=self.timeout_s)

    # ------------------------------------------------------------ data

    async def data_client(self) -> AsyncClient:
        """A keyval client on the same identity and links' dialer, made on first use."""
        if self._client is None:
            policy = RetryPolicy(deadline_s=self.timeout_s)
            client = client_from_settings(
                self.settings, self._dialer, policy=policy, rng=random.Random()
            )
            self._client_stack.push_async_callback(client.aclose)
            await client.router.refresh(client.router.start(), seen=0)
            self._client = client
        return self._client

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._client_stack.aclose()
            await self._pool.aclose()


def _text(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return getattr(error, "message", None) or str(error) or type(error).__name__


def _expect(reply: Message, kind: type[T]) -> T:
    if not isinstance(reply, kind):
        raise Internal(f"unexpected reply {reply.TYPE}")
    return reply
