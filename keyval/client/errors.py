"""Errors the client library raises beyond the server's typed errors (wire.errors).

Every error is a `wire.errors.WireError`, so a caller can catch that one base. Server answers
arrive as the `ServiceError` subclass of their code (`Conflict`, `Moved`, `Unavailable`, ...).
"""

from __future__ import annotations

from wire.errors import Conflict, LocalProtocolError, Timeout, Unavailable


class TransactionFinished(LocalProtocolError):
    """A transaction was used after it committed, failed or was abandoned."""


class TooManyConflicts(Conflict):
    """`transact` re-ran the function `detail["attempts"]` times and lost every commit."""


class DeadlineExceeded(Timeout):
    """A call's overall deadline passed while retrying; the outcome of a write may be unknown."""


class NoOwner(Unavailable):
    """The slot map names no drone for the slot (the cluster is still assigning it)."""


class ClientClosed(LocalProtocolError):
    """The client was used after `close()` / leaving its `with` block."""
