"""A local cluster of real daemon processes that a fault run can kill, pause and restart.

`open_process_cluster` runs `keyval cluster up --base-port 0` in its own session, waits for its
ready line, and reads `nodes.json` (role, name, address, pid, argv of every daemon). Then:

- `kill(name)` sends SIGKILL and waits until the process is gone;
- `pause(name)` / `resume(name)` send SIGSTOP / SIGCONT;
- `restart(name)` starts the node again from its `argv` with `--listen <its old address>`
  appended (flags win over the node's TOML), so everyone finds it where it was, and waits
  until it writes its ready file.

A node the launcher started is the launcher's child; a restarted one is ours, in its own
session. `close` (always reached: the context manager's `finally`) resumes paused nodes,
sends SIGTERM to the launcher and to our restarts, waits a bounded time and then SIGKILLs
whatever is left, the launcher's whole process group included. It blocks rather than awaits,
so it also runs when the caller is being cancelled (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio

from keyval.processes import stop_processes

READY_LINE = "keyval cluster ready"

# `keyval cluster up` itself waits up to 60 s per daemon and 90 s for every slot to be served;
# a loaded machine can take most of that, and beyond it the launcher has given up anyway.
CLUSTER_START_TIMEOUT_S = 150.0

# A restarted daemon logs in and binds its port in well under a second when idle; under load
# (and for the db, which opens its store) it can take seconds.
NODE_START_TIMEOUT_S = 30.0

# A restart whose process exits at once (its port still held by the dying one) is retried
# after this pause, until NODE_START_TIMEOUT_S.
RESTART_RETRY_S = 0.5

# SIGKILL takes effect at once, but the process is gone only when the kernel has closed its
# sockets; this bounds the wait for that.
KILL_TIMEOUT_S = 10.0

# SIGTERM to SIGKILL at the end of a run (the launcher itself waits 5 s per daemon).
STOP_GRACE_S = 8.0

POLL_S = 0.05

ROLES = ("auth", "db", "commander", "drone")


class ProcessClusterError(RuntimeError):
    """The cluster could not be started, a node could not be restarted, or a bad nodes.json."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One entry of `nodes.json`."""

    role: str
    name: str
    address: str
    pid: int
    argv: tuple[str, ...]

    @classmethod
    def from_json(cls, entry: object) -> NodeInfo:
        if not isinstance(entry, dict):
            raise ProcessClusterError(f"a nodes.json entry is an object, not {entry!r}")
        role, name, address = entry.get("role"), entry.get("name"), entry.get("address")
        pid, argv = entry.get("pid"), entry.get("argv")
        if role not in ROLES:
            raise ProcessClusterError(f"unknown role {role!r} in nodes.json")
        if not isinstance(name, str) or not name:
            raise ProcessClusterError(f"bad node name {name!r} in nodes.json")
        if not isinstance(address, str) or ":" not in address:
            raise ProcessClusterError(f"{name}: bad address {address!r} in nodes.json")
        if type(pid) is not int or pid <= 0:
            raise ProcessClusterError(f"{name}: bad pid {pid!r} in nodes.json")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ProcessClusterError(f"{name}: argv must be a non-empty list of strings")
        return cls(role, name, address, pid, tuple(argv))


def read_nodes(path: Path) -> list[NodeInfo]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ProcessClusterError(f"cannot read {path}: {error}") from None
    if not isinstance(entries, list):
        raise ProcessClusterError(f"{path} must hold a JSON list")
    return [NodeInfo.from_json(entry) for entry in entries]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, killed but not yet reaped by its parent, is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"])


@dataclass(eq=False)
class _Node:
    info: NodeInfo
    pid: int
    process: subprocess.Popen[bytes] | None = None  # set once we restarted it
    running: bool = True
    paused: bool = False
    restarts: int = 0


