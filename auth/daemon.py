"""The authority daemon: a thin trio shell around auth.authority.Authority.

Holds the data directory's lock while it runs (so offline edits refuse to run beside it),
serves logins, tickets, service state and administration over keyval.net, and cuts a
connection whose principal is disabled at its next request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from auth.authority import ANONYMOUS_ROLE, Authority, AuthorityConfig
from auth.datadir import ensure_authority_dir, locked
from auth.handshake import AuthorityServerAuth
from auth.principals import Registry
from wire.channel import PeerInfo, ServerAuth
from wire.messages import Message

logger = logging.getLogger(__name__)

# The authority is not a principal; its log lines and metrics carry this node name.
AUTHORITY_NODE_NAME = "authority"


async def run_authority(
    data_dir: Path,
    listen: str,
    *,
    config: AuthorityConfig | None = None,
    clock: Callable[[], float] = time.time,
    metrics_address: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the authority from `data_dir` on `listen` until cancelled (with Prometheus
    metrics on `metrics_address` if given).

    `task_status.started(bound_address)` once it accepts connections."""
    from keyval import net, observe  # here, not at the top: keyval imports auth

    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(data_dir, purpose="start a second authority daemon"):
        authority = Authority(ensure_authority_dir(data_dir), Registry(data_dir), config)

        def auth_factory() -> ServerAuth:
            return AuthorityServerAuth(authority)

        async def handler(peer: PeerInfo, msg: Message) -> Message:
            # Registry writes are small synchronous file writes (one fsync); admin operations
            # are rare, so they run inline rather than in a thread.
            return authority.handle(peer, msg, clock())

        def revoked(peer: PeerInfo) -> bool:
            if peer.role == ANONYMOUS_ROLE:
                return False
            principal = authority.registry.get(peer.name)
            return principal is None or not principal.enabled

        async with trio.open_nursery() as nursery:
            await observe.start_node(nursery, AUTHORITY_NODE_NAME, "auth", metrics_address)
            logger.info(
                "authority %s (public key %s)", authority.id, authority.keys.info.public_key_hex
            )
            await net.serve(
                listen, auth_factory, handler, revoked=revoked, clock=clock, task_status=task_status
            )
