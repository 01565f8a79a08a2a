"""A store that cannot write: the batch fails, nothing in it is acknowledged, the daemon
keeps serving, and later batches succeed once the cause is gone.

The read-only file is made with `chattr +i` (immutable), which stops even root's writes on
open descriptors; where that is not possible (no CAP_LINUX_IMMUTABLE, or a filesystem
without the attribute) the test is skipped, saying why.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from keyval.db.sqlite import SqliteBackend
from keyval.keys import canonical_key, key_slot
from keyval.messages import DbBatchResult, DbReadSlot, DbSlotPage, DbWriteBatch, WireOp
from tests.db.conftest import DRONE, grant_key, make_grant, start_database, wire_op

ALL = ((0, 16383, 1),)


def chattr(flag: str, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    existing = [str(path) for path in paths if path.exists()]
    return subprocess.run(["chattr", flag, *existing], capture_output=True, text=True)


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths to make immutable on demand; always made mutable again afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: cannot make a file read-only for root")
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if chattr("+i", [probe]).returncode != 0:
        pytest.skip("cannot set the immutable attribute here (needs CAP_LINUX_IMMUTABLE)")
    chattr("-i", [probe])
    paths: list[Path] = []
    try:
        yield paths
    finally:
        chattr("-i", paths)


def op(key: str, version: int, number: int) -> WireOp:
    return wire_op(number.to_bytes(16, "big"), (key, key, version, False))


async def test_read_only_file_fails_the_batch_then_recovers(
    tmp_path: Path, immutable: list[Path]
) -> None:
    path = tmp_path / "db" / "keyval.sqlite3"
    async with trio.open_nursery() as nursery:
        database = await start_database(nursery, SqliteBackend(path))
        grant = make_grant(await grant_key(database), ALL)
        first = await database.handle(DRONE, DbWriteBatch.of([grant], [op("before", 1, 1)]))
        assert first == DbBatchResult([("ok", [1])])

        immutable.extend([path, path.with_name(path.name + "-wal")])
        assert chattr("+i", immutable).returncode == 0
        failed = await database.handle(
            DRONE, DbWriteBatch.of([grant], [op("lost", 1, 2), op("lost2", 1, 3)])
        )
        assert isinstance(failed, DbBatchResult)
        for code, message in failed.results:
            assert code == "UNAVAILABLE"
            assert message.startswith("database write failed:")

        chattr("-i", immutable)
        later = await database.handle(DRONE, DbWriteBatch.of([grant], [op("after", 1, 4)]))
        assert later == DbBatchResult([("ok", [1])])
        # The op that failed was not recorded: its retry applies now.
        retried = await database.handle(DRONE, DbWriteBatch.of([grant], [op("lost", 1, 2)]))
        assert retried == DbBatchResult([("ok", [1])])
        nursery.cancel_scope.cancel()
    await database.aclose()

    async with trio.open_nursery() as nursery:
        reopened = await start_database(nursery, SqliteBackend(path))
        for key, present in (("before", True), ("after", True), ("lost2", False)):
            page = await reopened.handle(DRONE, DbReadSlot(grant, key_slot(key)))
            assert isinstance(page, DbSlotPage)
            assert (canonical_key(key) in [item[0] for item in page.items]) is present
        nursery.cancel_scope.cancel()
    await reopened.aclose()
