"""Typed errors with stable wire codes.

`LocalProtocolError`: our caller misused the API. `RemoteProtocolError`: the peer sent
something the protocol does not allow; the connection is closed. `ServiceError` subclasses,
one per code, are what a request handler raises and what the requester gets back.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorCode(enum.StrEnum):
    """Stable error codes. Never renumber or rename: other-language clients match on them."""

    MOVED = "MOVED"  # the slot lives elsewhere for good; detail: slot, epoch, owner, address
    ASK = "ASK"  # the slot is moving; retry this one request at detail's address
    CONFLICT = "CONFLICT"  # an optimistic transaction or compare-and-set lost
    UNAUTHORIZED = "UNAUTHORIZED"  # who you are is not proven, or not allowed to do this
    FORBIDDEN = "FORBIDDEN"  # proven, but this key or operation is outside your permissions
    BAD_REQUEST = "BAD_REQUEST"  # malformed or invalid request
    TOO_LARGE = "TOO_LARGE"  # a key, value, frame or batch over its limit
    UNAVAILABLE = "UNAVAILABLE"  # cannot serve now (loading, no owner, lost connection); retry
    TIMEOUT = "TIMEOUT"  # a deadline passed; the outcome may be unknown
    INTERNAL = "INTERNAL"  # a bug or an unexpected failure on the server
    NOT_FOUND = "NOT_FOUND"  # a named thing (principal, drone, transaction) does not exist
    FENCED = "FENCED"  # a grant or term older than the newest known: the sender is stale
    NOT_LEADER = "NOT_LEADER"  # this commander does not lead; detail names the leader if known
    PROTOCOL = "PROTOCOL"  # the peer broke the protocol; the connection is closed


class WireError(Exception):
    """Base of every keyval error. `code` is the stable wire code, `detail` a small CBOR map."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, detail={self.detail!r})"


class LocalProtocolError(WireError):
    """Our own caller used the API wrongly (sending after close, a bad message field, ...)."""

    code = ErrorCode.BAD_REQUEST


class RemoteProtocolError(WireError):
    """The peer broke the protocol. The connection cannot continue."""

    code = ErrorCode.PROTOCOL


class FrameTooLarge(RemoteProtocolError):
    code = ErrorCode.TOO_LARGE


class DecodeError(RemoteProtocolError):
    """Bytes that are not a well-formed, admitted CBOR message."""

    code = ErrorCode.BAD_REQUEST


class IntegrityError(RemoteProtocolError):
    """A sealed frame failed authentication: tampered, replayed, reordered or truncated."""

    code = ErrorCode.PROTOCOL


class AuthenticationError(WireError):
    """The peer could not prove who it is (or we could not)."""

    code = ErrorCode.UNAUTHORIZED


class ServiceError(WireError):
    """An error a service answers a request with. Subclasses fix the code."""


class Moved(ServiceError):
    code = ErrorCode.MOVED


class Ask(ServiceError):
    code = ErrorCode.ASK


class Conflict(ServiceError):
    code = ErrorCode.CONFLICT


class Unauthorized(ServiceError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ServiceError):
    code = ErrorCode.FORBIDDEN


class BadRequest(ServiceError):
    code = ErrorCode.BAD_REQUEST


class TooLarge(ServiceError):
    code = ErrorCode.TOO_LARGE


class Unavailable(ServiceError):
    code = ErrorCode.UNAVAILABLE


class Timeout(ServiceError):
    code = ErrorCode.TIMEOUT


class Internal(ServiceError):
    code = ErrorCode.INTERNAL


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND


class Fenced(ServiceError):
    code = ErrorCode.FENCED


class NotLeader(ServiceError):
    code = ErrorCode.NOT_LEADER


class ProtocolViolation(ServiceError):
    code = ErrorCode.PROTOCOL


_BY_CODE: dict[ErrorCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        Moved,
        Ask,
        Conflict,
        Unauthorized,
        Forbidden,
        BadRequest,
        TooLarge,
        Unavailable,
        Timeout,
        Internal,
        NotFound,
        Fenced,
        NotLeader,
        ProtocolViolation,
    )
}


def service_error(code: str, message: str, detail: dict[str, Any] | None = None) -> ServiceError:
    """The typed exception for an `Error` message received from a peer.

    An unknown code (a newer peer) becomes `Internal` with the original code in `detail`.
    """
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return Internal(message, detail={**(detail or {}), "unknown_code": code})
    return cls(message, detail=detail)
