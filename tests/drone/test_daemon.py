"""The `keyval drone` daemon on real loopback TCP: flags, start-up errors, serving."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from auth.bootstrap import add_principal, init_authority
from auth.client import Credentials
from auth.daemon import run_authority
from auth.service import ServiceIdentity
from keyval import net
from keyval.dbserver import run_db
from keyval.drone.cli import register
from keyval.drone.daemon import run_drone, settings_from_options
from keyval.keys import key_slot
from keyval.messages import DbGrantKey, DbGrantKeyReply, Get, Put, ValueReply, Written
from keyval.nodeconfig import ConfigError, NodeOptions
from tests.drone.harness import FakeCommander
from wire.errors import Moved, Unavailable


def options(tmp_path: Path, name: str = "drone-1", **extra: object) -> NodeOptions:
    return NodeOptions(
        name=name,
        key=tmp_path / f"{name}.key",
        authority="127.0.0.1:1",
        authority_key="00" * 32,
        listen="127.0.0.1:0",
        ready_file=tmp_path / f"{name}.ready",
        data=tmp_path / name,
        extra=dict(extra),
    )


async def test_drone_serves_over_tcp_with_tickets(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Authority, db daemon, a commander (fake, with a real service identity), the drone
    daemon and a client: every connection authenticated with tickets over loopback TCP."""
    authority_dir = tmp_path / "authority"
    info = init_authority(authority_dir)
    for name, role in [
        ("db", "db"),
        ("commander-1", "commander"),
        ("drone-1", "drone"),
        ("client", "client"),
    ]:
        add_principal(authority_dir, name, role, tmp_path / f"{name}.key")
    authority = await nursery.start(run_authority, authority_dir, "127.0.0.1:0")

    def identity(name: str, **extra: object) -> NodeOptions:
        base = options(tmp_path, name, **extra)
        return dataclasses.replace(base, authority=authority, authority_key=info.public_key_hex)

    db_address = await nursery.start(run_db, identity("db"))
    commander_credentials = Credentials(
        "commander-1", tmp_path / "commander-1.key", authority, info.public_key_hex
    )
    db_auth = await commander_credentials.client_auth("db")
    async with await net.open_connection(db_address, db_auth) as connection:
        reply = await connection.request(DbGrantKey(), timeout=5)
    assert isinstance(reply, DbGrantKeyReply)
    commander = FakeCommander(reply.key)
    slot = key_slot("{t}")
    commander.give((slot, slot, 1))
    commander_identity = ServiceIdentity(commander_credentials)
    await commander_identity.start(nursery)
    commander_address = await nursery.start(
        net.serve, "127.0.0.1:0", commander_identity.server_auth, commander
    )
    drone_options = identity("drone-1", db=db_address, commander=[commander_address])
    address = await nursery.start(run_drone, drone_options)
    assert (tmp_path / "drone-1.ready").read_text().strip() == address
    client = Credentials("client", tmp_path / "client.key", authority, info.public_key_hex)
    async with await net.open_connection(address, await client.client_auth("drone-1")) as link:
        with trio.fail_after(10):
            while True:  # until the first heartbeat's grant is loaded
                try:
                    written = await link.request(Put(key="{t}k", value=1, op_id=b"o" * 16))
                    break
                except (Moved, Unavailable):
                    await trio.sleep(0.05)
        assert isinstance(written, Written)
        got = await link.request(Get(key="{t}k"))
        assert got == ValueReply(found=True, value=1, version=written.version)


def test_settings_refuse_missing_and_bad_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--db"):
        settings_from_options(options(tmp_path, commander=["127.0.0.1:1"]))
    with pytest.raises(ConfigError, match="--commander"):
        settings_from_options(options(tmp_path, db="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="max-key-bytes"):
        settings_from_options(options(tmp_path, db="127.0.0.1:1", commander="h:1", max_key_bytes=0))
    with pytest.raises(ConfigError):
        settings_from_options(options(tmp_path, db="nonsense", commander="h:1"))
    settings = settings_from_options(
        options(tmp_path, db="127.0.0.1:1", commander=["a:1,c9@b:2", "c:3"], max_value_bytes=10)
    )
    assert [(c.name, c.address) for c in settings.commanders] == [
        ("commander-1", "a:1"),
        ("c9", "b:2"),
        ("commander-3", "c:3"),
    ]
    assert settings.limits.max_value_bytes == 10


def test_cli_reports_a_missing_flag_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["drone", "--name", "drone-1", "--key", "k", "--authority", "h:1", "--authority-key", "00"]
    )
    assert args.func(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("keyval drone: missing --db") and error.count("\n") == 1


def test_cli_reports_a_missing_key_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["drone", "--name", "drone-1", "--key", str(tmp_path / "none.key")]
    argv += ["--authority", "127.0.0.1:1", "--authority-key", "11" * 32]
    argv += ["--db", "127.0.0.1:1", "--commander", "127.0.0.1:2", "--listen", "127.0.0.1:0"]
    args = parser.parse_args(argv)
    assert args.func(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("keyval drone: cannot start:") and "none.key" in error
    assert error.count("\n") == 1
