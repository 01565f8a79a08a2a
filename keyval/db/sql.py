"""The SQL both stores share. A subclass supplies the connection, the transaction, the type
names and the error classes; the statements and the logic live here once.

Tables: `kv_items` (one row per key: CBOR value, version, tombstone flag), `kv_op_results`
(op id -> first result, with its commit time for expiry), `kv_fences` (newest term and epoch
per slot), `kv_meta` (grant key, commander term, slot map; CBOR values) and `kv_decisions`
(2PC decision records). A write replaces a row only when its version is higher than the
stored one, so a reordered or replayed older write can never move a key back.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from keyval.db.backend import StorageError
from keyval.db.records import (
    DECISION_COMMIT,
    RESULT_OK,
    DecisionRecord,
    MapRecord,
    OpResult,
    PreparedOp,
    SaveMapOutcome,
    SlotFence,
    SlotItem,
    SlotRange,
    StoredWrite,
    TermRecord,
)
from wire import codec

logger = logging.getLogger("keyval.db")

T = TypeVar("T")

# Op ids looked up per statement: far below SQLite's 32766 bound-parameter limit, and a
# batch is split in a few statements at most.
OP_ID_LOOKUP_CHUNK = 500

# Rows fetched from a cursor at a time while filling a slot page up to its byte budget.
READ_FETCH_ROWS = 64

# Install a key's new state unless the stored row is as new or newer (versions never go back).
# Parameters in StoredWrite's field order (see SqlBackend._item_rows).
_UPSERT_ITEM = (
    "INSERT INTO kv_items (slot, key, value, deleted, version) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (slot, key) DO UPDATE SET "
    "value = excluded.value, version = excluded.version, "
    "deleted = excluded.deleted WHERE kv_items.version < excluded.version"
)

# Record an op's first result; an op id already stored keeps its result (counted as no row).
_INSERT_RESULT_UNLESS_STORED = (
    "INSERT INTO kv_op_results (op_id, result, committed_ms) VALUES (?, ?, ?) "
    "ON CONFLICT (op_id) DO NOTHING"
)

_META_GRANT_KEY = "grant_key"
_META_TERM = "term"
_META_MAP = "map"


class _RetriedOp(Exception):
    """A batch holds an op id with a stored result: roll back, take the retry path."""


class SqlBackend:
    """A `Backend` over a DB-API connection. Subclasses fill in the hooks below."""

    description = "sql"
    blob_type = "BLOB"
    int_type = "INTEGER"
    table_suffix = ""  # e.g. SQLite's WITHOUT ROWID
    lock_suffix = ""  # e.g. PostgreSQL's FOR UPDATE
    placeholder = "?"
    errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self) -> None:
        self._connection: Any = None

    # ------------------------------------------------------------ hooks

    def _connect(self) -> Any:
        raise NotImplementedError

    def _transaction(self, connection: Any) -> contextlib.AbstractContextManager[Any]:
        """A context that yields a cursor, commits on success and rolls back on error."""
        raise NotImplementedError

    def _connection_broken(self, connection: Any) -> bool:
        """After an error: must the connection be replaced before the next call?"""
        return False

    def _item_rows(self, writes: list[StoredWrite]) -> Sequence[Sequence[Any]]:
        """Parameters of `_UPSERT_ITEM` for `writes`: the tombstone flag as an integer (a
        driver that binds a bool as an integer may return `writes` themselves)."""
        return [(w.slot, w.key, w.value, int(w.deleted), w.version) for w in writes]

    # ------------------------------------------------------------ plumbing

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    def _run(self, action: str, work: Callable[[Any], T]) -> T:
        """Run `work(cursor)` in one transaction; storage failures become StorageError."""
        try:
            if self._connection is None:
                self._connection = self._connect()
            with self._transaction(self._connection) as cursor:
                return work(cursor)
        except self.errors as error:
            self._after_error()
            raise StorageError(f"database {action} failed: {error}".rstrip()) from error

    def _after_error(self) -> None:
        connection, broken = self._connection, False
        if connection is not None:
            broken = self._connection_broken(connection)
        if broken:
            logger.warning("%s: dropping the broken connection; reconnecting on next use", self)
            self._connection = None
            with contextlib.suppress(*self.errors):
                connection.close()

    def __str__(self) -> str:
        return self.description

    def open(self) -> None:
        self._run("schema set-up", self._create_schema)

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(*self.errors):
                self._connection.close()
            self._connection = None

    def _create_schema(self, cursor: Any) -> None:
        blob, integer = self.blob_type, self.int_type
        for statement in (
            f"CREATE TABLE IF NOT EXISTS kv_items (slot {integer} NOT NULL, "
            f"key {blob} NOT NULL, value {blob} NOT NULL, version {integer} NOT NULL, "
            f"deleted {integer} NOT NULL, PRIMARY KEY (slot, key)){self.table_suffix}",
            f"CREATE TABLE IF NOT EXISTS kv_op_results (op_id {blob} PRIMARY KEY, "
            f"result {blob} NOT NULL, committed_ms {integer} NOT NULL)",
            "CREATE INDEX IF NOT EXISTS kv_op_results_age ON kv_op_results (committed_ms)",
            f"CREATE TABLE IF NOT EXISTS kv_fences (slot {integer} PRIMARY KEY, "
            f"term {integer} NOT NULL, epoch {integer} NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS kv_meta (name TEXT PRIMARY KEY, value {blob} NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS kv_decisions (txid {blob} PRIMARY KEY, "
            f"decision TEXT NOT NULL, decided_ms {integer} NOT NULL)",
        ):
            cursor.execute(statement)
        if self._meta(cursor, _META_TERM) is None:
            self._put_meta(cursor, _META_TERM, codec.encode([0, ""]))

    # ------------------------------------------------------------ meta rows

    def _meta(self, cursor: Any, name: str, *, lock: bool = False) -> bytes | None:
        suffix = self.lock_suffix if lock else ""
        cursor.execute(self._sql(f"SELECT value FROM kv_meta WHERE name = ?{suffix}"), (name,))
        row = cursor.fetchone()
        return None if row is None else bytes(row[0])

    def _put_meta(self, cursor: Any, name: str, value: bytes) -> None:
        cursor.execute(
            self._sql(
                "INSERT INTO kv_meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
            ),
            (name, value),
        )

    def _term(self, cursor: Any, *, lock: bool = False) -> TermRecord:
        stored = self._meta(cursor, _META_TERM, lock=lock)
        if stored is None:
            return TermRecord(0, "")
        term, commander = codec.decode(stored)
        return TermRecord(int(term), str(commander))

    def _map(self, cursor: Any) -> MapRecord | None:
        stored = self._meta(cursor, _META_MAP)
        if stored is None:
            return None
        term, version, ranges = codec.decode(stored)
        return MapRecord(term, version, tuple((a, b, str(c), d) for a, b, c, d in ranges))

    # ------------------------------------------------------------ grant key, term, map

    def ensure_grant_key(self, candidate: bytes) -> bytes:
        def work(cursor: Any) -> bytes:
            stored = self._meta(cursor, _META_GRANT_KEY)
            if stored is not None:
                return stored
            self._put_meta(cursor, _META_GRANT_KEY, candidate)
            return candidate

        return self._run("grant key set-up", work)

    def load_term(self) -> TermRecord:
        return self._run("read", self._term)

    def register_term(self, commander: str, term: int) -> TermRecord:
        def work(cursor: Any) -> TermRecord:
            current = self._term(cursor, lock=True)
            if term <= current.term:
                return current
            self._put_meta(cursor, _META_TERM, codec.encode([term, commander]))
            return TermRecord(term, commander)

        return self._run("write", work)

    def load_map(self) -> MapRecord | None:
        return self._run("read", self._map)

    def save_map(
        self, commander: str, record: MapRecord, fences: Sequence[SlotFence]
    ) -> SaveMapOutcome:
        def work(cursor: Any) -> SaveMapOutcome:
            current = self._term(cursor, lock=True)
            stored = self._map(cursor)
            stored_version = 0 if stored is None else stored.version
            same_term = stored is not None and stored.term == record.term
            if current != TermRecord(record.term, commander) or (
                same_term and record.version < stored_version
            ):
                return SaveMapOutcome(False, current, stored_version)
            ranges = [list(item) for item in record.ranges]
            self._put_meta(cursor, _META_MAP, codec.encode([record.term, record.version, ranges]))
            self._write_fences(cursor, fences)
            return SaveMapOutcome(True, current, record.version)

        return self._run("write", work)

    # ------------------------------------------------------------ fences

    def _write_fences(self, cursor: Any, fences: Sequence[SlotFence]) -> None:
        if not fences:
            return
        cursor.executemany(
            self._sql(
                "INSERT INTO kv_fences (slot, term, epoch) VALUES (?, ?, ?) ON CONFLICT (slot) "
                "DO UPDATE SET term = excluded.term, epoch = excluded.epoch"
            ),
            [(fence.slot, fence.term, fence.epoch) for fence in fences],
        )

    def load_fences(self) -> list[SlotFence]:
        def work(cursor: Any) -> list[SlotFence]:
            cursor.execute("SELECT slot, term, epoch FROM kv_fences")
            return [SlotFence(int(s), int(t), int(e)) for s, t, e in cursor.fetchall()]

        return self._run("read", work)

    def save_fences(self, fences: Sequence[SlotFence]) -> None:
        self._run("write", lambda cursor: self._write_fences(cursor, fences))

    # ------------------------------------------------------------ data

    def _stored_results(self, cursor: Any, op_ids: list[bytes]) -> dict[bytes, OpResult]:
        found: dict[bytes, OpResult] = {}
        for start in range(0, len(op_ids), OP_ID_LOOKUP_CHUNK):
            chunk = op_ids[start : start + OP_ID_LOOKUP_CHUNK]
            marks = ", ".join("?" * len(chunk))
            cursor.execute(
                self._sql(f"SELECT op_id, result FROM kv_op_results WHERE op_id IN ({marks})"),
                chunk,
            )
            for op_id, result in cursor.fetchall():
                code, payload = codec.decode(bytes(result))
                found[bytes(op_id)] = (code, payload)
        return found

    def commit_batch(
        self, ops: Sequence[PreparedOp], fences: Sequence[SlotFence], now_ms: int
    ) -> list[OpResult]:
        if ops:
            try:
                return self._run(
                    "write", lambda cursor: self._commit_new(cursor, ops, fences, now_ms)
                )
            except _RetriedOp:
                pass  # rolled back: do the batch again, looking up the stored results first
        return self._run("write", lambda cursor: self._commit_retries(cursor, ops, fences, now_ms))

    def _commit_new(
        self, cursor: Any, ops: Sequence[PreparedOp], fences: Sequence[SlotFence], now_ms: int
    ) -> list[OpResult]:
        """The common case, where no op of the batch has a stored result: record every op's
        result first (skipping an op id already stored) and raise _RetriedOp, rolling the
        transaction back, if fewer results went in than there are ops; otherwise apply every
        op. One statement fewer than looking the op ids up first."""
        results: list[OpResult] = [(RESULT_OK, list(op.versions)) for op in ops]
        cursor.executemany(
            self._sql(_INSERT_RESULT_UNLESS_STORED),
            [
                (op.op_id, codec.encode(result), now_ms)
                for op, result in zip(ops, results, strict=True)
            ],
        )
        if cursor.rowcount != len(ops):  # a retry, or one op id twice in the batch
            raise _RetriedOp
        writes = [write for op in ops for write in op.writes]
        if writes:
            cursor.executemany(self._sql(_UPSERT_ITEM), self._item_rows(writes))
        self._write_fences(cursor, fences)
        return results

    def _commit_retries(
        self, cursor: Any, ops: Sequence[PreparedOp], fences: Sequence[SlotFence], now_ms: int
    ) -> list[OpResult]:
        """A batch with retried ops: each answers its first result and applies nothing."""
        known = self._stored_results(cursor, list({op.op_id for op in ops}))
        results: list[OpResult] = []
        writes: list[StoredWrite] = []
        result_rows: list[tuple[bytes, bytes, int]] = []
        for op in ops:
            if op.op_id in known:  # a retry: its first result, nothing applied again
                results.append(known[op.op_id])
                continue
            result: OpResult = (RESULT_OK, list(op.versions))
            known[op.op_id] = result
            results.append(result)
            result_rows.append((op.op_id, codec.encode(result), now_ms))
            writes.extend(op.writes)
        if writes:
            cursor.executemany(self._sql(_UPSERT_ITEM), self._item_rows(writes))
        if result_rows:
            cursor.executemany(self._sql(_INSERT_RESULT_UNLESS_STORED), result_rows)
        self._write_fences(cursor, fences)
        return results

    def read_slot(
        self, slot: int, after: bytes | None, limit: int, max_bytes: int
    ) -> tuple[list[SlotItem], bool]:
        def work(cursor: Any) -> tuple[list[SlotItem], bool]:
            cursor.execute(
                self._sql(
                    "SELECT key, value, version FROM kv_items WHERE slot = ? AND deleted = 0 "
                    "AND key > ? ORDER BY key LIMIT ?"
                ),
                (slot, after or b"", limit + 1),  # one more row tells whether we are done
            )
            return _take_within(cursor, limit, max_bytes)

        return self._run("read", work)

    def read_slots(
        self, first: int, last: int, after: tuple[int, bytes] | None, limit: int, max_bytes: int
    ) -> SlotRange:
        def work(cursor: Any) -> SlotRange:
            # One range scan of the (slot, key) primary key; `limit + 1` rows tell whether
            # the range is exhausted.
            arguments: tuple[Any, ...]
            if after is None:
                where, arguments = "slot >= ?", (first,)
            else:
                # A row-value comparison: both stores turn it into one index range scan
                # (an OR of slot and key terms made SQLite sort a union of two scans).
                where, arguments = "(slot, key) > (?, ?)", (after[0], after[1])
            cursor.execute(
                self._sql(
                    f"SELECT slot, key, value, version FROM kv_items WHERE {where} "
                    "AND slot <= ? AND deleted = 0 ORDER BY slot, key LIMIT ?"
                ),
                (*arguments, last, limit + 1),
            )
            return _take_range_within(cursor, limit, max_bytes)

        return self._run("read", work)

    def purge_op_results(self, older_than_ms: int) -> int:
        def work(cursor: Any) -> int:
            cursor.execute(
                self._sql("DELETE FROM kv_op_results WHERE committed_ms < ?"), (older_than_ms,)
            )
            return int(cursor.rowcount)

        return self._run("write", work)

    def decide(self, txid: bytes, decision: str, now_ms: int) -> str:
        def work(cursor: Any) -> str:
            cursor.execute(
                self._sql(
                    "INSERT INTO kv_decisions (txid, decision, decided_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (txid) DO NOTHING"
                ),
                (txid, decision, now_ms),
            )
            cursor.execute(self._sql("SELECT decision FROM kv_decisions WHERE txid = ?"), (txid,))
            return str(cursor.fetchone()[0])

        return self._run("write", work)

    def get_decision(self, txid: bytes) -> str:
        def work(cursor: Any) -> str:
            cursor.execute(self._sql("SELECT decision FROM kv_decisions WHERE txid = ?"), (txid,))
            row = cursor.fetchone()
            return "" if row is None else str(row[0])

        return self._run("read", work)

    def commit_decisions(
        self, decisions: Sequence[DecisionRecord], fences: Sequence[SlotFence], now_ms: int
    ) -> list[str]:
        def work(cursor: Any) -> list[str]:
            standing: list[str] = []
            writes: list[StoredWrite] = []
            for record in decisions:
                cursor.execute(
                    self._sql(
                        "INSERT INTO kv_decisions (txid, decision, decided_ms) VALUES (?, ?, ?) "
                        "ON CONFLICT (txid) DO NOTHING"
                    ),
                    (record.txid, record.decision, now_ms),
                )
                if cursor.rowcount == 1:  # ours is the first decision: it stands
                    standing.append(record.decision)
                    if record.decision == DECISION_COMMIT:
                        writes.extend(record.writes)
                    continue
                cursor.execute(
                    self._sql("SELECT decision FROM kv_decisions WHERE txid = ?"), (record.txid,)
                )
                standing.append(str(cursor.fetchone()[0]))
            if writes:
                cursor.executemany(self._sql(_UPSERT_ITEM), self._item_rows(writes))
            self._write_fences(cursor, fences)
            return standing

        return self._run("write", work)


def _take_within(cursor: Any, limit: int, max_bytes: int) -> tuple[list[SlotItem], bool]:
    """Up to `limit` rows of `cursor` whose keys and values fit in `max_bytes` (the first row
    always goes), and whether the cursor had no row left over."""
    items: list[SlotItem] = []
    used_bytes = 0
    while rows := cursor.fetchmany(READ_FETCH_ROWS):
        for key, value, version in rows:
            size = len(key) + len(value)
            if len(items) == limit or (items and used_bytes + size > max_bytes):
                return items, False
            used_bytes += size
            items.append(SlotItem(bytes(key), bytes(value), int(version)))
    return items, True


def _take_range_within(cursor: Any, limit: int, max_bytes: int) -> SlotRange:
    """`_take_within` for (slot, key, value, version) rows, as columns. The page is cut with
    C-level helpers (zip, accumulate, bisect, groupby), not a Python step per row: a failover
    reads a drone's whole share (100k keys) this way."""
    rows = cursor.fetchmany(limit + 1)  # the query's LIMIT is limit + 1 already
    done = len(rows) <= limit
    if not rows:
        return SlotRange([], [], [], [], True)
    slots, keys, values, versions = (list(column) for column in zip(*rows[:limit], strict=True))
    sizes = itertools.accumulate(map(operator.add, map(len, keys), map(len, values)))
    # Past the first row, as many rows as fit in max_bytes (the first always goes).
    count = max(1, bisect.bisect_right(list(sizes), max_bytes))
    if count < len(keys):
        done = False
        del slots[count:], keys[count:], values[count:], versions[count:]
    if set(map(type, keys)) != {bytes}:  # a driver may hand out memoryview for BLOB/bytea
        keys = list(map(bytes, keys))
    if set(map(type, values)) != {bytes}:
        values = list(map(bytes, values))
    runs = [(slot, len(list(group))) for slot, group in itertools.groupby(slots)]
    return SlotRange(runs, keys, values, versions, done)
