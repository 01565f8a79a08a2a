"""The embedded default store: one SQLite file, WAL journal, synchronous=FULL.

WAL lets slot reads run beside the writer's fsyncs; synchronous=FULL fsyncs the WAL at every
commit, so a batch acknowledged is on disk (NORMAL could lose the last commits on power loss).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from keyval.db.backend import StorageError
from keyval.db.records import StoredWrite
from keyval.db.sql import SqlBackend

# How long a statement waits for another process's lock before failing (one db daemon owns
# the file; this only covers a stray reader such as the sqlite3 shell).
BUSY_TIMEOUT_S = 5.0


class SqliteBackend(SqlBackend):
    table_suffix = " WITHOUT ROWID"
    errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.description = f"sqlite:{path}"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: calls
        # come from the db's one backend thread (keyval.db.worker), which a reopened
        # Database starts anew, one call at a time.
        connection = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"{self.path}: cannot switch to WAL (journal mode {mode})")
            connection.execute("PRAGMA synchronous=FULL")
        except BaseException:
            connection.close()
            raise
        return connection

    def _item_rows(self, writes: list[StoredWrite]) -> list[StoredWrite]:
        return writes  # tuples in the statement's order; sqlite3 binds a bool as 0 or 1

    @contextlib.contextmanager
    def _transaction(self, connection: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
        cursor = connection.cursor()
        # IMMEDIATE takes the write lock up front, so a batch never fails half way on a lock.
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
            cursor.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
