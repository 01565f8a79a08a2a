"""The `keyval drone` daemon on real loopback TCP: flags, start-up errors, serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from keyval import net
from keyval.drone.cli import register
from keyval.drone.daemon import Security, run_drone, settings_from_options
from keyval.keys import key_slot
from keyval.messages import DbGrantKey, DbGrantKeyReply, Get, Put, ValueReply, Written
from keyval.nodeconfig import ConfigError, NodeOptions
from tests.drone.fakedb import FakeDb
from tests.drone.harness import PSK, ROLES, FakeCommander, server_auth
from wire.channel import PskClientAuth
from wire.errors import Moved, Unavailable


def options(tmp_path: Path, **extra: object) -> NodeOptions:
    return NodeOptions(
        name="drone-1",
        key=tmp_path / "drone-1.key",
        authority="127.0.0.1:1",
        authority_key="00" * 32,
        listen="127.0.0.1:0",
        ready_file=tmp_path / "ready",
        extra=dict(extra),
    )


async def psk_dial(address: str, service: str, *, timeout: float) -> net.Connection:
    return await net.open_connection(
        address, PskClientAuth("drone-1", "drone", PSK), timeout=timeout
    )


async def test_drone_serves_over_tcp(nursery: trio.Nursery, tmp_path: Path) -> None:
    db = FakeDb()
    db_address = await nursery.start(net.serve, "127.0.0.1:0", lambda: server_auth("db"), db)
    async with await net.open_connection(
        db_address, PskClientAuth("commander-1", "commander", PSK)
    ) as connection:
        reply = await connection.request(DbGrantKey(), timeout=5)
    assert isinstance(reply, DbGrantKeyReply)
    commander = FakeCommander(reply.key)
    slot = key_slot("{t}")
    commander.give((slot, slot, 1))
    commander_address = await nursery.start(
        net.serve, "127.0.0.1:0", lambda: server_auth("commander-1"), commander
    )
    security = Security(psk_dial, lambda: server_auth("drone-1"))
    drone_options = options(tmp_path, db=db_address, commander=[commander_address])
    address = await nursery.start(
        lambda task_status: run_drone(drone_options, task_status=task_status, security=security)
    )
    assert (tmp_path / "ready").read_text().strip() == address
    client = PskClientAuth("client", ROLES["client"], PSK)
    async with await net.open_connection(address, client) as connection:
        with trio.fail_after(5):
            while True:  # until the first heartbeat's grant is loaded
                try:
                    written = await connection.request(Put(key="{t}k", value=1, op_id=b"o" * 16))
                    break
                except (Moved, Unavailable):
                    await trio.sleep(0.05)
        assert isinstance(written, Written)
        got = await connection.request(Get(key="{t}k"))
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
