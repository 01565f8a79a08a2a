"""A local keyval cluster for the bench: started with `keyval cluster up`, or attached to."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyval.bench.errors import BenchError
from keyval.bench.proc import ServerProcess, load_nodes

READY_LINE = "keyval cluster ready"  # printed by keyval.cluster once every slot is served
# keyval.cluster waits up to 60 s per daemon and 90 s for the whole cluster to serve.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0  # SIGTERM to the launcher, which stops its children, then SIGKILL
POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class ClusterHandle:
    root: Path

    @property
    def client_config(self) -> Path:
        return self.root / "client.toml"

    def processes(self) -> list[ServerProcess]:
        return load_nodes(self.root)

    def drones(self) -> list[ServerProcess]:
        return [process for process in self.processes() if process.role == "drone"]


def attach(root: Path) -> ClusterHandle:
    handle = ClusterHandle(root.resolve())
    if not handle.client_config.is_file():
        raise BenchError(f"{handle.client_config} does not exist: is a cluster up in {root}?")
    handle.processes()  # raises BenchError when nodes.json is missing or malformed
    return handle


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def local_cluster(
    root: Path, *, drones: int, backend: str | None, commanders: int = 1
) -> Iterator[ClusterHandle]:
    """`keyval cluster up --dir root --drones N --commanders C --base-port 0`, until the
    block ends."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "keyval", "cluster", "up", "--dir", str(root)]
    argv += ["--drones", str(drones), "--commanders", str(commanders), "--base-port", "0"]
    if backend:
        argv += ["--backend", backend]
    log = root / "cluster-up.log"
    with log.open("wb") as output:  # a file, not a pipe: a full pipe would block the launcher
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in log.read_text(errors="replace"):
            if process.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise BenchError(f"keyval cluster up exited: {' | '.join(tail)}")
            if time.monotonic() > deadline:
                raise BenchError(f"keyval cluster not ready within {START_TIMEOUT_S:.0f} s")
            time.sleep(POLL_INTERVAL_S)
        yield ClusterHandle(root.resolve())
    finally:
        _stop(process)
