"""Role and key-permission checks for daemons' request handlers.

    require_role(peer, "drone")                # before handling a heartbeat
    check_key_permission(peer, key)             # before touching a client's key

Both raise `wire.errors.Unauthorized` with a message that says what was needed and what the
peer has, so the person reading the client's error knows what to change.
"""

from __future__ import annotations

from wire.channel import PeerInfo
from wire.errors import Unauthorized


def require_role(peer: PeerInfo, *roles: str, action: str = "this request") -> None:
    """Raise Unauthorized unless `peer` has one of `roles`."""
    if not roles:
        raise ValueError("require_role needs at least one role")
    if peer.role not in roles:
        needed = " or ".join(roles)
        raise Unauthorized(
            f"{action} needs role {needed}; principal {peer.name!r} has role {peer.role!r}. "
            "Connect with the credentials of a principal that has the role.",
            detail={"needed": list(roles), "role": peer.role, "principal": peer.name},
        )


def check_key_permission(peer: PeerInfo, key: str | bytes | int) -> None:
    """Raise Unauthorized if `peer` has key-prefix permissions and `key` matches none of them.

    A principal without prefixes (every non-client role, and unrestricted clients) may touch
    every key. str keys are compared as text; bytes keys against the UTF-8 of each prefix.
    """
    if not peer.permissions:
        return
    if isinstance(key, str):
        allowed = any(key.startswith(prefix) for prefix in peer.permissions)
    elif isinstance(key, bytes):
        allowed = any(key.startswith(prefix.encode("utf-8")) for prefix in peer.permissions)
    else:
        allowed = False  # int keys have no prefixes to match
    if not allowed:
        raise Unauthorized(
            f"principal {peer.name!r} may only use keys starting with "
            f"{', '.join(repr(p) for p in peer.permissions)}; key {key!r} is outside them. "
            "Ask an admin to widen its prefixes.",
            detail={"principal": peer.name, "prefixes": list(peer.permissions)},
        )
