"""Fixtures for the db tests: a backend per store, a Database, grants and peers.

SQLite always runs. PostgreSQL runs when KEYVAL_TEST_POSTGRES holds a DSN; each test gets a
fresh schema (dropped afterwards) so parallel runs never see each other's tables.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from psycopg import conninfo

from keyval.db.backend import Backend
from keyval.db.postgres import PostgresBackend
from keyval.db.service import DEFAULT_BATCH_MAX_DELAY_MS, DEFAULT_BATCH_MAX_OPS, Database
from keyval.db.sqlite import SqliteBackend
from keyval.grants import Grant, sign_grant
from keyval.keys import Key, canonical_key, key_slot
from keyval.messages import WireOp, pack_op
from wire import codec
from wire.channel import PeerInfo

POSTGRES_ENV = "KEYVAL_TEST_POSTGRES"

DRONE = PeerInfo("drone-1", "drone")
OTHER_DRONE = PeerInfo("drone-2", "drone")
COMMANDER = PeerInfo("commander-1", "commander")
OTHER_COMMANDER = PeerInfo("commander-2", "commander")
CLIENT = PeerInfo("client", "client")


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A DSN whose search_path is a fresh schema; the schema is dropped afterwards."""
    dsn = os.environ.get(POSTGRES_ENV)
    if not dsn:
        pytest.skip(f"PostgreSQL tests need a DSN in ${POSTGRES_ENV}")
    schema = f"keyval_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield conninfo.make_conninfo(dsn, options=f"-csearch_path={schema}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Backend]:
    """A factory of backends on one store, so a test can 'restart' by making another."""
    if request.param == "sqlite":
        return lambda: SqliteBackend(tmp_path / "db" / "keyval.sqlite3")
    dsn = request.getfixturevalue("postgres_dsn")
    return lambda: PostgresBackend(dsn)


@pytest.fixture
def backend(make_backend: Callable[[], Backend]) -> Iterator[Backend]:
    store = make_backend()
    store.open()
    try:
        yield store
    finally:
        store.close()


async def start_database(
    nursery: trio.Nursery,
    backend: Backend,
    *,
    batch_max_ops: int = DEFAULT_BATCH_MAX_OPS,
    batch_max_delay_ms: float = DEFAULT_BATCH_MAX_DELAY_MS,
) -> Database:
    database = Database(backend, batch_max_ops=batch_max_ops, batch_max_delay_ms=batch_max_delay_ms)
    await database.open()
    await nursery.start(database.run)
    return database


@pytest.fixture
async def database(make_backend: Callable[[], Backend]) -> AsyncIterator[Database]:
    async with trio.open_nursery() as nursery:
        db = await start_database(nursery, make_backend())
        yield db
        nursery.cancel_scope.cancel()
    await db.aclose()


async def grant_key(database: Database) -> bytes:
    from keyval.messages import DbGrantKey, DbGrantKeyReply

    reply = await database.handle(COMMANDER, DbGrantKey())
    assert isinstance(reply, DbGrantKeyReply)
    return reply.key


def make_grant(
    key: bytes, ranges: tuple[tuple[int, int, int], ...], *, drone: str = "drone-1", term: int = 1
) -> Grant:
    return sign_grant(Grant(drone, term, ranges, 0), key)


def wire_op(op_id: bytes, *writes: tuple[Key, object, int, bool]) -> WireOp:
    """A write batch op from (key, value, version, deleted) writes, as a drone packs it."""
    return pack_op(
        op_id,
        [
            (key_slot(key), canonical_key(key), version, None if deleted else codec.encode(value))
            for key, value, version, deleted in writes
        ],
    )
