"""One-shot forms with --json (in-process against the real commander handler), their exit
codes and one-line errors; and the `keyval admin` entry point as a real process for the forms
that need no cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from keyval.admin.cli import run_invocation
from keyval.admin.grammar import parse_words
from keyval.keys import NUM_SLOTS
from tests.admin.harness import Cluster


async def oneshot(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], *words: str, role: str = "admin"
) -> tuple[int, object, str]:
    remote = cluster.remote(name=role, role=role)
    try:
        code = await run_invocation(parse_words([*words, "--json"]), remote, Console())
    finally:
        await remote.aclose()
    captured = capsys.readouterr()
    data = json.loads(captured.out) if captured.out else None
    return code, data, captured.err


async def test_map_commands_as_json(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    code, data, _ = await oneshot(cluster, capsys, "slots")
    assert code == 0 and isinstance(data, dict)
    assert data["slots"] == NUM_SLOTS and data["unowned"] == 0 and data["term"] == 1
    assert data["ranges"][0] == {"first": 0, "last": 5461, "drone": "drone-1", "epoch": 1}

    code, data, _ = await oneshot(cluster, capsys, "slots", "drone-3")
    assert code == 0 and isinstance(data, dict) and data["drone"] == "drone-3"
    assert {r["drone"] for r in data["ranges"]} == {"drone-3"}

    code, data, _ = await oneshot(cluster, capsys, "slot", "100")
    assert (code, data) == (
        0,
        {"slot": 100, "drone": "drone-1", "address": "drone-1:6240", "epoch": 1, "term": 1},
    )
    code, data, _ = await oneshot(cluster, capsys, "keyslot", "foo")
    assert code == 0 and isinstance(data, dict)
    assert data["key"] == "foo" and data["slot"] == 12182 and data["drone"] == "drone-3"


async def test_nodes_and_status_as_json(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("nodes", "status"):
        code, data, _ = await oneshot(cluster, capsys, command)
        assert code == 0 and isinstance(data, dict)
        assert data["leader"] == "commander-1" and data["slots_owned"] == NUM_SLOTS
        assert data["commanders"] == [
            {
                "name": "commander-1",
                "role": "commander",
                "address": "memory:1",
                "reachable": True,
                "leader": True,
            }
        ]
        assert [d["name"] for d in data["drones"]] == ["drone-1", "drone-2", "drone-3"]


async def test_move_drain_rebalance_as_json(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data, _ = await oneshot(cluster, capsys, "move", "7", "drone-3")
    assert code == 0 and isinstance(data, dict)
    assert data["ok"] and data["moved"] and data["drone"] == "drone-3" and data["from"] == "drone-1"

    code, data, _ = await oneshot(cluster, capsys, "drain", "drone-1")
    assert code == 0 and isinstance(data, dict) and data["drone"] == "drone-1"
    assert data["slots_moved"] == 5461  # its range 0..5461 minus slot 7, moved above

    code, data, _ = await oneshot(cluster, capsys, "rebalance")
    assert code == 0 and isinstance(data, dict) and data["ok"]
    assert sum(data["slots_per_drone"].values()) == 16384
    assert "drone-1" not in data["slots_per_drone"]  # draining drones get nothing back


async def test_failures_exit_1_with_one_line(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data, err = await oneshot(cluster, capsys, "move", "7", "drone-9")
    assert (code, data) == (1, None)
    assert err == "keyval admin: NOT_FOUND: no live drone named 'drone-9'\n"

    code, _, err = await oneshot(cluster, capsys, "drain", "drone-2", role="client")
    assert code == 1 and err.startswith("keyval admin: UNAUTHORIZED: drain needs role admin")
    assert err.count("\n") == 1


def keyval(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "keyval", *args]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def test_process_help_json_and_usage_errors() -> None:
    done = keyval("admin", "help", "--json")
    assert done.returncode == 0
    usages = [entry["usage"] for entry in json.loads(done.stdout)["commands"]]
    assert "move SLOT DRONE" in usages and "keyslot KEY" in usages

    done = keyval("admin", "--json", "help", "move")
    assert done.returncode == 0 and json.loads(done.stdout)["commands"][0]["usage"] == (
        "move SLOT DRONE"
    )

    done = keyval("admin", "slto", "5")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "keyval admin: unknown command 'slto'; did you mean 'slot' or 'slots' or 'keyslot'? "
        "(type 'help' for the list)\n"
    )
    done = keyval("admin", "slot", "16384", "--json")
    assert done.returncode == 2
    assert done.stderr == "keyval admin: slot 16384 is out of range: slots are 0..16383\n"


def test_process_without_a_config(tmp_path: Path) -> None:
    done = keyval("admin", "slots")
    assert done.returncode == 2
    assert done.stderr == (
        "keyval admin: no client config: pass --config FILE or set KEYVAL_CONFIG\n"
    )
    done = keyval("--config", str(tmp_path / "missing.toml"), "admin", "slots")
    assert done.returncode == 2
    assert "missing.toml does not exist" in done.stderr
