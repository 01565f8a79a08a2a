"""`keyval auth` and `keyval principal ...`: offline, and online against a real daemon on TCP."""

from __future__ import annotations

import argparse
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from auth import cli, keys
from auth.daemon import run_authority
from auth.principals import Registry
from tests.auth.helpers import Setup, make_setup


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="keyval")
    parser.add_argument("--config")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path)


def test_offline_add_list_disable_rotate(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = str(setup.data_dir), tmp_path / "carol.key"
    assert (
        run(
            "principal",
            "add",
            "carol",
            "--role",
            "client",
            "--prefix",
            "c/",
            "--out",
            str(out),
            "--data",
            data,
        )
        == 0
    )
    assert (out.stat().st_mode & 0o777) == 0o600
    capsys.readouterr()
    assert run("principal", "list", "--json", "--data", data) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["carol"]["prefixes"] == ["c/"] and rows["carol"]["enabled"]
    assert rows["carol"]["public_key"] == keys.public_key_bytes(keys.load_private_key(out)).hex()
    assert run("principal", "disable", "carol", "--data", data) == 0
    assert not Registry(setup.data_dir).require("carol").enabled
    assert run("principal", "rotate", "carol", "--out", str(out), "--data", data) == 0
    assert Registry(setup.data_dir).require("carol").public_key.hex() != rows["carol"]["public_key"]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("add", "alice", "--role", "client"), "already exists"),
        (("add", "bad name", "--role", "client"), "is invalid"),
        (("add", "d9", "--role", "drone", "--prefix", "x"), "clients only"),
        (("disable", "nobody"), "no principal named 'nobody'"),
    ],
)
def test_offline_bad_input_fails_with_a_reason(
    setup: Setup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    reason: str,
) -> None:
    extra = ("--out", str(tmp_path / "x.key")) if argv[0] == "add" else ()
    assert run("principal", *argv, *extra, "--data", str(setup.data_dir)) == 1
    assert reason in capsys.readouterr().err


def test_online_needs_an_identity(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYVAL_CONFIG", raising=False)
    assert run("principal", "list") == 1
    assert "online mode needs the admin identity" in capsys.readouterr().err


class Daemon:
    """run_authority in its own thread and trio run, on 127.0.0.1:0."""

    def __init__(self, data_dir: Path) -> None:
        self.address: str | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        started: queue.Queue[str | BaseException] = queue.Queue()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                started.put(await nursery.start(run_authority, data_dir, "127.0.0.1:0"))
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        def target() -> None:
            try:
                trio.run(main)
            except BaseException as error:
                started.put(error)

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        result = started.get(timeout=10)
        if isinstance(result, BaseException):
            raise result
        self.address = result

    def stop(self) -> None:
        token, self._token = self._token, None
        if token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=token)
        self._thread.join(timeout=10)


@pytest.fixture
def daemon(setup: Setup) -> Iterator[Daemon]:
    running = Daemon(setup.data_dir)
    yield running
    running.stop()


def identity(setup: Setup, daemon: Daemon, name: str) -> list[str]:
    return [
        "--name",
        name,
        "--key",
        str(setup.key_path(name)),
        "--authority",
        str(daemon.address),
        "--authority-key",
        setup.authority.keys.info.public_key_hex,
    ]


def test_online_admin_commands_and_restart(
    setup: Setup, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dave.key"
    assert (
        run(
            "principal",
            "add",
            "dave",
            "--role",
            "drone",
            "--out",
            str(out),
            *identity(setup, daemon, "root"),
        )
        == 0
    )
    assert (out.stat().st_mode & 0o777) == 0o600
    capsys.readouterr()
    assert run("principal", "list", "--json", *identity(setup, daemon, "root")) == 0
    assert "dave" in {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert run("principal", "disable", "dave", *identity(setup, daemon, "root")) == 0
    # only admins manage principals
    assert run("principal", "enable", "dave", *identity(setup, daemon, "alice")) == 1
    assert "needs role admin" in capsys.readouterr().err
    # the directory is locked while the daemon runs
    assert run("principal", "list", "--data", str(setup.data_dir)) == 1
    assert "is in use" in capsys.readouterr().err
    daemon.stop()
    registry = Registry(setup.data_dir)  # durable across restarts
    assert not registry.require("dave").enabled
    again = Daemon(setup.data_dir)
    try:
        assert run("principal", "enable", "dave", *identity(setup, again, "root")) == 0
    finally:
        again.stop()
    assert Registry(setup.data_dir).require("dave").enabled


def test_online_wrong_authority_key_is_refused(
    setup: Setup, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_setup(tmp_path / "other").authority.keys.info.public_key_hex
    argv = identity(setup, daemon, "root")
    argv[-1] = other
    assert run("principal", "list", *argv) == 1
    assert "pinned authority key" in capsys.readouterr().err
