"""The interface every durable store implements, and choosing one from a URL.

Backend methods are synchronous and blocking: the service calls them from its one backend
thread (keyval.db.worker), never on the event loop, and never two at once. Each method is one
transaction. Storage failures (full disk, read-only file, lost server connection) raise
`StorageError`; the backend stays usable and a later call succeeds once the cause is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from keyval.db.records import (
    DecisionRecord,
    MapRecord,
    OpResult,
    PreparedOp,
    SaveMapOutcome,
    SlotFence,
    SlotItem,
    SlotRange,
    TermRecord,
)

SQLITE_FILE_NAME = "keyval.sqlite3"


class StorageError(Exception):
    """The store could not complete a transaction; nothing of it was applied."""


class BackendConfigError(Exception):
    """A backend URL or data directory that cannot be used; the message says why."""


class Backend(Protocol):
    description: str  # for logs and errors; never contains a password

    def open(self) -> None:
        """Connect and create the schema if it is missing."""

    def close(self) -> None: ...

    def ensure_grant_key(self, candidate: bytes) -> bytes:
        """Store `candidate` as the grant key unless one exists; return the stored key."""

    def load_fences(self) -> list[SlotFence]: ...

    def save_fences(self, fences: Sequence[SlotFence]) -> None: ...

    def load_term(self) -> TermRecord: ...

    def register_term(self, commander: str, term: int) -> TermRecord:
        """Store (term, commander) if `term` is above the stored term; return the stored record."""

    def load_map(self) -> MapRecord | None: ...

    def save_map(
        self, commander: str, record: MapRecord, fences: Sequence[SlotFence]
    ) -> SaveMapOutcome:
        """Store `record` and `fences` only if (record.term, commander) is the registered term
        and record.version is not below the stored map's version."""

    def commit_batch(
        self, ops: Sequence[PreparedOp], fences: Sequence[SlotFence], now_ms: int
    ) -> list[OpResult]:
        """In one transaction: apply every op whose op_id has no stored result (recording
        ("ok", versions) for it), and store `fences`. Returns, per op, its first result."""

    def read_slot(
        self, slot: int, after: bytes | None, limit: int, max_bytes: int
    ) -> tuple[list[SlotItem], bool]:
        """Live keys of `slot` after `after` in key order: at most `limit` items and, past the
        first item, at most `max_bytes` of keys and values; and True when none are left."""

    def read_slots(
        self, first: int, last: int, after: tuple[int, bytes] | None, limit: int, max_bytes: int
    ) -> SlotRange:
        """Live keys of slots first..last in (slot, key) order, strictly after `after` when
        given: at most `limit` items and, past the first, at most `max_bytes` of keys and
        values; `done` when none are left in the range."""

    def purge_op_results(self, older_than_ms: int) -> int:
        """Forget op results committed before `older_than_ms`; return how many."""

    def decide(self, txid: bytes, decision: str, now_ms: int) -> str:
        """Record `decision` for `txid` unless one exists; return the recorded decision."""

    def get_decision(self, txid: bytes) -> str:
        """The recorded decision for `txid`, "" when there is none."""

    def commit_decisions(
        self, decisions: Sequence[DecisionRecord], fences: Sequence[SlotFence], now_ms: int
    ) -> list[str]:
        """In one transaction: record each decision unless its txid has one (storing a commit's
        writes only when it is recorded now), and store `fences`. Returns the standing ones."""


def open_backend(url: str | None, data_dir: Path | None) -> Backend:
    """The backend a `--backend` URL names (None: SQLite in `data_dir`). Not yet opened."""
    if url is None or url == "" or url == "sqlite":
        if data_dir is None:
            raise BackendConfigError("the SQLite backend needs --data DIR")
        from keyval.db.sqlite import SqliteBackend

        return SqliteBackend(data_dir / SQLITE_FILE_NAME)
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        from keyval.db.postgres import PostgresBackend

        return PostgresBackend(url)
    if scheme == "sqlite":
        path = urlsplit(url).path
        if not path:
            raise BackendConfigError(f"backend URL {url!r} names no file (sqlite:///path/file)")
        from keyval.db.sqlite import SqliteBackend

        return SqliteBackend(Path(path))
    raise BackendConfigError(
        f"unknown backend URL {redact_url(url)!r}: use postgresql://USER@HOST:PORT/DB, "
        "sqlite:///PATH, or leave it out for SQLite in --data DIR"
    )


def redact_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
