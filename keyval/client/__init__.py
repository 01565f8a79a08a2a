"""The keyval client library.

    async with keyval.aconnect("client.toml") as kv:      # trio
        await kv.put("user:1", {"name": "ada"})
    with keyval.connect("client.toml") as kv:             # blocking, one per thread
        kv.get("user:1")
        with kv.transaction() as tx:
            tx.put("{acct}:a", tx.get("{acct}:a", 0) - 5)

Modules: `config` (client.toml), `policy` (backoff and deadline), `routing` (the slot map),
`links` (connections), `router` (redirects and retries), `autobatch` (concurrent gets
sharing get_many requests), `scanning`, `txn` (transactions), `aio` (the trio client),
`blocking` (the thread-backed facade), `errors`.
"""

from __future__ import annotations

from keyval.client.aio import AsyncClient, aconnect
from keyval.client.blocking import Client, Transaction, connect
from keyval.client.decorator import transactional
from keyval.client.errors import (
    ClientClosed,
    DeadlineExceeded,
    NoOwner,
    TooManyConflicts,
    TransactionFinished,
)
from keyval.client.txn import AsyncTransaction, Entry

__all__ = [
    "AsyncClient",
    "AsyncTransaction",
    "Client",
    "ClientClosed",
    "DeadlineExceeded",
    "Entry",
    "NoOwner",
    "TooManyConflicts",
    "Transaction",
    "TransactionFinished",
    "aconnect",
    "connect",
    "transactional",
]
