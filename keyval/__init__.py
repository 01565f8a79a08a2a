"""keyval: a hash-slot sharded, in-memory, transactional key-value cluster."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The client pulls in the transport and auth, which import keyval submodules themselves; the
# names below are loaded on first use (PEP 562) so `import keyval.keys` stays light and no
# import cycle forms.
_EXPORTS = {
    "AsyncClient": "keyval.client",
    "Client": "keyval.client",
    "ClientClosed": "keyval.client",
    "DeadlineExceeded": "keyval.client",
    "Entry": "keyval.client",
    "NoOwner": "keyval.client",
    "TooManyConflicts": "keyval.client",
    "TransactionFinished": "keyval.client",
    "aconnect": "keyval.client",
    "connect": "keyval.client",
    "transactional": "keyval.client",
    "Ask": "wire.errors",
    "BadRequest": "wire.errors",
    "Conflict": "wire.errors",
    "Forbidden": "wire.errors",
    "Moved": "wire.errors",
    "NotFound": "wire.errors",
    "ServiceError": "wire.errors",
    "Timeout": "wire.errors",
    "TooLarge": "wire.errors",
    "Unauthorized": "wire.errors",
    "Unavailable": "wire.errors",
    "WireError": "wire.errors",
}

__all__ = [
    "Ask",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientClosed",
    "Conflict",
    "DeadlineExceeded",
    "Entry",
    "Forbidden",
    "Moved",
    "NoOwner",
    "NotFound",
    "ServiceError",
    "Timeout",
    "TooLarge",
    "TooManyConflicts",
    "TransactionFinished",
    "Unauthorized",
    "Unavailable",
    "WireError",
    "aconnect",
    "connect",
    "transactional",
]

if TYPE_CHECKING:
    from keyval.client import (
        AsyncClient,
        Client,
        ClientClosed,
        DeadlineExceeded,
        Entry,
        NoOwner,
        TooManyConflicts,
        TransactionFinished,
        aconnect,
        connect,
        transactional,
    )
    from wire.errors import (
        Ask,
        BadRequest,
        Conflict,
        Forbidden,
        Moved,
        NotFound,
        ServiceError,
        Timeout,
        TooLarge,
        Unauthorized,
        Unavailable,
        WireError,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keyval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
