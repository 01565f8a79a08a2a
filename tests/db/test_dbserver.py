"""The `keyval db` daemon: start-up errors as a subprocess, and serving over loopback TCP
with the real authority (real sockets need the real clock, so waits are bounded by fail_after).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from auth.bootstrap import add_principal, init_authority
from auth.client import Credentials
from auth.daemon import run_authority
from keyval import net
from keyval.dbserver import run_db
from keyval.grants import Grant, sign_grant
from keyval.keys import canonical_key, key_slot
from keyval.messages import (
    DbBatchResult,
    DbGrantKey,
    DbGrantKeyReply,
    DbReadSlot,
    DbRegisterTerm,
    DbSlotPage,
    DbTerm,
    DbWriteBatch,
    pack_op,
)
from keyval.nodeconfig import NodeOptions
from wire import codec
from wire.errors import Unauthorized

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 10.0  # bound on any one network exchange in these tests


def run_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    identity = ["--name", "db", "--key", str(tmp_path / "db.key"), "--authority", "127.0.0.1:1"]
    identity += ["--authority-key", "00", "--data", str(tmp_path / "data")]
    return subprocess.run(
        [sys.executable, "-m", "keyval", "db", *identity, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unknown_backend_url_exits_with_one_line(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--backend", "mysql://root:secret@localhost/db")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown backend URL" in lines[0]
    assert "secret" not in lines[0]


def test_unreachable_postgres_exits_with_one_line(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--backend", "postgresql://nobody:pw@127.0.0.1:1/none")
    assert done.returncode == 1
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("keyval db:")]
    assert len(lines) == 1
    assert "cannot open the store" in lines[0]
    assert "pw" not in lines[0].replace("postgresql", "")


def test_bad_batch_flags_exit_2(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--batch-max-ops", "0")
    assert done.returncode == 2
    assert "batch-max-ops" in done.stderr


async def test_daemon_serves_commanders_and_drones(tmp_path: Path) -> None:
    info = init_authority(tmp_path / "auth")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, role in {"db": "db", "commander-1": "commander", "drone-1": "drone"}.items():
        add_principal(tmp_path / "auth", name, role, keys / f"{name}.key")
    async with trio.open_nursery() as nursery:
        authority = await nursery.start(run_authority, tmp_path / "auth", "127.0.0.1:0")
        options = NodeOptions(
            name="db",
            key=keys / "db.key",
            authority=authority,
            authority_key=info.public_key_hex,
            listen="127.0.0.1:0",
            ready_file=tmp_path / "db.ready",
            data=tmp_path / "db",
        )
        address = await nursery.start(run_db, options)
        assert (tmp_path / "db.ready").read_text().strip() == address

        async def connect(name: str) -> net.Connection:
            credentials = Credentials(name, keys / f"{name}.key", authority, info.public_key_hex)
            return await net.open_connection(address, await credentials.client_auth("db"))

        with trio.fail_after(WAIT_S):
            async with await connect("commander-1") as commander:
                term = await commander.request(DbRegisterTerm("commander-1", 1))
                assert term == DbTerm(1, "commander-1")
                reply = await commander.request(DbGrantKey())
                assert isinstance(reply, DbGrantKeyReply)
            grant = sign_grant(Grant("drone-1", 1, ((0, 16383, 1),), 0), reply.key)
            write = (key_slot("k"), canonical_key("k"), 1, codec.encode("v"))
            async with await connect("drone-1") as drone:
                result = await drone.request(
                    DbWriteBatch.of([grant], [pack_op(b"o" * 16, [write])])
                )
                assert result == DbBatchResult([("ok", [1])])
                page = await drone.request(DbReadSlot(grant, key_slot("k")))
                assert isinstance(page, DbSlotPage)
                assert page.items == [(canonical_key("k"), "v", 1)]
                with pytest.raises(Unauthorized):
                    await drone.request(DbGrantKey())
        nursery.cancel_scope.cancel()
