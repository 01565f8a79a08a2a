"""The REPL in a real pseudo-terminal (pexpect): what the screen shows, Ctrl-C, Ctrl-D.

The first test needs no cluster: its config names an unreachable commander, so it checks the
local commands and that errors leave the REPL running. The e2e test starts a real cluster
(`keyval cluster up`, tests/e2e/cluster.py) and runs slots, status, keyslot and move."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from auth import keys
from tests.e2e.cluster import LocalCluster

PROMPT = "keyval>"  # prompt_toolkit draws the trailing space as a cursor move
# Every expect waits at most this long: a cold interpreter start plus one login on busy cores.
EXPECT_TIMEOUT_S = 30


def spawn(config: Path, home: Path) -> pexpect.spawn:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TERM": "xterm"}
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"  # pexpect does not answer cursor-position queries
    child = pexpect.spawn(
        sys.executable,
        ["-m", "keyval", "admin", "--config", str(config)],
        env=env,
        encoding="utf-8",
        timeout=EXPECT_TIMEOUT_S,
        dimensions=(40, 120),
    )
    child.expect_exact(PROMPT)
    return child


def run(child: pexpect.spawn, line: str, *expected: str) -> None:
    child.sendline(line)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact(PROMPT)


def unreachable_config(tmp_path: Path) -> Path:
    key = keys.generate_private_key()
    keys.save_private_key(tmp_path / "admin.key", key)
    authority_key = keys.public_key_bytes(keys.generate_private_key()).hex()
    config = tmp_path / "admin.toml"
    config.write_text(
        'name = "admin"\nkey = "admin.key"\nauthority = "127.0.0.1:1"\n'
        f'authority_key = "{authority_key}"\ncommanders = ["127.0.0.1:1"]\n'
    )
    return config


def test_repl_local_commands_errors_history_and_quit(tmp_path: Path) -> None:
    child = spawn(unreachable_config(tmp_path), tmp_path)
    try:
        run(child, "help", "keyslot KEY", "move SLOT DRONE", "Ctrl-D quits")
        run(child, "slto 3", "error: unknown command 'slto'; did you mean 'slot'")
        run(child, "slot 20000", "error: slot 20000 is out of range: slots are 0..16383")
        run(child, "slots", "error: UNAVAILABLE: no commander answered")
        run(child, "help drain", "drain DRONE", "move every slot off DRONE")
        # Tab completes a command name.
        child.send("keys\t")
        child.expect_exact("keyslot")
        child.sendcontrol("u")
        # Ctrl-C at the prompt drops the line; the REPL stays.
        child.send("half a line")
        child.sendintr()
        run(child, "help quit", "leave the REPL")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    history = (tmp_path / ".keyval_history").read_text()
    assert "slot 20000" in history and "help drain" in history


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    running = LocalCluster(tmp_path_factory.mktemp("admin-cluster"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.e2e
def test_repl_against_a_real_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    child = spawn(cluster.root / "admin.toml", tmp_path)
    try:
        run(child, "slots", "slot map v", "drone-1", "drone-3", "16384 slots of 16384")
        run(child, "status", "leader commander-1", "commander-1", "drone-2")
        run(child, "keyslot foo", "key 'foo' -> slot 12182: owner drone-3")
        run(child, "move 12182 drone-1", "slot 12182 moved drone-3 -> drone-1")
        run(child, "keyslot foo", "slot 12182: owner drone-1")
        run(child, "move 1 drone-9", "error: NOT_FOUND: no live drone named 'drone-9'")
        run(child, "put foo bar", "stored 'foo'")
        run(child, "get foo", "'foo' = \"bar\"")
        run(child, "slot 16384", "out of range")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.e2e
def test_oneshot_json_against_a_real_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    import subprocess

    def admin(config: str, *words: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "keyval", "admin", "--config", config, *words, "--json"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    admin_toml = str(cluster.root / "admin.toml")
    outputs = {}
    for words in (
        ["slots"],
        ["slots", "drone-2"],
        ["slot", "5"],
        ["keyslot", "bar"],
        ["nodes"],
        ["status"],
        ["principals"],
        ["put", "bar", "1"],
        ["get", "bar"],
        ["scan", "b"],
        ["del", "bar"],
        ["move", "5", "drone-3"],
        ["principal", "add", "ops", "--role", "admin", "--out", str(tmp_path / "ops.key")],
        ["principal", "disable", "ops"],
    ):
        done = admin(admin_toml, *words)
        assert done.returncode == 0, (words, done.stderr)
        outputs[" ".join(words[:2])] = json.loads(done.stdout)
    assert outputs["slots"]["slots"] == 16384
    assert outputs["get bar"]["value"] == "1" and outputs["get bar"]["found"]
    assert [item["key"] for item in outputs["scan b"]["items"]] == ["bar"]
    assert outputs["move 5"]["drone"] == "drone-3"
    assert {"name": "ops", "enabled": False}.items() <= outputs["principal disable"].items()
    done = admin(admin_toml, "drain", "drone-1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["drone"] == "drone-1"

    refused = admin(str(cluster.root / "client.toml"), "move", "5", "drone-1")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("keyval admin: UNAUTHORIZED: move needs role admin")
    rebalance = admin(admin_toml, "rebalance")
    assert rebalance.returncode == 0, rebalance.stderr
    assert sum(json.loads(rebalance.stdout)["slots_per_drone"].values()) == 16384
