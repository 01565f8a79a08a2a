"""The PostgreSQL store (psycopg 3, sync API, called from one worker thread at a time).

The URL is a libpq connection URI; a schema other than `public` is chosen the libpq way,
e.g. `postgresql://u@h/db?options=-csearch_path%3Dkeyval`. The grant key, term and map live
in the database, so a db daemon can move to another host and carry on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg

from keyval.db.sql import SqlBackend

# Connecting includes DNS and authentication; a server slower than this is down for us.
CONNECT_TIMEOUT_S = 10


class PostgresBackend(SqlBackend):
    blob_type = "BYTEA"
    int_type = "BIGINT"
    lock_suffix = " FOR UPDATE"
    placeholder = "%s"
    errors = (psycopg.Error, OSError)

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.description = describe_conninfo(url)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)

    @contextlib.contextmanager
    def _transaction(self, connection: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
        with connection.transaction(), connection.cursor() as cursor:
            yield cursor

    def _connection_broken(self, connection: psycopg.Connection[Any]) -> bool:
        return bool(connection.closed or connection.broken)


def describe_conninfo(url: str) -> str:
    """`url` (a URI or key=value conninfo) as user@host:port/db, never with the password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable connection string)"
    user, host = parts.get("user", ""), parts.get("host", "")
    port, database = parts.get("port", ""), parts.get("dbname", "")
    return f"postgresql://{user}@{host}:{port}/{database}"
