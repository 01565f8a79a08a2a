"""A real authority and db daemon in this process over loopback TCP, the db with its metrics
endpoint on 127.0.0.1:0 (real sockets need the real clock: waits are bounded by fail_after)."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from auth.bootstrap import add_principal, init_authority
from auth.client import Credentials
from auth.daemon import run_authority
from keyval import net, observe
from keyval.dbserver import run_db
from keyval.nodeconfig import NodeOptions

WAIT_S = 10.0  # bound on any one network exchange in these tests
DB_NAME = "db-observed"


@dataclasses.dataclass
class Cluster:
    tmp_path: Path
    authority: str
    authority_key: str
    db_address: str
    metrics_address: str

    def key_path(self, name: str) -> Path:
        return self.tmp_path / "keys" / f"{name}.key"

    def credentials(self, name: str) -> Credentials:
        return Credentials(name, self.key_path(name), self.authority, self.authority_key)

    async def connect(self, name: str) -> net.Connection:
        auth = await self.credentials(name).client_auth(DB_NAME)
        return await net.open_connection(self.db_address, auth)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record of the test as JSON lines at DEBUG; the root logger is put back."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    observe.setup_logging("test-process", "DEBUG", json=True, stream=stream)
    try:
        yield stream
    finally:
        observe.remove_logging()
        root.setLevel(level)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    info = init_authority(tmp_path / "auth")
    (tmp_path / "keys").mkdir()
    for name, role in {DB_NAME: "db", "commander-1": "commander", "drone-1": "drone"}.items():
        add_principal(tmp_path / "auth", name, role, tmp_path / "keys" / f"{name}.key")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            authority = await nursery.start(run_authority, tmp_path / "auth", "127.0.0.1:0")
            options = NodeOptions(
                name=DB_NAME,
                key=tmp_path / "keys" / f"{DB_NAME}.key",
                authority=authority,
                authority_key=info.public_key_hex,
                listen="127.0.0.1:0",
                data=tmp_path / "db",
                metrics="127.0.0.1:0",
            )
            address = await nursery.start(run_db, options)
        metrics = observe.node_metrics(DB_NAME)
        assert metrics is not None and metrics.address is not None
        yield Cluster(tmp_path, authority, info.public_key_hex, address, metrics.address)
        nursery.cancel_scope.cancel()