@dataclass(eq=False)
class ProcessCluster:
    """Handles on the daemons of one `keyval cluster up`. Build with `open_process_cluster`."""

    root: Path
    launcher: subprocess.Popen[bytes]
    nodes: dict[str, _Node] = field(default_factory=dict)

    @property
    def client_config(self) -> Path:
        return self.root / "client.toml"

    def names(self, role: str) -> list[str]:
        return [name for name, node in self.nodes.items() if node.info.role == role]

    def _node(self, name: str) -> _Node:
        node = self.nodes.get(name)
        if node is None:
            raise ProcessClusterError(f"no node {name!r}; known: {', '.join(self.nodes)}")
        return node

    def is_running(self, name: str) -> bool:
        return self._node(name).running

    def is_paused(self, name: str) -> bool:
        return self._node(name).paused

    def exited(self) -> list[str]:
        """Nodes we believe run but whose process is gone (crashed or exited by themselves)."""
        return [name for name, node in self.nodes.items() if node.running and not _alive(node.pid)]

    def mark_dead(self, name: str) -> None:
        """Record that a node's process is gone (it exited by itself), so it can be restarted."""
        node = self._node(name)
        if _alive(node.pid):
            raise ProcessClusterError(f"{name} still runs")
        node.running = node.paused = False
        if node.process is not None:
            node.process.wait(KILL_TIMEOUT_S)

    # ------------------------------------------------------------------ faults

    async def kill(self, name: str) -> None:
        node = self._node(name)
        if not node.running:
            raise ProcessClusterError(f"{name} is not running")
        with suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGKILL)
        node.running = False
        node.paused = False
        with trio.fail_after(KILL_TIMEOUT_S):
            while _alive(node.pid):
                await trio.sleep(POLL_S)
        if node.process is not None:
            node.process.wait(KILL_TIMEOUT_S)  # ours and dead: reaps at once

    def pause(self, name: str) -> None:
        node = self._node(name)
        if not node.running or node.paused:
            raise ProcessClusterError(f"{name} is not running, or already paused")
        os.kill(node.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, name: str) -> None:
        node = self._node(name)
        if not node.paused:
            raise ProcessClusterError(f"{name} is not paused")
        with suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGCONT)
        node.paused = False

    async def restart(self, name: str) -> None:
        """Start a killed node again at its old address; returns once it serves."""
        node = self._node(name)
        if node.running:
            raise ProcessClusterError(f"{name} is running")
        deadline = trio.current_time() + NODE_START_TIMEOUT_S
        last_exit = ""
        while trio.current_time() < deadline:
            node.restarts += 1
            ready_file = self.root / "run" / f"{name}.restart-{node.restarts}.addr"
            argv = [*node.info.argv, "--listen", node.info.address, "--ready-file", str(ready_file)]
            with (self.root / "logs" / f"{name}.log").open("ab") as log:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            node.process, node.pid, node.running = process, process.pid, True
            with trio.move_on_at(deadline):
                while process.poll() is None:
                    if ready_file.exists() and ready_file.read_text().strip():
                        return
                    await trio.sleep(POLL_S)
            if process.poll() is None:
                break  # still starting at the deadline
            node.running = False
            last_exit = f"exited with code {process.returncode}"
            await trio.sleep(RESTART_RETRY_S)
        raise ProcessClusterError(
            f"{name} did not serve again within {NODE_START_TIMEOUT_S:g} s "
            f"({last_exit or 'no ready file'}); see {self.root / 'logs' / (name + '.log')}"
        )

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop everything; bounded by STOP_GRACE_S, then SIGKILL. Never awaits."""
        for node in self.nodes.values():
            if node.paused:
                with suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)
                node.paused = False
        ours = [n.process for n in self.nodes.values() if n.process and n.process.poll() is None]
        stop_processes([self.launcher, *ours], STOP_GRACE_S)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.launcher.pid, signal.SIGKILL)  # daemons the launcher left behind
        for node in self.nodes.values():
            node.running = False


def _launcher_argv(root: Path, drones: int, commanders: int) -> list[str]:
    return [
        sys.executable, "-m", "keyval", "cluster", "up", "--dir", str(root),
        "--base-port", "0", "--drones", str(drones), "--commanders", str(commanders),
    ]  # fmt: skip


async def _wait_ready(launcher: subprocess.Popen[bytes], output: Path) -> None:
    with trio.move_on_after(CLUSTER_START_TIMEOUT_S):
        while launcher.poll() is None:
            if READY_LINE in output.read_text(errors="replace"):
                return
            await trio.sleep(POLL_S * 2)
        tail = output.read_text(errors="replace").strip().splitlines()[-5:]
        raise ProcessClusterError(
            f"keyval cluster up exited with code {launcher.returncode}: " + " | ".join(tail)
        )
    raise ProcessClusterError(f"the cluster was not ready within {CLUSTER_START_TIMEOUT_S:g} s")


@asynccontextmanager
async def open_process_cluster(
    root: Path, *, drones: int = 3, commanders: int = 1
) -> AsyncIterator[ProcessCluster]:
    """Start a cluster under `root` (created) and stop all of it on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    output = root / "cluster.out"
    with output.open("wb") as sink:
        launcher = subprocess.Popen(
            _launcher_argv(root, drones, commanders),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = ProcessCluster(root, launcher)
    try:
        await _wait_ready(launcher, output)
        for info in read_nodes(root / "nodes.json"):
            cluster.nodes[info.name] = _Node(info, info.pid)
        yield cluster
    finally:
        cluster.close()
