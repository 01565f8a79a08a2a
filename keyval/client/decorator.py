"""`@keyval.transactional`: FoundationDB's decorator for functions that take a transaction.

    @keyval.transactional
    def transfer(tx, source, target, amount): ...

    transfer(kv, "{a}:x", "{a}:y", 5)   # a client: runs in kv.transact, re-run on conflict
    transfer(tx, "{a}:x", "{a}:y", 5)   # a transaction: joins it, no commit of its own

Works for plain functions (with `Client` / `Transaction`) and coroutine functions (with
`AsyncClient` / `AsyncTransaction`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from keyval.client.aio import AsyncClient
from keyval.client.blocking import Client
from wire.errors import BadRequest


def transactional(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(target: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(target, AsyncClient):
                return await target.transact(lambda tx: fn(tx, *args, **kwargs))
            if isinstance(target, Client):
                raise BadRequest("an async transactional function needs an AsyncClient")
            return await fn(target, *args, **kwargs)

        return run_async

    @functools.wraps(fn)
    def run(target: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(target, Client):
            return target.transact(lambda tx: fn(tx, *args, **kwargs))
        if isinstance(target, AsyncClient):
            raise BadRequest("a plain transactional function needs a blocking Client")
        return fn(target, *args, **kwargs)

    return run
