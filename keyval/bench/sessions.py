"""`workloads.Session` for keyval (the trio client), Redis (respclient) and etcd (http)."""

from __future__ import annotations

import json
from typing import Any

from keyval.bench.errors import BenchError, HttpProtocolError, RespProtocolError
from keyval.bench.etcdserver import PUT_PATH, RANGE_PATH, put_body, range_body
from keyval.bench.http import HttpConnection
from keyval.bench.resp import RespError
from keyval.bench.respclient import RespConnection
from keyval.client import AsyncClient, AsyncTransaction

# Attempts of one Redis WATCH/MULTI/EXEC transaction; keyval's `transact` allows 10 too
# (keyval.client.aio.MAX_TRANSACTION_ATTEMPTS), so both sides give up alike.
REDIS_TXN_ATTEMPTS = 10


class RedisTransactionFailed(BenchError):
    """A Redis transaction lost to conflicts REDIS_TXN_ATTEMPTS times."""


class KeyvalSession:
    def __init__(self, client: AsyncClient, *, ack: str) -> None:
        self.client = client
        self.ack = ack

    async def get(self, key: str) -> None:
        await self.client.get(key)

    async def put(self, key: str, value: bytes | int) -> None:
        await self.client.put(key, value, ack=self.ack)

    async def increment_pair(self, first: str, second: str) -> None:
        async def bump(tx: AsyncTransaction) -> None:
            # Both reads in one go (one request per drone, concurrently), as Redis's MGET
            # between WATCH and MULTI: the same round trips on both sides.
            seen = await tx.get_many([first, second])
            await tx.put(first, seen.get(first, 0) + 1)
            await tx.put(second, seen.get(second, 0) - 1)

        await self.client.transact(bump, ack=self.ack)

    async def scan(self, prefix: str, limit: int) -> int:
        count = 0
        async for _ in self.client.scan(prefix, limit=limit):
            count += 1
        return count


class RedisSession:
    """Redis's equivalents: GET, SET, WATCH + MGET + MULTI/SET/SET/EXEC.

    A WATCH belongs to the connection, so a session that runs transactions must have its
    connection to itself (the load generator gives each transaction task its own)."""

    def __init__(self, connection: RespConnection) -> None:
        self.connection = connection

    async def get(self, key: str) -> None:
        await self.connection.request("GET", key)

    async def put(self, key: str, value: bytes | int) -> None:
        await self.connection.request("SET", key, value)

    async def increment_pair(self, first: str, second: str) -> None:
        for _ in range(REDIS_TXN_ATTEMPTS):
            await self.connection.request("WATCH", first, second)
            values = await self.connection.request("MGET", first, second)
            a, b = _integers(values)
            replies = await self.connection.pipeline(
                [("MULTI",), ("SET", first, a + 1), ("SET", second, b - 1), ("EXEC",)]
            )
            errors = [reply for reply in replies if isinstance(reply, RespError)]
            if errors:
                raise BenchError(f"redis transaction failed: {errors[0].message}")
            if replies[-1] is not None:  # EXEC answers nil when a watched key changed
                return
        raise RedisTransactionFailed(f"lost {REDIS_TXN_ATTEMPTS} times to conflicts")

    async def scan(self, prefix: str, limit: int) -> int:
        raise BenchError("scan has no Redis equivalent in this bench")


class EtcdSession:
    """etcd's v3 JSON gateway: put and range of one key; no transactions or scans here."""

    def __init__(self, connection: HttpConnection) -> None:
        self.connection = connection

    async def get(self, key: str) -> None:
        _expect_header(await self.connection.post(RANGE_PATH, range_body(key)))

    async def put(self, key: str, value: bytes | int) -> None:
        data = value if isinstance(value, bytes) else str(value).encode()
        _expect_header(await self.connection.post(PUT_PATH, put_body(key, data)))

    async def increment_pair(self, first: str, second: str) -> None:
        raise BenchError("transactions are not driven against etcd in this bench")

    async def scan(self, prefix: str, limit: int) -> int:
        raise BenchError("scan is not driven against etcd in this bench")


def _expect_header(body: bytes) -> None:
    """A gateway success reply is a JSON object with a `header` (cluster id, revision)."""
    try:
        reply = json.loads(body)
    except ValueError as error:
        raise HttpProtocolError(f"etcd replied with non-JSON {body[:80]!r}") from error
    if not isinstance(reply, dict) or not isinstance(reply.get("header"), dict):
        raise HttpProtocolError(f"etcd reply lacks a header: {body[:120]!r}")


def _integers(reply: Any) -> tuple[int, int]:
    if not isinstance(reply, list) or len(reply) != 2:
        raise RespProtocolError(f"MGET of two keys answered {reply!r}")
    numbers = []
    for item in reply:
        if item is None:
            numbers.append(0)
        elif isinstance(item, bytes) and item.lstrip(b"-").isdigit():
            numbers.append(int(item))
        else:
            raise RespProtocolError(f"transaction key holds {item!r}, not an integer")
    return numbers[0], numbers[1]
